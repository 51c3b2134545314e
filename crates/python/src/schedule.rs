//! `dualpipe_rs.Schedule`: a validated schedule and what can be asked of it.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use dualpipe_schedule::{
    Costs, ExecutionModel, ValidSchedule, simulate, timeline_svg, timeline_text, to_torch_csv,
};
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use serde_json::Value;

use crate::convert::{check_cost_shape, instruction_value, is_assignment_list, parse_model};
use crate::{parse_valid, read_text, schedule_error, to_python};

/// A schedule that passed every rule of format v1. Immutable.
#[pyclass(name = "Schedule", module = "dualpipe_rs._core", frozen)]
pub struct PySchedule {
    valid: ValidSchedule,
}

impl PySchedule {
    /// Wraps a validated schedule.
    pub fn new(valid: ValidSchedule) -> Self {
        PySchedule { valid }
    }

    /// The validated schedule.
    pub fn valid(&self) -> &ValidSchedule {
        &self.valid
    }

    /// Rank `rank` as an index into `ranks`, or `IndexError`.
    fn rank(&self, rank: i64) -> PyResult<usize> {
        let n = self.valid.schedule().ranks.len();
        usize::try_from(rank)
            .ok()
            .filter(|&r| r < n)
            .ok_or_else(|| {
                PyIndexError::new_err(format!(
                    "rank {rank} is out of range: the schedule has {n} rank{} (0..{})",
                    if n == 1 { "" } else { "s" },
                    n.saturating_sub(1)
                ))
            })
    }

    /// Runs the simulator with the `costs` and `model` arguments of `simulate` and `render`.
    fn run(
        &self,
        py: Python<'_>,
        costs: Option<&Bound<'_, PyAny>>,
        model: &str,
    ) -> PyResult<(Costs, dualpipe_schedule::Simulation)> {
        let model: ExecutionModel = parse_model(model).map_err(PyValueError::new_err)?;
        let costs = costs_argument(py, costs)?;
        let valid = &self.valid;
        let result = py.detach(|| simulate(valid, &costs, model));
        match result {
            Ok(sim) => Ok((costs, sim)),
            Err(dualpipe_schedule::SimulateError::Costs(e)) => {
                Err(PyValueError::new_err(format!("costs: {e}")))
            }
            Err(stalled) => Err(schedule_error(py, stalled.to_string(), &[])),
        }
    }
}

/// The cost model of a `costs` argument: None, a dict (the cost-file schema), a str holding
/// assignments (`f=1,b=2`) or a path, or an `os.PathLike`.
pub(crate) fn costs_argument(py: Python<'_>, costs: Option<&Bound<'_, PyAny>>) -> PyResult<Costs> {
    let Some(costs) = costs.filter(|c| !c.is_none()) else {
        return Ok(Costs::default());
    };
    if let Ok(dict) = costs.cast::<PyDict>() {
        let value = from_python(dict.as_any(), "")?;
        check_cost_shape(&value).map_err(PyValueError::new_err)?;
        return Costs::from_json(&value.to_string())
            .map_err(|e| PyValueError::new_err(format!("costs: {e}")));
    }
    if let Ok(text) = costs.cast::<PyString>() {
        let text = text.to_cow()?;
        let text: &str = &text;
        if is_assignment_list(text) {
            let mut parsed = Costs::default();
            parsed
                .apply_assignments(text)
                .map_err(|e| PyValueError::new_err(format!("costs: {e}")))?;
            return Ok(parsed);
        }
    }
    let path: PathBuf = costs.extract().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "costs must be None, a dict, a str (assignments like \"f=1,b=2\" or a path) or an os.PathLike, not {}",
            costs.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let text = read_text(py, &path, PyValueError::new_err)?;
    Costs::from_json(&text).map_err(|e| PyValueError::new_err(format!("{}: {e}", path.display())))
}

/// A Python value of a cost dict as JSON: dicts with str keys, lists and tuples, str, bool,
/// int, float and None. `place` names the value in errors (`f`, `stages[0].b`; empty for the
/// dict itself). A float that is not finite is refused here, as JSON cannot carry it.
fn from_python(value: &Bound<'_, PyAny>, place: &str) -> PyResult<Value> {
    let bad = |what: String| {
        PyValueError::new_err(if place.is_empty() {
            format!("costs: {what}")
        } else {
            format!("costs: `{place}` {what}")
        })
    };
    let inner = |key: &str| {
        if place.is_empty() {
            key.to_string()
        } else {
            format!("{place}.{key}")
        }
    };
    if value.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.cast::<pyo3::types::PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if value.cast::<pyo3::types::PyInt>().is_ok() {
        return match value.extract::<i64>() {
            Ok(i) => Ok(Value::from(i)),
            Err(_) => Err(bad(format!("is {value}, too large"))),
        };
    }
    if let Ok(f) = value.cast::<pyo3::types::PyFloat>() {
        let f = f.value();
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| bad(format!("is {f}; costs must be finite and not negative")));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        let mut fields = serde_json::Map::new();
        for (key, item) in dict.iter() {
            let Ok(key) = key.extract::<String>() else {
                return Err(bad(format!("has the key {key}; keys must be str")));
            };
            let item = from_python(&item, &inner(&key))?;
            fields.insert(key, item);
        }
        return Ok(Value::Object(fields));
    }
    if value.cast::<PyList>().is_ok() || value.cast::<PyTuple>().is_ok() {
        let mut items = Vec::new();
        for (i, item) in value.try_iter()?.enumerate() {
            items.push(from_python(&item?, &format!("{place}[{i}]"))?);
        }
        return Ok(Value::Array(items));
    }
    let kind = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    Err(bad(format!("is a {kind}; expected a number")))
}

/// Module-level constructor used by pickling: `Schedule.from_json`.
#[pyfunction]
pub(crate) fn _schedule_from_json(py: Python<'_>, text: &str) -> PyResult<PySchedule> {
    parse_valid(py, None, text).map(PySchedule::new)
}

#[pymethods]
impl PySchedule {
    /// Parses and validates a format-v1 document.
    #[staticmethod]
    fn from_json(py: Python<'_>, text: &str) -> PyResult<PySchedule> {
        _schedule_from_json(py, text)
    }

    /// The document in the canonical layout `dualpipe plan` writes.
    fn to_json(&self) -> String {
        self.valid.schedule().to_json()
    }

    /// The `schedule` field: the family that produced it, or any label.
    #[getter]
    fn name(&self) -> &str {
        &self.valid.schedule().schedule
    }

    /// Number of ranks.
    #[getter]
    fn num_ranks(&self) -> u32 {
        self.valid.schedule().num_ranks
    }

    /// Number of stages.
    #[getter]
    fn num_stages(&self) -> u32 {
        self.valid.schedule().num_stages
    }

    /// Number of micro-batches per step.
    #[getter]
    fn num_microbatches(&self) -> u32 {
        self.valid.schedule().num_microbatches
    }

    /// Whether the schedule is forward only (inference).
    #[getter]
    fn forward_only(&self) -> bool {
        self.valid.schedule().forward_only
    }

    /// The routes: `[{"route": [...], "microbatches": [...]}, ...]`.
    #[getter]
    fn pipelines<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for pipeline in &self.valid.schedule().pipelines {
            let dict = PyDict::new(py);
            dict.set_item("route", &pipeline.route)?;
            dict.set_item("microbatches", &pipeline.microbatches)?;
            list.append(dict)?;
        }
        Ok(list)
    }

    /// The distinct stages `rank` runs, in module order.
    fn stages_on(&self, rank: i64) -> PyResult<Vec<u32>> {
        let rank = self.rank(rank)?;
        Ok(self.valid.topology().stages_on(rank as u32))
    }

    /// Rank `rank`'s instructions as their JSON objects.
    fn instructions<'py>(&self, py: Python<'py>, rank: i64) -> PyResult<Bound<'py, PyList>> {
        let rank = self.rank(rank)?;
        let list = PyList::empty(py);
        for instruction in &self.valid.schedule().ranks[rank] {
            list.append(to_python(py, &instruction_value(instruction))?)?;
        }
        Ok(list)
    }

    /// Rank `rank`'s instructions in compact form (`F s3 m12`).
    fn instruction_text(&self, rank: i64) -> PyResult<Vec<String>> {
        let rank = self.rank(rank)?;
        Ok(self.valid.schedule().ranks[rank]
            .iter()
            .map(ToString::to_string)
            .collect())
    }

    /// The document `dualpipe simulate --json` prints, as a dict.
    #[pyo3(signature = (costs = None, model = "blocking", timeline = false))]
    fn simulate<'py>(
        &self,
        py: Python<'py>,
        costs: Option<&Bound<'py, PyAny>>,
        model: &str,
        timeline: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (costs, sim) = self.run(py, costs, model)?;
        let text = sim.to_json(&self.valid, &costs, timeline);
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| PyValueError::new_err(format!("internal error: {e}")))?;
        to_python(py, &value)
    }

    /// The simulated timeline drawn as `dualpipe render` does.
    #[pyo3(signature = (format, costs = None, model = "blocking"))]
    fn render(
        &self,
        py: Python<'_>,
        format: &str,
        costs: Option<&Bound<'_, PyAny>>,
        model: &str,
    ) -> PyResult<String> {
        if !matches!(format, "text" | "svg" | "chrome") {
            return Err(PyValueError::new_err(format!(
                "unknown render format {format:?}; expected \"text\", \"svg\" or \"chrome\""
            )));
        }
        let (_, sim) = self.run(py, costs, model)?;
        let valid = &self.valid;
        Ok(py.detach(|| match format {
            "text" => timeline_text(valid, &sim.timeline(valid.schedule()), None),
            "svg" => timeline_svg(valid, &sim.timeline(valid.schedule())),
            _ => sim.chrome_trace(valid),
        }))
    }

    /// torch.distributed.pipelining's CSV of the schedule.
    #[pyo3(signature = (with_comms = false))]
    fn to_torch_csv(&self, with_comms: bool) -> PyResult<String> {
        to_torch_csv(&self.valid, with_comms).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s = self.valid.schedule();
        let name = PyString::new(py, &s.schedule).repr()?;
        Ok(format!(
            "Schedule(name={name}, num_ranks={}, num_stages={}, num_microbatches={}, forward_only={})",
            s.num_ranks,
            s.num_stages,
            s.num_microbatches,
            if s.forward_only { "True" } else { "False" }
        ))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> Py<PyAny> {
        let py = other.py();
        match other.cast::<PySchedule>() {
            Ok(other) => (self.valid.schedule() == other.get().valid.schedule())
                .into_pyobject(py)
                .map(|b| b.to_owned().into_any().unbind())
                .unwrap_or_else(|_| py.NotImplemented()),
            Err(_) => py.NotImplemented(),
        }
    }

    fn __hash__(&self) -> u64 {
        let s = self.valid.schedule();
        let mut hasher = DefaultHasher::new();
        s.schedule.hash(&mut hasher);
        (
            s.num_ranks,
            s.num_stages,
            s.num_microbatches,
            s.forward_only,
        )
            .hash(&mut hasher);
        for pipeline in &s.pipelines {
            pipeline.route.hash(&mut hasher);
            pipeline.microbatches.hash(&mut hasher);
        }
        s.ranks.hash(&mut hasher);
        hasher.finish()
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let constructor = py
            .import("dualpipe_rs._core")?
            .getattr("_schedule_from_json")?;
        Ok((constructor, (self.to_json(),)))
    }
}
