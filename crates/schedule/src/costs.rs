//! The cost model of the simulator, and the cost file: how long each compute and each message
//! takes, and how many bytes the stages and layers of a model hold.
//!
//! Times are in the unit the cost file names (`"unit"`: `"s"`, `"ms"`, `"us"`, `"ns"`, or
//! `""` for abstract units, the default); the simulator keeps them in that unit. Costs are
//! uniform, or overridden per stage so that measured numbers can be fed back; a file may also
//! list per-layer costs for a partitioner ([`LayerCosts`]). The schema is described in
//! `docs/costs.md`:
//!
//! ```json
//! {"unit": "ms", "microbatch_size": 4, "f": 1, "b": 2, "w": 1, "fb": 3, "latency": 0.1, "bandwidth": 1e9,
//!  "bytes": 4e6, "stages": [{"stage": 0, "f": 1.5, "b": 2.5, "param_bytes": 1e9}],
//!  "layers": [{"name": "embed", "f": 1.0, "b": 2.0, "w": 1.0,
//!              "param_bytes": 4096, "activation_bytes": 1024}]}
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::format::{Instruction, Work};
use serde_json::{Map, Value};

/// The time units a cost file may name, `""` being abstract units.
pub const UNITS: [&str; 5] = ["", "s", "ms", "us", "ns"];

/// The costs of one stage, all resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageCosts {
    /// Forward.
    pub f: f64,
    /// Full backward (input and weight gradients).
    pub b: f64,
    /// Weight gradient alone; a backward with `defer_w` costs `b - w`.
    pub w: f64,
    /// An FB whose forward half is this stage; `None` means the sum of its two halves.
    pub fb: Option<f64>,
    /// Size of this stage's output activation (and of the gradient that comes back for it).
    pub bytes: f64,
    /// Bytes of this stage's parameters (information for planning; the simulator does not use
    /// it).
    pub param_bytes: f64,
    /// Bytes this stage keeps for one micro-batch from its forward to its backward
    /// (information for planning; the simulator does not use it).
    pub activation_bytes: f64,
}

/// Per-stage changes to the uniform costs; absent fields keep the uniform value.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageOverride {
    /// Forward.
    pub f: Option<f64>,
    /// Full backward.
    pub b: Option<f64>,
    /// Weight gradient.
    pub w: Option<f64>,
    /// An FB whose forward half is this stage.
    pub fb: Option<f64>,
    /// Output activation size.
    pub bytes: Option<f64>,
    /// Parameter bytes.
    pub param_bytes: Option<f64>,
    /// Activation bytes kept per micro-batch.
    pub activation_bytes: Option<f64>,
}

/// The costs of one layer of a model, in the order the model runs them: what a partitioner
/// sums into stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerCost {
    /// The layer's name (need not be unique; empty when the file gives none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Forward, per micro-batch.
    pub f: f64,
    /// Full backward (input and weight gradients), per micro-batch.
    pub b: f64,
    /// Weight gradient alone, per micro-batch; at most `b` (0 when absent: nothing deferred).
    #[serde(default)]
    pub w: f64,
    /// An overlapped forward and backward; `None` means `f + b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fb: Option<f64>,
    /// Bytes of the layer's parameters (0 when absent).
    #[serde(default)]
    pub param_bytes: f64,
    /// Bytes the layer keeps for one micro-batch from its forward to its backward (0 when
    /// absent).
    #[serde(default)]
    pub activation_bytes: f64,
}

/// The per-layer part of a cost file: its time unit and its `layers`, in model order.
///
/// ```
/// use dualpipe_schedule::LayerCosts;
/// let text = r#"{"unit": "ms", "layers": [
///     {"name": "embed", "f": 1.0, "b": 2.0, "w": 1.0, "param_bytes": 4096, "activation_bytes": 1024},
///     {"name": "block", "f": 3.0, "b": 6.0, "w": 3.0, "param_bytes": 8192, "activation_bytes": 2048}]}"#;
/// let layers = LayerCosts::from_json(text).unwrap();
/// assert_eq!(layers.unit, "ms");
/// assert_eq!(layers.layers[1].name, "block");
/// assert_eq!(layers.layers[0].param_bytes, 4096.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCosts {
    /// Time unit of `f`, `b`, `w` and `fb` (one of [`UNITS`]; `""` is abstract units).
    pub unit: String,
    /// The layers, in model order.
    pub layers: Vec<LayerCost>,
}

impl LayerCosts {
    /// Reads the layers of a cost file (the whole file is checked as by [`Costs::from_json`]).
    /// A file without `layers`, or with an empty list, is an error.
    pub fn from_json(text: &str) -> Result<LayerCosts, CostError> {
        let costs = Costs::from_json(text)?;
        if costs.layers.is_empty() {
            return Err(CostError(
                "the cost file has no `layers`: per-layer costs are needed here".into(),
            ));
        }
        Ok(LayerCosts {
            unit: costs.unit,
            layers: costs.layers,
        })
    }
}

/// The whole cost model.
///
/// ```
/// use dualpipe_schedule::Costs;
/// let mut costs = Costs::default();
/// costs.apply_assignments("f=1,b=2,w=1,fb=2.5,comm=0.1").unwrap();
/// assert_eq!(costs.stage(3).fb, Some(2.5));
/// assert_eq!(costs.message_time(3), 0.1);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Costs {
    /// The costs of every stage without an override.
    pub uniform: StageCosts,
    /// Fixed time of every message.
    pub latency: f64,
    /// Bytes per time unit; `None` means transfers take no time beyond the latency.
    pub bandwidth: Option<f64>,
    /// Per-stage overrides, by stage.
    pub stages: BTreeMap<u32, StageOverride>,
    /// Time unit of every time above (one of [`UNITS`]); `""` is abstract units.
    pub unit: String,
    /// Per-layer costs, in model order (for a partitioner; the simulator does not use them).
    pub layers: Vec<LayerCost>,
    /// The micro-batch size (samples) the times and the activation and message bytes were
    /// measured at; 1 means per-sample costs. `None`: the file does not say (the simulator
    /// does not need it; a tuner that changes the micro-batch size does, see
    /// [`Costs::at_microbatch_size`]).
    pub microbatch_size: Option<f64>,
}

impl Default for Costs {
    /// F = 1, B = 2, W = 1, FB = F + B, messages free, abstract units: the units of the
    /// DualPipe README.
    fn default() -> Self {
        Costs {
            uniform: StageCosts {
                f: 1.0,
                b: 2.0,
                w: 1.0,
                fb: None,
                bytes: 0.0,
                param_bytes: 0.0,
                activation_bytes: 0.0,
            },
            latency: 0.0,
            bandwidth: None,
            stages: BTreeMap::new(),
            unit: String::new(),
            layers: Vec::new(),
            microbatch_size: None,
        }
    }
}

/// A cost model that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CostError(pub String);

/// The JSON shape of a cost file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CostFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    microbatch_size: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per: Option<Per>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bandwidth: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    param_bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    activation_bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stages: Vec<StageEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    layers: Vec<LayerCost>,
}

/// `"per"`: what one set of costs is for. Only `"sample"` (the same as `"microbatch_size": 1`).
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Per {
    Sample,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageEntry {
    stage: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    param_bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    activation_bytes: Option<f64>,
}

/// Where a cost file does not fit its shape: the first top-level field, or `stages[i]` /
/// `layers[i]` entry (and its field, where the field's type is wrong), that fails on its own.
fn locate(value: &Value) -> Option<String> {
    let Value::Object(fields) = value else {
        return None;
    };
    for (key, v) in fields {
        match (key.as_str(), v) {
            ("stages" | "layers", Value::Array(list)) => {
                for (i, item) in list.iter().enumerate() {
                    let failed = if key == "stages" {
                        serde_json::from_value::<StageEntry>(item.clone()).is_err()
                    } else {
                        serde_json::from_value::<LayerCost>(item.clone()).is_err()
                    };
                    if !failed {
                        continue;
                    }
                    let place = format!("{key}[{i}]");
                    if let Value::Object(entry) = item {
                        for (field, v) in entry {
                            let fits = match field.as_str() {
                                "name" => v.is_string(),
                                "stage" => v.as_u64().is_some_and(|s| s <= u64::from(u32::MAX)),
                                _ => v.is_number(),
                            };
                            if !fits {
                                return Some(format!("{place}.{field}"));
                            }
                        }
                    }
                    return Some(place);
                }
            }
            _ => {
                let alone = Value::Object(Map::from_iter([(key.clone(), v.clone())]));
                if serde_json::from_value::<CostFile>(alone).is_err() {
                    return Some(key.clone());
                }
            }
        }
    }
    None
}

fn check_value(what: &str, v: f64) -> Result<(), CostError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(CostError(format!(
            "{what} is {v}; costs must be finite and not negative"
        )))
    }
}

/// Checks the values of one stage or layer; `place` is prefixed to the field names.
fn check_entry(place: &str, c: &StageCosts) -> Result<(), CostError> {
    for (name, value) in [
        ("f", c.f),
        ("b", c.b),
        ("w", c.w),
        ("bytes", c.bytes),
        ("param_bytes", c.param_bytes),
        ("activation_bytes", c.activation_bytes),
    ] {
        check_value(&format!("{place}{name}"), value)?;
    }
    if let Some(fb) = c.fb {
        check_value(&format!("{place}fb"), fb)?;
    }
    if c.w > c.b {
        return Err(CostError(format!(
            "{place}w ({}) exceeds b ({}): a backward with deferred weights would cost b - w < 0",
            c.w, c.b
        )));
    }
    Ok(())
}

/// Microseconds in one `unit` (one of [`UNITS`]); `None` for abstract units (`""`) and
/// unknown names.
pub fn unit_us(unit: &str) -> Option<f64> {
    match unit {
        "s" => Some(1e6),
        "ms" => Some(1e3),
        "us" => Some(1.0),
        "ns" => Some(1e-3),
        _ => None,
    }
}

impl Costs {
    /// Reads a cost file (JSON; the schema is in `docs/costs.md`). Absent fields keep the
    /// defaults of [`Costs::default`]. Unknown fields, a unit not in [`UNITS`], negative or
    /// non-finite values, a stage listed twice, and `w > b` are errors that name the field and
    /// the entry (`stages[2]`, `layers[0]`).
    pub fn from_json(text: &str) -> Result<Costs, CostError> {
        let file: CostFile = serde_json::from_str(text).map_err(|e| {
            let message = e.to_string();
            let message = message.split(" at line ").next().unwrap_or_default();
            let place = if e.is_data() {
                serde_json::from_str::<Value>(text)
                    .ok()
                    .as_ref()
                    .and_then(locate)
                    .map(|place| format!("{place}: "))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            CostError(format!(
                "line {}, column {}: {place}{message}",
                e.line(),
                e.column(),
            ))
        })?;
        let mut costs = Costs::default();
        let uniform = &mut costs.uniform;
        for (slot, value) in [
            (&mut uniform.f, file.f),
            (&mut uniform.b, file.b),
            (&mut uniform.w, file.w),
            (&mut uniform.bytes, file.bytes),
            (&mut uniform.param_bytes, file.param_bytes),
            (&mut uniform.activation_bytes, file.activation_bytes),
            (&mut costs.latency, file.latency),
        ] {
            if let Some(value) = value {
                *slot = value;
            }
        }
        uniform.fb = file.fb.or(uniform.fb);
        costs.bandwidth = file.bandwidth;
        costs.microbatch_size = match (file.per, file.microbatch_size) {
            (Some(Per::Sample), Some(size)) if size != 1.0 => {
                return Err(CostError(format!(
                    "per: \"sample\" means a micro-batch size of 1, but microbatch_size is {size}; give one of the two"
                )));
            }
            (Some(Per::Sample), _) => Some(1.0),
            (None, size) => size,
        };
        costs.unit = file.unit.unwrap_or_default();
        costs.check_unit()?;
        check_entry("", &costs.uniform)?;
        for (index, entry) in file.stages.into_iter().enumerate() {
            let changes = StageOverride {
                f: entry.f,
                b: entry.b,
                w: entry.w,
                fb: entry.fb,
                bytes: entry.bytes,
                param_bytes: entry.param_bytes,
                activation_bytes: entry.activation_bytes,
            };
            if costs.stages.insert(entry.stage, changes).is_some() {
                return Err(CostError(format!(
                    "stages[{index}]: stage {} is listed twice in `stages`",
                    entry.stage
                )));
            }
            check_entry(
                &format!("stages[{index}] (stage {}): ", entry.stage),
                &costs.stage(entry.stage),
            )?;
        }
        costs.layers = file.layers;
        costs.check()?;
        Ok(costs)
    }

    /// The cost file of this model (pretty JSON), readable by [`Costs::from_json`].
    pub fn to_json(&self) -> String {
        let nonzero = |v: f64| (v != 0.0).then_some(v);
        let file = CostFile {
            unit: (!self.unit.is_empty()).then(|| self.unit.clone()),
            microbatch_size: self.microbatch_size,
            per: None,
            f: Some(self.uniform.f),
            b: Some(self.uniform.b),
            w: Some(self.uniform.w),
            fb: self.uniform.fb,
            latency: Some(self.latency),
            bandwidth: self.bandwidth,
            bytes: Some(self.uniform.bytes),
            param_bytes: nonzero(self.uniform.param_bytes),
            activation_bytes: nonzero(self.uniform.activation_bytes),
            stages: self
                .stages
                .iter()
                .map(|(&stage, o)| StageEntry {
                    stage,
                    f: o.f,
                    b: o.b,
                    w: o.w,
                    fb: o.fb,
                    bytes: o.bytes,
                    param_bytes: o.param_bytes,
                    activation_bytes: o.activation_bytes,
                })
                .collect(),
            layers: self.layers.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("costs serialize");
        text.push('\n');
        text
    }

    /// Sets one uniform cost by name: `f`, `b`, `w`, `fb`, `comm` (or `latency`), `bytes`,
    /// `bandwidth`.
    pub fn set(&mut self, key: &str, value: f64) -> Result<(), CostError> {
        match key {
            "f" => self.uniform.f = value,
            "b" => self.uniform.b = value,
            "w" => self.uniform.w = value,
            "fb" => self.uniform.fb = Some(value),
            "comm" | "latency" => self.latency = value,
            "bytes" => self.uniform.bytes = value,
            "bandwidth" => self.bandwidth = Some(value),
            _ => {
                return Err(CostError(format!(
                    "unknown cost `{key}`; known: f, b, w, fb, comm (or latency), bytes, bandwidth"
                )));
            }
        }
        Ok(())
    }

    /// Applies a list like `f=1,b=2,w=1,fb=3,comm=0` with [`Costs::set`], then checks the
    /// result.
    pub fn apply_assignments(&mut self, list: &str) -> Result<(), CostError> {
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(CostError(format!(
                    "`{item}` is not of the form name=value (e.g. f=1,b=2,w=1,fb=3,comm=0)"
                )));
            };
            let key = key.trim();
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| CostError(format!("`{item}`: `{}` is not a number", value.trim())))?;
            self.set(key, value)?;
        }
        self.check()
    }

    fn check_unit(&self) -> Result<(), CostError> {
        if UNITS.contains(&self.unit.as_str()) {
            Ok(())
        } else {
            Err(CostError(format!(
                "unit `{}` is not known; use \"s\", \"ms\", \"us\", \"ns\", or \"\" for abstract units",
                self.unit
            )))
        }
    }

    /// Checks the unit, that every value is finite and not negative, that the bandwidth is
    /// positive, and that `w <= b` on every stage and layer (a deferred backward costs
    /// `b - w`).
    pub fn check(&self) -> Result<(), CostError> {
        self.check_unit()?;
        check_value("latency", self.latency)?;
        if let Some(size) = self.microbatch_size
            && !(size.is_finite() && size > 0.0)
        {
            return Err(CostError(format!(
                "microbatch_size is {size}; it must be a positive number of samples"
            )));
        }
        if let Some(bandwidth) = self.bandwidth
            && !(bandwidth.is_finite() && bandwidth > 0.0)
        {
            return Err(CostError(format!(
                "bandwidth is {bandwidth}; it must be a positive number (bytes per time unit)"
            )));
        }
        check_entry("", &self.uniform)?;
        for &s in self.stages.keys() {
            check_entry(&format!("stage {s}: "), &self.stage(s))?;
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let resolved = StageCosts {
                f: layer.f,
                b: layer.b,
                w: layer.w,
                fb: layer.fb,
                bytes: 0.0,
                param_bytes: layer.param_bytes,
                activation_bytes: layer.activation_bytes,
            };
            let place = if layer.name.is_empty() {
                format!("layers[{index}]: ")
            } else {
                format!("layers[{index}] ({}): ", layer.name)
            };
            check_entry(&place, &resolved)?;
        }
        Ok(())
    }

    /// Checks that every per-stage override names a stage of a schedule with `num_stages`.
    pub fn check_stages(&self, num_stages: u32) -> Result<(), CostError> {
        match self.stages.keys().find(|&&s| s >= num_stages) {
            Some(s) => Err(CostError(format!(
                "the costs override stage {s}, but the schedule has {num_stages} stages (0..{})",
                num_stages.saturating_sub(1)
            ))),
            None => Ok(()),
        }
    }

    /// The number of stages the per-stage overrides describe: the highest stage overridden
    /// plus one; `None` when there are no overrides (uniform costs fit any layout).
    pub fn described_stages(&self) -> Option<u32> {
        self.stages.keys().next_back().map(|&s| s.saturating_add(1))
    }

    /// The resolved costs of `stage`.
    pub fn stage(&self, stage: u32) -> StageCosts {
        let mut c = self.uniform;
        if let Some(o) = self.stages.get(&stage) {
            c.f = o.f.unwrap_or(c.f);
            c.b = o.b.unwrap_or(c.b);
            c.w = o.w.unwrap_or(c.w);
            c.fb = o.fb.or(c.fb);
            c.bytes = o.bytes.unwrap_or(c.bytes);
            c.param_bytes = o.param_bytes.unwrap_or(c.param_bytes);
            c.activation_bytes = o.activation_bytes.unwrap_or(c.activation_bytes);
        }
        c
    }

    /// Time of a message across the boundary after `stage` (its output activation, or the
    /// gradient that comes back for it): latency plus bytes over bandwidth.
    pub fn message_time(&self, stage: u32) -> f64 {
        let bytes = self.stage(stage).bytes;
        match self.bandwidth {
            Some(bandwidth) if bytes > 0.0 => self.latency + bytes / bandwidth,
            _ => self.latency,
        }
    }

    /// The unit for people: the file's unit, or `abstract units`.
    pub fn unit_label(&self) -> &str {
        if self.unit.is_empty() {
            "abstract units"
        } else {
            &self.unit
        }
    }

    /// Microseconds per time unit, `None` for abstract units.
    pub fn unit_us(&self) -> Option<f64> {
        unit_us(&self.unit)
    }

    /// The same model with every compute cost multiplied by `factor` (messages unchanged).
    pub fn scale_compute(&self, factor: f64) -> Costs {
        self.map_compute(|v| v * factor)
    }

    /// Whole-model costs (per micro-batch) divided over `stages` equal stages: every compute
    /// cost (f, b, w, fb, uniform and overridden) divided by `stages`; messages (latency,
    /// bytes, bandwidth) and memory sizes unchanged.
    pub fn per_stage_of_model(&self, stages: u32) -> Costs {
        let stages = f64::from(stages.max(1));
        self.map_compute(|v| v / stages)
    }

    /// The same model at a micro-batch of `size` samples, from the size the costs were
    /// measured at ([`Costs::microbatch_size`]): times (`f`, `b`, `w`, `fb`, of the top level,
    /// of every stage and of every layer), message `bytes` and `activation_bytes` scale
    /// linearly with the size; `latency`, `bandwidth` and `param_bytes` do not. The result
    /// says `size`. An error when the costs do not say their size, or `size` is not positive.
    ///
    /// ```
    /// use dualpipe_schedule::Costs;
    /// let costs = Costs::from_json(r#"{"microbatch_size": 2, "f": 1, "b": 2, "w": 1,
    ///     "latency": 0.5, "bytes": 100, "param_bytes": 64, "activation_bytes": 10}"#).unwrap();
    /// let four = costs.at_microbatch_size(4.0).unwrap();
    /// let s = four.stage(0);
    /// assert_eq!((s.f, s.b, s.bytes, s.activation_bytes, s.param_bytes), (2.0, 4.0, 200.0, 20.0, 64.0));
    /// assert_eq!((four.latency, four.microbatch_size), (0.5, Some(4.0)));
    /// ```
    pub fn at_microbatch_size(&self, size: f64) -> Result<Costs, CostError> {
        let Some(measured) = self.microbatch_size else {
            return Err(CostError(
                "the costs do not say the micro-batch size they were measured at: add \"microbatch_size\": SAMPLES (or \"per\": \"sample\") to the cost file".into(),
            ));
        };
        if !(size.is_finite() && size > 0.0) {
            return Err(CostError(format!(
                "micro-batch size {size}: it must be a positive number of samples"
            )));
        }
        let factor = size / measured;
        let scale = |v: f64| v * factor;
        let mut costs = self.map_compute(scale);
        costs.microbatch_size = Some(size);
        let c = &mut costs.uniform;
        c.bytes = scale(c.bytes);
        c.activation_bytes = scale(c.activation_bytes);
        for o in costs.stages.values_mut() {
            for v in [&mut o.bytes, &mut o.activation_bytes]
                .into_iter()
                .flatten()
            {
                *v = scale(*v);
            }
        }
        for layer in &mut costs.layers {
            layer.f = scale(layer.f);
            layer.b = scale(layer.b);
            layer.w = scale(layer.w);
            layer.fb = layer.fb.map(scale);
            layer.activation_bytes = scale(layer.activation_bytes);
        }
        Ok(costs)
    }

    fn map_compute(&self, op: impl Fn(f64) -> f64) -> Costs {
        let mut costs = self.clone();
        let c = &mut costs.uniform;
        c.f = op(c.f);
        c.b = op(c.b);
        c.w = op(c.w);
        c.fb = c.fb.map(&op);
        for o in costs.stages.values_mut() {
            for v in [&mut o.f, &mut o.b, &mut o.w, &mut o.fb]
                .into_iter()
                .flatten()
            {
                *v = op(*v);
            }
        }
        costs
    }
}

impl fmt::Display for Costs {
    /// The uniform part in `--cost` syntax, plus how many stages are overridden. The unit is
    /// not included: see [`Costs::unit_label`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = &self.uniform;
        write!(f, "f={},b={},w={},fb=", u.f, u.b, u.w)?;
        match u.fb {
            Some(fb) => write!(f, "{fb}")?,
            None => f.write_str("f+b")?,
        }
        write!(f, ",comm={}", self.latency)?;
        if let Some(bandwidth) = self.bandwidth {
            write!(f, ",bytes={},bandwidth={bandwidth}", u.bytes)?;
        }
        if !self.stages.is_empty() {
            write!(f, " ({} stages overridden)", self.stages.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_readme_units() {
        let c = Costs::default().stage(0);
        assert_eq!((c.f, c.b, c.w, c.fb), (1.0, 2.0, 1.0, None));
        assert_eq!(Costs::default().message_time(0), 0.0);
    }

    #[test]
    fn assignments_set_uniform_costs() {
        let mut costs = Costs::default();
        costs
            .apply_assignments("f=2, b=3,w=0.5,fb=4,comm=0.25,bytes=100,bandwidth=50")
            .unwrap();
        let c = costs.stage(7);
        assert_eq!((c.f, c.b, c.w, c.fb), (2.0, 3.0, 0.5, Some(4.0)));
        assert_eq!(costs.message_time(7), 0.25 + 2.0);
    }

    #[test]
    fn bad_assignments_say_what_is_wrong() {
        for (list, expected) in [
            ("f", "not of the form name=value"),
            ("f=x", "`x` is not a number"),
            ("q=1", "unknown cost `q`"),
            ("f=-1", "f is -1"),
            ("w=3", "w (3) exceeds b (2)"),
            ("bandwidth=0", "bandwidth is 0"),
            ("comm=inf", "latency is inf"),
        ] {
            let error = Costs::default().apply_assignments(list).unwrap_err();
            assert!(error.0.contains(expected), "{list}: {error}");
        }
    }

    #[test]
    fn cost_file_overrides_per_stage_and_round_trips() {
        let text = r#"{"f": 1, "b": 2, "w": 1, "latency": 0.5, "bandwidth": 10, "bytes": 20,
            "stages": [{"stage": 3, "f": 1.5, "fb": 3.5}, {"stage": 0, "bytes": 0}]}"#;
        let costs = Costs::from_json(text).unwrap();
        assert_eq!(costs.stage(3).f, 1.5);
        assert_eq!(costs.stage(3).b, 2.0);
        assert_eq!(costs.stage(3).fb, Some(3.5));
        assert_eq!(costs.stage(2).fb, None);
        assert_eq!(costs.message_time(2), 0.5 + 2.0);
        assert_eq!(costs.message_time(0), 0.5);
        assert_eq!(Costs::from_json(&costs.to_json()).unwrap(), costs);
        assert!(costs.check_stages(4).is_ok());
        let error = costs.check_stages(3).unwrap_err();
        assert!(error.0.contains("override stage 3"), "{error}");
    }

    #[test]
    fn bad_cost_files_say_where() {
        for (text, expected) in [
            (r#"{"f": 1, "flops": 2}"#, "unknown field `flops`"),
            (r#"{"stages": [{"stage": 1, "x": 2}]}"#, "unknown field `x`"),
            (
                r#"{"stages": [{"stage": 1}, {"stage": 1}]}"#,
                "stage 1 is listed twice",
            ),
            (
                r#"{"stages": [{"stage": 1, "w": 5}]}"#,
                "stages[0] (stage 1): w (5) exceeds b (2)",
            ),
            ("{\n\"f\": \"one\"}", "line 2, column 10: f: invalid type"),
            (
                r#"{"stages": [{"stage": 0}, {"stage": 2, "b": "x"}]}"#,
                "stages[1].b: invalid type",
            ),
            (
                r#"{"stages": [{"stage": 0, "f": -1}]}"#,
                "stages[0] (stage 0): f is -1",
            ),
            (
                r#"{"stages": [{"f": 1}]}"#,
                "stages[0]: missing field `stage`",
            ),
            (r#"{"unit": "msec"}"#, "unit `msec` is not known"),
            (r#"{"unit": 3}"#, "unit: invalid type"),
            (r#"{"param_bytes": -3}"#, "param_bytes is -3"),
            (
                r#"{"layers": [{"name": "a", "f": 1, "b": 2, "w": 1}, {"name": "b", "b": 2}]}"#,
                "layers[1]: missing field `f`",
            ),
            (
                r#"{"layers": [{"name": "a", "f": 1, "b": 2, "w": 1, "flops": 3}]}"#,
                "layers[0]: unknown field `flops`",
            ),
            (
                r#"{"layers": [{"name": 7, "f": 1, "b": 2, "w": 1}]}"#,
                "layers[0].name: invalid type",
            ),
            (
                r#"{"layers": [{"name": "a", "f": 1, "b": 2, "w": 3}]}"#,
                "layers[0] (a): w (3) exceeds b (2)",
            ),
            (
                r#"{"layers": [{"name": "a", "f": 1, "b": 2, "w": 1, "activation_bytes": -1}]}"#,
                "layers[0] (a): activation_bytes is -1",
            ),
            (
                r#"{"layers": [{"name": "a", "f": 1e999, "b": 2, "w": 1}]}"#,
                "line 1, column 36: number out of range",
            ),
        ] {
            let error = Costs::from_json(text).unwrap_err();
            assert!(error.0.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn files_without_the_new_fields_load_as_before() {
        // The shape written before units, byte counts and layers existed.
        let old = r#"{"f": 2, "b": 4, "w": 2, "fb": 5, "latency": 0.5, "bandwidth": 10,
            "bytes": 20, "stages": [{"stage": 1, "f": 3, "bytes": 0}]}"#;
        let costs = Costs::from_json(old).unwrap();
        assert_eq!(costs.unit, "");
        assert_eq!(costs.unit_label(), "abstract units");
        assert_eq!(costs.unit_us(), None);
        assert!(costs.layers.is_empty());
        let s1 = costs.stage(1);
        assert_eq!(
            (s1.f, s1.b, s1.w, s1.fb, s1.bytes),
            (3.0, 4.0, 2.0, Some(5.0), 0.0)
        );
        assert_eq!((s1.param_bytes, s1.activation_bytes), (0.0, 0.0));
        // Written back, the file has no new fields either.
        let text = costs.to_json();
        for field in ["unit", "param_bytes", "activation_bytes", "layers"] {
            assert!(!text.contains(field), "{text}");
        }
        assert_eq!(Costs::from_json(&text).unwrap(), costs);
    }

    #[test]
    fn the_profilers_documents_load() {
        // The torch profiler's document, before and after it names its unit.
        let stages = r#""f": 0.5, "b": 1.0, "w": 0.4, "fb": 1.3,
            "stages": [{"stage": 0, "f": 0.5, "b": 1.0, "w": 0.4, "fb": 1.3},
                       {"stage": 1, "f": 0.6, "b": 1.1, "w": 0.5, "fb": 1.4}]"#;
        let before = Costs::from_json(&format!("{{{stages}}}")).unwrap();
        let after = Costs::from_json(&format!("{{\"unit\": \"ms\", {stages}}}")).unwrap();
        assert_eq!(after.unit, "ms");
        assert_eq!(after.unit_us(), Some(1000.0));
        assert_eq!(after.stage(1), before.stage(1));
        assert_eq!(after.stage(1).b, 1.1);
    }

    #[test]
    fn units_bytes_and_layers_round_trip() {
        let text = r#"{"unit": "us", "param_bytes": 100, "activation_bytes": 50,
            "stages": [{"stage": 2, "param_bytes": 7, "activation_bytes": 3}],
            "layers": [{"name": "embed", "f": 1, "b": 2, "w": 1},
                       {"name": "block", "f": 2, "b": 4, "w": 2, "fb": 5.5,
                        "param_bytes": 8, "activation_bytes": 9}]}"#;
        let costs = Costs::from_json(text).unwrap();
        assert_eq!(costs.unit_label(), "us");
        assert_eq!(costs.stage(0).param_bytes, 100.0);
        assert_eq!(costs.stage(2).param_bytes, 7.0);
        assert_eq!(costs.stage(2).activation_bytes, 3.0);
        assert_eq!(costs.layers.len(), 2);
        assert_eq!(costs.layers[0].param_bytes, 0.0);
        assert_eq!(costs.layers[0].fb, None);
        assert_eq!(costs.layers[1].fb, Some(5.5));
        assert_eq!(Costs::from_json(&costs.to_json()).unwrap(), costs);
        assert_eq!(costs.described_stages(), Some(3));
        assert_eq!(Costs::default().described_stages(), None);
    }

    #[test]
    fn the_partitioners_layer_file_is_a_cost_file() {
        let text = r#"{"unit": "ms", "layers": [
            {"name": "embed", "f": 1.0, "b": 2.0, "w": 1.0, "param_bytes": 4096, "activation_bytes": 1024},
            {"name": "block", "f": 4.0, "b": 8.0, "w": 4.0, "param_bytes": 65536, "activation_bytes": 8192}]}"#;
        let costs = Costs::from_json(text).unwrap();
        assert_eq!(costs.unit, "ms");
        assert_eq!(costs.uniform, Costs::default().uniform);
        let layers = LayerCosts::from_json(text).unwrap();
        assert_eq!(layers.unit, "ms");
        assert_eq!(layers.layers, costs.layers);
        assert_eq!(
            layers.layers[1],
            LayerCost {
                name: "block".into(),
                f: 4.0,
                b: 8.0,
                w: 4.0,
                fb: None,
                param_bytes: 65536.0,
                activation_bytes: 8192.0,
            }
        );
        let error = LayerCosts::from_json(r#"{"f": 1}"#).unwrap_err();
        assert!(error.0.contains("no `layers`"), "{error}");
        let error = LayerCosts::from_json(r#"{"layers": [{"name": "x"}]}"#).unwrap_err();
        assert!(error.0.contains("layers[0]: missing field `f`"), "{error}");
    }

    #[test]
    fn the_documented_examples_parse() {
        let doc = include_str!("../../../docs/costs.md");
        let mut blocks = 0;
        for block in doc.split("```json\n").skip(1) {
            let json = block.split("```").next().unwrap();
            let costs = Costs::from_json(json).unwrap_or_else(|e| panic!("{e}\n{json}"));
            assert_eq!(costs.unit, "ms", "{json}");
            assert_eq!(Costs::from_json(&costs.to_json()).unwrap(), costs);
            blocks += 1;
        }
        assert_eq!(blocks, 4);
        let layers = doc.split("```json\n").nth(2).unwrap();
        let layers = LayerCosts::from_json(layers.split("```").next().unwrap()).unwrap();
        assert_eq!(layers.layers.len(), 3);
    }

    #[test]
    fn whole_model_costs_divide_over_the_stages() {
        let mut model = Costs::default();
        model
            .apply_assignments("f=8,b=16,w=8,fb=20,comm=0.5")
            .unwrap();
        let per_stage = model.per_stage_of_model(16);
        let c = per_stage.stage(3);
        assert_eq!((c.f, c.b, c.w, c.fb), (0.5, 1.0, 0.5, Some(1.25)));
        assert_eq!(per_stage.message_time(3), 0.5);
        // Division is exact where a product with the reciprocal is not.
        model.apply_assignments("f=3").unwrap();
        assert_eq!(model.per_stage_of_model(6).stage(0).f, 0.5);
    }

    #[test]
    fn microbatch_size_scales_times_and_activation_bytes_not_parameters() {
        let text = r#"{"unit": "ms", "microbatch_size": 4, "f": 2, "b": 4, "w": 2, "fb": 5,
            "latency": 0.1, "bandwidth": 1e6, "bytes": 400, "param_bytes": 1000,
            "activation_bytes": 80,
            "stages": [{"stage": 1, "f": 4, "bytes": 40, "activation_bytes": 8, "param_bytes": 7}],
            "layers": [{"name": "l", "f": 8, "b": 8, "w": 4, "fb": 12,
                        "param_bytes": 3, "activation_bytes": 16}]}"#;
        let costs = Costs::from_json(text).unwrap();
        assert_eq!(costs.microbatch_size, Some(4.0));
        assert_eq!(Costs::from_json(&costs.to_json()).unwrap(), costs);
        let one = costs.at_microbatch_size(1.0).unwrap();
        assert_eq!(one.microbatch_size, Some(1.0));
        let s0 = one.stage(0);
        assert_eq!(
            (s0.f, s0.b, s0.w, s0.fb, s0.bytes, s0.activation_bytes),
            (0.5, 1.0, 0.5, Some(1.25), 100.0, 20.0)
        );
        assert_eq!(s0.param_bytes, 1000.0);
        let s1 = one.stage(1);
        assert_eq!(
            (s1.f, s1.bytes, s1.activation_bytes, s1.param_bytes),
            (1.0, 10.0, 2.0, 7.0)
        );
        assert_eq!((one.latency, one.bandwidth), (0.1, Some(1e6)));
        let l = &one.layers[0];
        assert_eq!((l.f, l.b, l.w, l.fb), (2.0, 2.0, 1.0, Some(3.0)));
        assert_eq!((l.param_bytes, l.activation_bytes), (3.0, 4.0));
        // Back and forth is the identity.
        assert_eq!(one.at_microbatch_size(4.0).unwrap(), costs);
    }

    #[test]
    fn per_sample_is_microbatch_size_one() {
        let costs = Costs::from_json(r#"{"per": "sample", "f": 1}"#).unwrap();
        assert_eq!(costs.microbatch_size, Some(1.0));
        assert_eq!(costs.at_microbatch_size(3.0).unwrap().stage(0).f, 3.0);
        for (text, expected) in [
            (r#"{"per": "batch"}"#, "per: unknown variant `batch`"),
            (
                r#"{"per": "sample", "microbatch_size": 2}"#,
                "microbatch_size is 2; give one of the two",
            ),
            (r#"{"microbatch_size": 0}"#, "microbatch_size is 0"),
            (
                r#"{"microbatch_size": "x"}"#,
                "microbatch_size: invalid type",
            ),
        ] {
            let error = Costs::from_json(text).unwrap_err();
            assert!(error.0.contains(expected), "{text}: {error}");
        }
        let error = Costs::default().at_microbatch_size(2.0).unwrap_err();
        assert!(error.0.contains("\"microbatch_size\""), "{error}");
    }

    #[test]
    fn scaling_multiplies_compute_only() {
        let mut costs = Costs::default();
        costs.apply_assignments("fb=3,comm=1").unwrap();
        costs.stages.insert(
            1,
            StageOverride {
                b: Some(4.0),
                ..StageOverride::default()
            },
        );
        let half = costs.scale_compute(0.5);
        assert_eq!(half.stage(0).f, 0.5);
        assert_eq!(half.stage(0).fb, Some(1.5));
        assert_eq!(half.stage(1).b, 2.0);
        assert_eq!(half.message_time(0), 1.0);
    }
}

/// Every stage's compute durations under some [`Costs`], resolved once: what the simulator
/// charges for each compute instruction, for callers that time many orders.
#[derive(Clone, Debug, PartialEq)]
pub struct ComputeCosts {
    f: Vec<f64>,
    b: Vec<f64>,
    w: Vec<f64>,
    fb: Vec<Option<f64>>,
}

impl ComputeCosts {
    /// The durations of stages `0..num_stages` under `costs`.
    pub fn new(costs: &Costs, num_stages: u32) -> Self {
        let all: Vec<_> = (0..num_stages).map(|s| costs.stage(s)).collect();
        ComputeCosts {
            f: all.iter().map(|c| c.f).collect(),
            b: all.iter().map(|c| c.b).collect(),
            w: all.iter().map(|c| c.w).collect(),
            fb: all.iter().map(|c| c.fb).collect(),
        }
    }

    /// How long `instruction` computes, as the simulator counts it: a full B costs `b`, a
    /// deferring B `b - w`, an FB its stage's `fb` or else `f + b`; 0 for anything that is
    /// not a compute. Its stages must be below the `num_stages` it was built for.
    pub fn duration(&self, instruction: Instruction) -> f64 {
        let s = |w: Work| w.stage as usize;
        match instruction {
            Instruction::Forward(w) => self.f[s(w)],
            Instruction::Backward {
                work,
                defer_w: false,
            } => self.b[s(work)],
            Instruction::Backward {
                work,
                defer_w: true,
            } => self.b[s(work)] - self.w[s(work)],
            Instruction::Weight(w) => self.w[s(w)],
            Instruction::ForwardBackward { f, b } => {
                self.fb[s(f)].unwrap_or(self.f[s(f)] + self.b[s(b)])
            }
            _ => 0.0,
        }
    }
}
