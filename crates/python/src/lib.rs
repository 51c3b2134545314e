//! The Python binding of dualpipe: the extension module `dualpipe_rs._core`.
//!
//! Everything is done by the Rust crates: [`dualpipe_planner::plan`] plans,
//! [`dualpipe_schedule::validate`] checks, [`dualpipe_schedule::simulate`] times, the renderers
//! draw. This crate only converts arguments and results and maps errors onto Python
//! exceptions: a schedule that does not parse or validate raises `ScheduleError` (a
//! `ValueError`) carrying where and which rule, an unreadable file `OSError`, a bad argument
//! `ValueError`. Nothing here panics on any input.
//!
//! [`dualpipe_partition`] cuts layers into stages (`partition`); [`dualpipe_tune`] ranks
//! families and micro-batch sizes (`tune`).
//!
//! The pure half ([`convert`]) is tested with `cargo test`; the Python half with pytest
//! (`python/tests/test_core.py`).

pub mod convert;
mod partition;
mod schedule;
mod tune;

use std::path::PathBuf;

use dualpipe_planner::{Family, PlanRequest};
use dualpipe_schedule::{ParseError, Schedule, ValidSchedule, ValidationErrors};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;

pub use schedule::PySchedule;

use convert::{Problem, parse_problem, validation_problems};

pyo3::create_exception!(
    dualpipe_rs._core,
    ScheduleError,
    PyValueError,
    "A schedule that does not parse or breaks a rule of the format.\n\nAttributes: `rank`, `index`, `instruction` (compact form), `rule` of the first problem (each None where it does not apply), and `problems`, a list of dicts with the same keys plus `message` for every problem found."
);

/// The `ScheduleError` for `problems`, with `message` as its text.
pub(crate) fn schedule_error(py: Python<'_>, message: String, problems: &[Problem]) -> PyErr {
    let error = ScheduleError::new_err(message);
    if let Err(e) = set_problem_attributes(py, &error, problems) {
        return e;
    }
    error
}

fn set_problem_attributes(py: Python<'_>, error: &PyErr, problems: &[Problem]) -> PyResult<()> {
    let value = error.value(py);
    let list = PyList::empty(py);
    for problem in problems {
        let dict = PyDict::new(py);
        dict.set_item("rank", problem.rank)?;
        dict.set_item("index", problem.index)?;
        dict.set_item("instruction", problem.instruction.as_deref())?;
        dict.set_item("rule", problem.rule)?;
        dict.set_item("message", &problem.message)?;
        list.append(dict)?;
    }
    let first = problems.first();
    value.setattr("rank", first.and_then(|p| p.rank))?;
    value.setattr("index", first.and_then(|p| p.index))?;
    value.setattr("instruction", first.and_then(|p| p.instruction.as_deref()))?;
    value.setattr("rule", first.and_then(|p| p.rule))?;
    value.setattr("problems", list)?;
    Ok(())
}

/// The error of a document that does not parse; `source` prefixes the message (a path) when
/// given, as `dualpipe validate` prints it.
pub(crate) fn parse_error(py: Python<'_>, source: Option<&str>, error: &ParseError) -> PyErr {
    schedule_error(py, prefixed(source, error), &[parse_problem(error)])
}

/// The error of a schedule that breaks rules.
pub(crate) fn validation_error(
    py: Python<'_>,
    source: Option<&str>,
    errors: &ValidationErrors,
) -> PyErr {
    schedule_error(py, prefixed(source, errors), &validation_problems(errors))
}

fn prefixed(source: Option<&str>, error: &impl std::fmt::Display) -> String {
    match source {
        Some(source) => format!("{source}: {error}"),
        None => error.to_string(),
    }
}

/// Parses and validates a document; errors become `ScheduleError`.
pub(crate) fn parse_valid(
    py: Python<'_>,
    source: Option<&str>,
    text: &str,
) -> PyResult<ValidSchedule> {
    let parsed = py.detach(|| Schedule::from_json(text).map(ValidSchedule::new));
    match parsed {
        Err(error) => Err(parse_error(py, source, &error)),
        Ok(Err(errors)) => Err(validation_error(py, source, &errors)),
        Ok(Ok(valid)) => Ok(valid),
    }
}

/// Reads a whole text file; failures become the `OSError` subclass of their errno (for example
/// `FileNotFoundError`) naming the file, and text that is not UTF-8 a `ValueError` built by
/// `not_text`.
pub(crate) fn read_text(
    py: Python<'_>,
    path: &std::path::Path,
    not_text: impl FnOnce(String) -> PyErr,
) -> PyResult<String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return Err(os_error(py, path, &e)),
    };
    String::from_utf8(bytes)
        .map_err(|e| not_text(format!("{}: not UTF-8 text ({e})", path.display())))
}

fn os_error(py: Python<'_>, path: &std::path::Path, error: &std::io::Error) -> PyErr {
    let message = format!("cannot read {}: {error}", path.display());
    let Some(errno) = error.raw_os_error() else {
        return PyOSError::new_err(message);
    };
    // The description without the " (os error N)" that Rust appends; Python shows the errno.
    let text = error.to_string();
    let suffix = format!(" (os error {errno})");
    let strerror = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
    // OSError(errno, strerror, filename) picks the subclass of the errno itself.
    let filename = path.display().to_string();
    let built = py
        .get_type::<PyOSError>()
        .call1((errno, strerror, filename));
    match built {
        Ok(instance) => PyErr::from_value(instance),
        Err(_) => PyOSError::new_err(message),
    }
}

/// A JSON value as the Python object `json.loads` would give.
pub(crate) fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_u64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_python(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(fields) => {
            let dict = PyDict::new(py);
            for (key, item) in fields {
                dict.set_item(key, to_python(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// A count argument (`ranks`, ...) as `u32`: a `TypeError` for anything but an int, a
/// `ValueError` naming the argument for an int out of range.
fn count(name: &str, value: &Bound<'_, PyAny>) -> PyResult<u32> {
    if value.cast::<pyo3::types::PyInt>().is_err() || value.cast::<pyo3::types::PyBool>().is_ok() {
        let kind = value
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{name} must be an int, not {kind}"
        )));
    }
    value.extract::<u32>().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} is {value}; it must be an integer from 0 to {}",
            u32::MAX
        ))
    })
}

/// Plans one step of a schedule family and validates it.
///
/// `name` is one of `families()`; `chunks_per_rank` applies to `interleaved-1f1b` only
/// (default 2). A family that does not accept the parameters raises `ValueError` with the
/// planner's message, the one `dualpipe plan` prints. `costs` (as for `Schedule.simulate`; None
/// for the defaults) are the costs the messages of the lowered families are placed for.
#[pyfunction]
#[pyo3(signature = (name, ranks, microbatches, chunks_per_rank = None, forward_only = false, costs = None))]
fn plan(
    py: Python<'_>,
    name: &str,
    ranks: &Bound<'_, PyAny>,
    microbatches: &Bound<'_, PyAny>,
    chunks_per_rank: Option<&Bound<'_, PyAny>>,
    forward_only: bool,
    costs: Option<&Bound<'_, PyAny>>,
) -> PyResult<PySchedule> {
    let costs = schedule::costs_argument(py, costs)?;
    let family: Family = name
        .parse()
        .map_err(|e: dualpipe_planner::PlanError| PyValueError::new_err(e.to_string()))?;
    let mut request = PlanRequest::new(
        family,
        count("ranks", ranks)?,
        count("microbatches", microbatches)?,
    );
    request.forward_only = forward_only;
    request.chunks_per_rank = chunks_per_rank
        .filter(|v| !v.is_none())
        .map(|v| count("chunks_per_rank", v))
        .transpose()?;
    // Interleaved 1F1B takes the planner's default chunks per rank unless told otherwise.
    match py.detach(|| dualpipe_planner::plan_for(&request, &costs)) {
        Err(dualpipe_planner::PlanError::Invalid(errors)) => Err(validation_error(
            py,
            Some("internal planner error, please report it: the planned schedule is invalid"),
            &errors,
        )),
        Err(e) => Err(PyValueError::new_err(e.to_string())),
        Ok(valid) => Ok(PySchedule::new(valid)),
    }
}

/// The schedule families the planner knows, in the CLI's order, each
/// `{"name", "constraint", "stages"}`: the constraint in the planner's words and the number of
/// stages as a formula of N (ranks) and V (chunks per rank).
#[pyfunction]
fn families(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for family in Family::ALL {
        let dict = PyDict::new(py);
        dict.set_item("name", family.name())?;
        dict.set_item("constraint", family.constraint())?;
        dict.set_item("stages", family.stages_formula())?;
        list.append(dict)?;
    }
    Ok(list)
}

/// Reads, parses and validates a schedule file (a `str` or `os.PathLike` path).
///
/// Raises `OSError` (`FileNotFoundError`, ...) when the file cannot be read, `ScheduleError`
/// when it is not a valid v1 schedule, with the message `dualpipe validate` prints.
#[pyfunction]
fn load(py: Python<'_>, path: PathBuf) -> PyResult<PySchedule> {
    let name = path.display().to_string();
    let text = read_text(py, &path, |message| {
        let problem = Problem {
            rank: None,
            index: None,
            instruction: None,
            rule: None,
            message: message.clone(),
        };
        schedule_error(py, message, &[problem])
    })?;
    parse_valid(py, Some(&name), &text).map(PySchedule::new)
}

/// The extension module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let error = py.get_type::<ScheduleError>();
    for attribute in ["rank", "index", "instruction", "rule"] {
        error.setattr(attribute, py.None())?;
    }
    error.setattr("problems", ())?;
    m.add("ScheduleError", error)?;
    m.add_class::<PySchedule>()?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(families, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(partition::partition, m)?)?;
    m.add_function(wrap_pyfunction!(tune::tune, m)?)?;
    m.add_function(wrap_pyfunction!(schedule::_schedule_from_json, m)?)?;
    Ok(())
}
