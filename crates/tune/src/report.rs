//! The tuner's result as one JSON document: what `dualpipe tune --json` prints and what
//! `dualpipe_rs.tune` returns, built here once.

use serde::Serialize;

use dualpipe_schedule::Costs;

use crate::{Candidate, TuneRequest, Tuning};

/// One ranked candidate, as the report shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Family name, as `dualpipe plan` spells it.
    pub family: String,
    /// Samples per micro-batch.
    pub microbatch_size: u32,
    /// Micro-batches per step.
    pub microbatches: u32,
    /// Stages of the family.
    pub stages: u32,
    /// Where the per-stage costs come from: `stages`, `layers` or `model`.
    pub basis: &'static str,
    /// Simulated step time, in the report's unit.
    pub step_time: f64,
    /// Step time divided by the global batch.
    pub time_per_sample: f64,
    /// Share of rank time spent idle.
    pub bubble_share: f64,
    /// Most bytes one rank holds (parameters plus live activations).
    pub peak_memory: f64,
    /// Parameter bytes held by that rank.
    pub parameter_bytes: f64,
    /// Live activation bytes of that rank at its peak.
    pub activation_bytes: f64,
    /// Most live activations on one rank, in the family's stages.
    pub peak_activations: u32,
    /// Parameters held by the busiest rank, in N-ths of the model.
    pub parameter_copies: f64,
}

impl Row {
    /// The row of one candidate.
    pub fn new(c: &Candidate) -> Row {
        Row {
            family: c.family().to_string(),
            microbatch_size: c.microbatch_size,
            microbatches: c.microbatches,
            stages: c.stages,
            basis: c.basis.name(),
            step_time: c.step_time,
            time_per_sample: c.time_per_sample,
            bubble_share: c.bubble_share,
            peak_memory: c.peak_memory,
            parameter_bytes: c.parameter_bytes,
            activation_bytes: c.peak_memory - c.parameter_bytes,
            peak_activations: c.peak_activations,
            parameter_copies: c.parameter_copies,
        }
    }
}

/// A family that does not accept one micro-batch count, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Refusal {
    /// Family name.
    pub family: String,
    /// Samples per micro-batch.
    pub microbatch_size: u32,
    /// Micro-batches per step.
    pub microbatches: u32,
    /// The planner's reason.
    pub reason: String,
}

/// The whole result of one tuning, ready to serialize.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Number of ranks N.
    pub ranks: u32,
    /// Samples per step.
    pub global_batch: u32,
    /// The execution model simulated: `blocking` or `async`.
    pub model: String,
    /// Time unit of every time (`""`: abstract units).
    pub unit: String,
    /// The micro-batch size the costs were measured at.
    pub measured_microbatch_size: f64,
    /// The memory cap applied, in bytes.
    pub memory_cap: Option<f64>,
    /// The micro-batch sizes tried, ascending.
    pub microbatch_sizes: Vec<u32>,
    /// Sizes asked for that do not divide the global batch.
    pub skipped_sizes: Vec<u32>,
    /// The fastest candidate within the cap.
    pub best: Option<Row>,
    /// Candidates within the cap, fastest first.
    pub ranked: Vec<Row>,
    /// Candidates over the cap, least memory first.
    pub over_cap: Vec<Row>,
    /// Family and size pairs the planner refuses.
    pub not_applicable: Vec<Refusal>,
}

impl Report {
    /// The report of `tuning`, made for `request` under `costs`.
    pub fn new(request: &TuneRequest, costs: &Costs, tuning: &Tuning) -> Report {
        Report {
            ranks: request.ranks,
            global_batch: request.global_batch,
            model: request.model.to_string(),
            unit: costs.unit.clone(),
            measured_microbatch_size: costs.microbatch_size.unwrap_or(1.0),
            memory_cap: tuning.memory_cap,
            microbatch_sizes: tuning.sizes.clone(),
            skipped_sizes: tuning.skipped_sizes.clone(),
            best: tuning.best().map(Row::new),
            ranked: tuning.ranked.iter().map(Row::new).collect(),
            over_cap: tuning.over_cap.iter().map(Row::new).collect(),
            not_applicable: tuning
                .not_applicable
                .iter()
                .map(|n| Refusal {
                    family: n.family.to_string(),
                    microbatch_size: n.microbatch_size,
                    microbatches: n.microbatches,
                    reason: n.reason.clone(),
                })
                .collect(),
        }
    }

    /// The report as pretty-printed JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut text =
            serde_json::to_string_pretty(self).expect("the report holds no map keys that fail");
        text.push('\n');
        text
    }
}
