//! The layers file: one entry per layer of the model, in order, with its measured or estimated
//! costs. It is a cost file (`dualpipe_schedule::Costs`, docs/costs.md) whose `layers` list is
//! read here; lists of layer objects from Python go through [`Layers::from_values`].
//!
//! ```json
//! {"unit": "ms",
//!  "layers": [{"name": "embed", "f": 1.0, "b": 2.0, "w": 1.0,
//!              "param_bytes": 4096, "activation_bytes": 1024}, ...]}
//! ```
//!
//! - `unit` (optional): the time unit of `f`, `b` and `w`, a label only (`"ms"`, `"us"`, ...).
//! - `f`: forward time of the layer for one micro-batch; `b`: full backward (input and weight
//!   gradients); `w` (optional, default 0): the weight-gradient part of `b`, so `w <= b`.
//! - `fb` (optional): the time of an overlapped `FB` of the layer (a forward and a full
//!   backward of two micro-batches, DualPipe's overlap). When any layer gives it, a stage's
//!   `fb` is the sum over its layers of `fb` (`f + b` for a layer without it); otherwise the
//!   stages' `fb` stays unset and an `FB` costs the `f` plus the `b` of its two halves.
//! - `param_bytes` (optional, default 0): bytes of the layer's parameters (with whatever the
//!   optimizer keeps per parameter, if the memory cap should count it).
//! - `activation_bytes` (optional, default 0): bytes the layer keeps alive for one micro-batch
//!   between its forward and its backward.
//! - `name` (optional): shown in messages.
//!
//! Unknown fields are errors; every number must be finite and not negative.

use serde::Deserialize;
use serde_json::Value;

/// One layer of the model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layer {
    /// A name for messages; optional.
    pub name: Option<String>,
    /// Forward time for one micro-batch.
    pub f: f64,
    /// Full backward time (input and weight gradients) for one micro-batch.
    pub b: f64,
    /// The weight-gradient part of `b` (`w <= b`).
    pub w: f64,
    /// An overlapped forward and full backward of two micro-batches (an `FB`); `None`: `f + b`.
    pub fb: Option<f64>,
    /// Bytes of parameters.
    pub param_bytes: f64,
    /// Bytes of activations kept per micro-batch from the forward to the backward.
    pub activation_bytes: f64,
}

/// A whole layers file: the layers in model order and the time unit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layers {
    /// The time unit of the costs, a label (`"ms"`); `None` when the file gives none.
    pub unit: Option<String>,
    /// The layers, first to last.
    pub layers: Vec<Layer>,
}

/// A layers file or list that cannot be used; the message says where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LayersError(pub String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerWire {
    #[serde(default)]
    name: Option<String>,
    f: f64,
    b: f64,
    #[serde(default)]
    w: f64,
    #[serde(default)]
    fb: Option<f64>,
    #[serde(default)]
    param_bytes: f64,
    #[serde(default)]
    activation_bytes: f64,
}

fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or_default();
    if e.line() > 0 {
        format!("line {}, column {}: {text}", e.line(), e.column())
    } else {
        text.to_string()
    }
}

impl Layers {
    /// Reads a layers file (JSON). Errors name the layer index (and name) and the field.
    ///
    /// ```
    /// use dualpipe_partition::Layers;
    /// let layers = Layers::from_json(r#"{"unit": "ms", "layers": [
    ///     {"name": "embed", "f": 1, "b": 2, "w": 1, "param_bytes": 4096, "activation_bytes": 1024},
    ///     {"f": 2, "b": 4}]}"#).unwrap();
    /// assert_eq!(layers.layers.len(), 2);
    /// assert_eq!(layers.layers[1].w, 0.0);
    /// let error = Layers::from_json(r#"{"layers": [{"f": 1, "b": -2}]}"#).unwrap_err();
    /// assert!(error.to_string().contains("layers[0]: b is -2"));
    /// ```
    pub fn from_json(text: &str) -> Result<Layers, LayersError> {
        // The layers file is a cost file with per-layer entries: one schema, owned and checked
        // by the schedule crate (`dualpipe_schedule::Costs`, docs/costs.md).
        let costs = dualpipe_schedule::Costs::from_json(text).map_err(|e| LayersError(e.0))?;
        let layers = Layers {
            unit: (!costs.unit.is_empty()).then_some(costs.unit),
            layers: costs
                .layers
                .into_iter()
                .map(|l| Layer {
                    name: (!l.name.is_empty()).then_some(l.name),
                    f: l.f,
                    b: l.b,
                    w: l.w,
                    fb: l.fb,
                    param_bytes: l.param_bytes,
                    activation_bytes: l.activation_bytes,
                })
                .collect(),
        };
        layers.check()?;
        Ok(layers)
    }

    /// The layers from JSON values, one object per layer (the entries of a file's `layers`).
    pub fn from_values(unit: Option<String>, values: Vec<Value>) -> Result<Layers, LayersError> {
        let mut layers = Vec::with_capacity(values.len());
        for (index, value) in values.into_iter().enumerate() {
            let name = value
                .get("name")
                .and_then(Value::as_str)
                .map(|n| format!(" (`{n}`)"))
                .unwrap_or_default();
            let wire: LayerWire = serde_json::from_value(value)
                .map_err(|e| LayersError(format!("layer {index}{name}: {}", json_error(&e))))?;
            layers.push(Layer {
                name: wire.name,
                f: wire.f,
                b: wire.b,
                w: wire.w,
                fb: wire.fb,
                param_bytes: wire.param_bytes,
                activation_bytes: wire.activation_bytes,
            });
        }
        let layers = Layers { unit, layers };
        layers.check()?;
        Ok(layers)
    }

    /// Checks every layer: finite, not negative, `w <= b`.
    pub fn check(&self) -> Result<(), LayersError> {
        if self.layers.is_empty() {
            return Err(LayersError("the layers list is empty".into()));
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let place = match &layer.name {
                Some(name) => format!("layer {index} (`{name}`)"),
                None => format!("layer {index}"),
            };
            for (field, value) in [
                ("f", layer.f),
                ("b", layer.b),
                ("w", layer.w),
                ("fb", layer.fb.unwrap_or(0.0)),
                ("param_bytes", layer.param_bytes),
                ("activation_bytes", layer.activation_bytes),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(LayersError(format!(
                        "{place}: `{field}` is {value}; it must be finite and not negative"
                    )));
                }
            }
            if layer.w > layer.b {
                return Err(LayersError(format!(
                    "{place}: `w` ({}) exceeds `b` ({}); `w` is the weight-gradient part of the full backward",
                    layer.w, layer.b
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_say_where() {
        for (text, expected) in [
            (r#"{"layers": []}"#, "empty"),
            (
                r#"{"layers": [{"f": 1, "b": 2, "flops": 3}]}"#,
                "layers[0]: unknown field `flops`",
            ),
            (
                r#"{"layers": [{"f": 1, "b": 2}, {"name": "x", "b": 2}]}"#,
                "layers[1]: missing field `f`",
            ),
            (
                r#"{"layers": [{"f": 1, "b": 2, "w": 3}]}"#,
                "layers[0]: w (3) exceeds b (2)",
            ),
            (
                r#"{"layers": [{"f": 1, "b": 2, "param_bytes": -1}]}"#,
                "layers[0]: param_bytes is -1",
            ),
            (r#"{"units": "ms", "layers": []}"#, "unknown field `units`"),
            ("{\n\"layers\": 3}", "line 2"),
        ] {
            let error = Layers::from_json(text).unwrap_err();
            assert!(error.0.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn defaults_and_unit() {
        let layers =
            Layers::from_json(r#"{"unit": "us", "layers": [{"f": 1.5, "b": 3}]}"#).unwrap();
        assert_eq!(layers.unit.as_deref(), Some("us"));
        assert_eq!(
            layers.layers[0],
            Layer {
                name: None,
                f: 1.5,
                b: 3.0,
                ..Layer::default()
            }
        );
    }
}
