//! `dualpipe_rs.tune`: the auto-tuner of `dualpipe tune`, its report as a dict.

use dualpipe_planner::plan_for;
use dualpipe_tune::{Report, TuneError, TuneRequest, tune as run_tune};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::parse_model;
use crate::schedule::{PySchedule, costs_argument};
use crate::{count, to_python};

/// Ranks every schedule family at every micro-batch size dividing `global_batch` under
/// measured `costs`, as `dualpipe tune --json` does, and returns that report as a dict, with
/// one more key, `schedule`: the best candidate planned (a `Schedule`), or None when nothing
/// fits `memory_cap`.
///
/// `costs` is a cost file (a dict, assignments or a path, as for
/// `Schedule.simulate`) that says the micro-batch size it was measured at (`microbatch_size`),
/// or pass `measured_at`. `microbatch_sizes` limits the sizes tried; `memory_cap` is in
/// bytes per rank; `chunks_per_rank` is interleaved 1F1B's; `model` is `"blocking"` or
/// `"async"`; `synthesize` (seconds, shared over the micro-batch sizes) adds the schedule
/// synthesiser's row at each size, as `dualpipe tune --synthesize`. Bad arguments raise
/// `ValueError` with the message the CLI prints.
#[pyfunction]
#[pyo3(signature = (costs, ranks, global_batch, *, microbatch_sizes = None, memory_cap = None, chunks_per_rank = None, model = "blocking", measured_at = None, synthesize = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tune<'py>(
    py: Python<'py>,
    costs: &Bound<'py, PyAny>,
    ranks: &Bound<'py, PyAny>,
    global_batch: &Bound<'py, PyAny>,
    microbatch_sizes: Option<Vec<Bound<'py, PyAny>>>,
    memory_cap: Option<f64>,
    chunks_per_rank: Option<&Bound<'py, PyAny>>,
    model: &str,
    measured_at: Option<f64>,
    synthesize: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    if let Some(t) = synthesize
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(PyValueError::new_err(format!(
            "synthesize={t}: give a number of seconds, not negative"
        )));
    }
    let mut costs = costs_argument(py, Some(costs))?;
    if let Some(size) = measured_at {
        match costs.microbatch_size {
            Some(said) if said != size => {
                return Err(PyValueError::new_err(format!(
                    "measured_at={size}: the costs say they were measured at micro-batches of {said} samples"
                )));
            }
            _ => costs.microbatch_size = Some(size),
        }
    }
    let mut request =
        TuneRequest::new(count("ranks", ranks)?, count("global_batch", global_batch)?);
    request.microbatch_sizes = microbatch_sizes
        .map(|sizes| {
            sizes
                .iter()
                .map(|s| count("microbatch_sizes", s))
                .collect::<PyResult<Vec<u32>>>()
        })
        .transpose()?;
    request.memory_cap = memory_cap;
    if let Some(chunks) = chunks_per_rank.filter(|c| !c.is_none()) {
        request.chunks_per_rank = count("chunks_per_rank", chunks)?;
    }
    request.model = parse_model(model).map_err(PyValueError::new_err)?;
    let tuning = py
        .detach(|| run_tune(&request, &costs))
        .map_err(|e| match e {
            TuneError::Costs(why) if costs.microbatch_size.is_none() => {
                PyValueError::new_err(format!("costs: {why}, or pass measured_at=SAMPLES"))
            }
            other => PyValueError::new_err(other.to_string()),
        })?;
    let mut report = Report::new(&request, &costs, &tuning);
    let synthesized = match synthesize {
        Some(seconds) => py
            .detach(|| report.add_synthesized(&request, &costs, seconds))
            .map_err(|e| PyValueError::new_err(e.to_string()))?,
        None => None,
    };
    let value = serde_json::to_value(&report)
        .map_err(|e| PyValueError::new_err(format!("internal error: {e}")))?;
    let dict = to_python(py, &value)?;
    let best = match (synthesized, tuning.best()) {
        (Some(valid), _) => Bound::new(py, PySchedule::new(valid))?.into_any(),
        (None, None) => py.None().into_bound(py),
        (None, Some(best)) => {
            let valid = py
                .detach(|| plan_for(&best.request, &best.costs))
                .map_err(|e| {
                    PyValueError::new_err(format!("internal error, please report it: {e}"))
                })?;
            Bound::new(py, PySchedule::new(valid))?.into_any()
        }
    };
    dict.set_item("schedule", best)?;
    Ok(dict)
}
