//! The cost model of the simulator: how long each compute and each message takes.
//!
//! Times are in abstract units (the same unit everywhere; the Chrome trace reads one unit as one
//! millisecond). Costs are uniform, or overridden per stage so that measured numbers can be fed
//! back. The JSON form (a cost file) is described in `docs/simulate.md`:
//!
//! ```json
//! {"f": 1, "b": 2, "w": 1, "fb": 3, "latency": 0.1, "bandwidth": 1e9, "bytes": 4e6,
//!  "stages": [{"stage": 0, "f": 1.5, "b": 2.5}]}
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

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
}

impl Default for Costs {
    /// F = 1, B = 2, W = 1, FB = F + B, messages free: the units of the DualPipe README.
    fn default() -> Self {
        Costs {
            uniform: StageCosts {
                f: 1.0,
                b: 2.0,
                w: 1.0,
                fb: None,
                bytes: 0.0,
            },
            latency: 0.0,
            bandwidth: None,
            stages: BTreeMap::new(),
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stages: Vec<StageEntry>,
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
}

impl Costs {
    /// Reads a cost file (JSON). Absent fields keep the defaults of [`Costs::default`]; unknown
    /// fields, negative or non-finite values, a stage listed twice, and `w > b` are errors.
    pub fn from_json(text: &str) -> Result<Costs, CostError> {
        let file: CostFile = serde_json::from_str(text).map_err(|e| {
            CostError(format!(
                "line {}, column {}: {}",
                e.line(),
                e.column(),
                e.to_string().split(" at line ").next().unwrap_or_default()
            ))
        })?;
        let mut costs = Costs::default();
        let uniform = &mut costs.uniform;
        for (slot, value) in [
            (&mut uniform.f, file.f),
            (&mut uniform.b, file.b),
            (&mut uniform.w, file.w),
            (&mut uniform.bytes, file.bytes),
            (&mut costs.latency, file.latency),
        ] {
            if let Some(value) = value {
                *slot = value;
            }
        }
        uniform.fb = file.fb.or(uniform.fb);
        costs.bandwidth = file.bandwidth;
        for entry in file.stages {
            let changes = StageOverride {
                f: entry.f,
                b: entry.b,
                w: entry.w,
                fb: entry.fb,
                bytes: entry.bytes,
            };
            if costs.stages.insert(entry.stage, changes).is_some() {
                return Err(CostError(format!(
                    "stage {} is listed twice in `stages`",
                    entry.stage
                )));
            }
        }
        costs.check()?;
        Ok(costs)
    }

    /// The cost file of this model (pretty JSON), readable by [`Costs::from_json`].
    pub fn to_json(&self) -> String {
        let file = CostFile {
            f: Some(self.uniform.f),
            b: Some(self.uniform.b),
            w: Some(self.uniform.w),
            fb: self.uniform.fb,
            latency: Some(self.latency),
            bandwidth: self.bandwidth,
            bytes: Some(self.uniform.bytes),
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
                })
                .collect(),
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

    /// Checks that every value is finite and not negative, that the bandwidth is positive, and
    /// that `w <= b` on every stage (a deferred backward costs `b - w`).
    pub fn check(&self) -> Result<(), CostError> {
        let value = |what: String, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(CostError(format!(
                    "{what} is {v}; costs must be finite and not negative"
                )))
            }
        };
        value("latency".into(), self.latency)?;
        if let Some(bandwidth) = self.bandwidth
            && !(bandwidth.is_finite() && bandwidth > 0.0)
        {
            return Err(CostError(format!(
                "bandwidth is {bandwidth}; it must be a positive number (bytes per time unit)"
            )));
        }
        let mut all = vec![(None, self.uniform)];
        all.extend(self.stages.keys().map(|&s| (Some(s), self.stage(s))));
        for (stage, c) in all {
            let place = match stage {
                Some(s) => format!("stage {s}: "),
                None => String::new(),
            };
            value(format!("{place}f"), c.f)?;
            value(format!("{place}b"), c.b)?;
            value(format!("{place}w"), c.w)?;
            value(format!("{place}bytes"), c.bytes)?;
            if let Some(fb) = c.fb {
                value(format!("{place}fb"), fb)?;
            }
            if c.w > c.b {
                return Err(CostError(format!(
                    "{place}w ({}) exceeds b ({}): a backward with deferred weights would cost b - w < 0",
                    c.w, c.b
                )));
            }
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

    /// The resolved costs of `stage`.
    pub fn stage(&self, stage: u32) -> StageCosts {
        let mut c = self.uniform;
        if let Some(o) = self.stages.get(&stage) {
            c.f = o.f.unwrap_or(c.f);
            c.b = o.b.unwrap_or(c.b);
            c.w = o.w.unwrap_or(c.w);
            c.fb = o.fb.or(c.fb);
            c.bytes = o.bytes.unwrap_or(c.bytes);
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

    /// The same model with every compute cost multiplied by `factor` (messages unchanged):
    /// used to compare families that cut the same model into a different number of stages.
    pub fn scale_compute(&self, factor: f64) -> Costs {
        let scale = |c: &mut StageCosts| {
            c.f *= factor;
            c.b *= factor;
            c.w *= factor;
            c.fb = c.fb.map(|fb| fb * factor);
        };
        let mut costs = self.clone();
        scale(&mut costs.uniform);
        for o in costs.stages.values_mut() {
            for v in [&mut o.f, &mut o.b, &mut o.w, &mut o.fb]
                .into_iter()
                .flatten()
            {
                *v *= factor;
            }
        }
        costs
    }
}

impl fmt::Display for Costs {
    /// The uniform part in `--cost` syntax, plus how many stages are overridden.
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
                "stage 1: w (5) exceeds b (2)",
            ),
            ("{\n\"f\": \"one\"}", "line 2"),
        ] {
            let error = Costs::from_json(text).unwrap_err();
            assert!(error.0.contains(expected), "{text}: {error}");
        }
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
