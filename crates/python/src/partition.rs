//! `dualpipe_rs.partition`: the cost-aware partitioner of `dualpipe-partition`, the document
//! `dualpipe partition --json` prints, as a dict.

use std::path::PathBuf;

use dualpipe_partition::{Layers, Model, Options, partition_model};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::Value;

use crate::{PySchedule, read_text, to_python};

/// One layer's dict as JSON; numbers must be finite (JSON cannot carry others).
fn layer_value(index: usize, item: &Bound<'_, PyAny>) -> PyResult<Value> {
    let dict = item.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!(
            "layer {index} is a {}; expected a dict like {{\"f\": 1.0, \"b\": 2.0}}",
            item.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    let mut fields = serde_json::Map::new();
    for (key, value) in dict.iter() {
        let Ok(key) = key.extract::<String>() else {
            return Err(PyValueError::new_err(format!(
                "layer {index}: the key {key} is not a str"
            )));
        };
        let json = if value.is_none() {
            Value::Null
        } else if let Ok(s) = value.cast::<PyString>() {
            Value::String(s.to_cow()?.into_owned())
        } else if value.cast::<PyInt>().is_ok() || value.cast::<PyFloat>().is_ok() {
            let number: f64 = value.extract()?;
            Value::Number(serde_json::Number::from_f64(number).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "layer {index}: `{key}` is {number}; it must be finite and not negative"
                ))
            })?)
        } else {
            return Err(PyTypeError::new_err(format!(
                "layer {index}: `{key}` is a {}; expected a number",
                value
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            )));
        };
        fields.insert(key, json);
    }
    Ok(Value::Object(fields))
}

/// The `layers` argument: a list of dicts, or the path of a layers file.
fn layers_argument(py: Python<'_>, layers: &Bound<'_, PyAny>) -> PyResult<Layers> {
    if layers.cast::<PyList>().is_ok() || layers.cast::<PyTuple>().is_ok() {
        let mut values = Vec::new();
        for (index, item) in layers.try_iter()?.enumerate() {
            values.push(layer_value(index, &item?)?);
        }
        return Layers::from_values(None, values).map_err(|e| PyValueError::new_err(e.to_string()));
    }
    let Ok(path) = layers.extract::<PathBuf>() else {
        return Err(PyTypeError::new_err(format!(
            "layers must be a list of dicts or the path of a layers file, not {}",
            layers
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )));
    };
    let text = read_text(py, &path, PyValueError::new_err)?;
    Layers::from_json(&text).map_err(|e| PyValueError::new_err(format!("{}: {e}", path.display())))
}

/// Cuts `layers` into the stages of a schedule; the document `dualpipe partition --json`
/// prints, as a dict.
#[pyfunction]
#[pyo3(signature = (layers, schedule = None, *, family = None, ranks = None, microbatches = None, chunks_per_rank = None, memory_cap = None, max_evaluations = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn partition<'py>(
    py: Python<'py>,
    layers: &Bound<'py, PyAny>,
    schedule: Option<PyRef<'py, PySchedule>>,
    family: Option<&str>,
    ranks: Option<&Bound<'py, PyAny>>,
    microbatches: Option<&Bound<'py, PyAny>>,
    chunks_per_rank: Option<&Bound<'py, PyAny>>,
    memory_cap: Option<f64>,
    max_evaluations: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let layers = layers_argument(py, layers)?;
    let planned;
    let valid = match (&schedule, family) {
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "give either a schedule or family/ranks/microbatches, not both",
            ));
        }
        (Some(schedule), None) => schedule.valid(),
        (None, Some(family)) => {
            let (Some(ranks), Some(microbatches)) = (ranks, microbatches) else {
                return Err(PyValueError::new_err(
                    "planning a schedule needs family, ranks and microbatches",
                ));
            };
            planned = crate::plan(
                py,
                family,
                ranks,
                microbatches,
                chunks_per_rank,
                false,
                None,
            )?;
            planned.valid()
        }
        (None, None) => {
            return Err(PyValueError::new_err(
                "give a schedule, or family, ranks and microbatches to plan one",
            ));
        }
    };
    let options = Options {
        memory_cap,
        max_evaluations: max_evaluations.unwrap_or(Options::default().max_evaluations),
    };
    let text = py.detach(|| {
        let model = Model::new(&layers, valid);
        partition_model(&model, &options).map(|result| result.to_json(&model))
    });
    let text = text.map_err(|e| PyValueError::new_err(e.to_string()))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| PyValueError::new_err(format!("internal error: {e}")))?;
    to_python(py, &value)
}
