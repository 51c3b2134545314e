//! The tuner's result as one JSON document: what `dualpipe tune --json` prints and what
//! `dualpipe_rs.tune` returns, built here once.

use serde::Serialize;

use dualpipe_schedule::{Costs, ValidSchedule};

use crate::{Candidate, TuneError, TuneRequest, Tuning};

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

    /// Runs the synthesiser at every micro-batch size of the report (`seconds` shared
    /// equally) and ranks its rows among the families' (or over the cap); the synthesised
    /// schedule when it ranks first.
    pub fn add_synthesized(
        &mut self,
        request: &TuneRequest,
        costs: &Costs,
        seconds: f64,
    ) -> Result<Option<ValidSchedule>, TuneError> {
        let each = seconds / self.microbatch_sizes.len().max(1) as f64;
        let mut schedules: Vec<(u32, ValidSchedule)> = Vec::new();
        for size in self.microbatch_sizes.clone() {
            let Some((row, valid)) = synthesize_row(request, costs, size, each)? else {
                continue;
            };
            schedules.push((row.microbatch_size, valid));
            if request.memory_cap.is_some_and(|cap| row.peak_memory > cap) {
                let at = self
                    .over_cap
                    .partition_point(|r| r.peak_memory <= row.peak_memory);
                self.over_cap.insert(at, row);
            } else {
                let at = self.ranked.partition_point(|r| {
                    (r.step_time, r.peak_memory) <= (row.step_time, row.peak_memory)
                });
                self.ranked.insert(at, row);
            }
        }
        self.best = self.ranked.first().cloned();
        Ok(self
            .best
            .as_ref()
            .filter(|b| b.family == crate::synth::LABEL)
            .and_then(|b| {
                schedules
                    .into_iter()
                    .find(|(size, _)| *size == b.microbatch_size)
                    .map(|(_, v)| v)
            }))
    }

    /// The report as pretty-printed JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut text =
            serde_json::to_string_pretty(self).expect("the report holds no map keys that fail");
        text.push('\n');
        text
    }
}

/// The synthesiser at one micro-batch size, as a row of the table, with its schedule; `None`
/// when no start point fits the memory cap there.
pub fn synthesize_row(
    request: &TuneRequest,
    costs: &Costs,
    size: u32,
    seconds: f64,
) -> Result<Option<(Row, ValidSchedule)>, TuneError> {
    use crate::synth::{LABEL, MemoryCap, SynthCosts, SynthError, SynthRequest};
    use dualpipe_planner::{Family, PlanRequest, plan};
    let internal = |e: &dyn std::fmt::Display| TuneError::Internal(e.to_string());
    let scaled = costs
        .at_microbatch_size(f64::from(size))
        .map_err(|e| TuneError::Costs(e.to_string()))?;
    let n = request.ranks;
    let c = request.global_batch / size;
    // The cap in bytes as activation memory in N-ths of the model: what is left beside one
    // N-th of the parameters, over one N-th of the activations of a micro-batch.
    let layout = plan(&PlanRequest::new(Family::Zbv, n, c)).map_err(|e| internal(&e))?;
    let (per_stage, _) = crate::stage_costs(&scaled, &layout);
    let stages = layout.topology().num_stages();
    let params: f64 = (0..stages).map(|s| per_stage.stage(s).param_bytes).sum();
    let activations: f64 = (0..stages)
        .map(|s| per_stage.stage(s).activation_bytes)
        .sum();
    let memory = match request.memory_cap {
        Some(cap) if activations > 0.0 => {
            let share = (cap - params / f64::from(n)) / (activations / f64::from(n));
            if share <= 0.0 {
                return Ok(None);
            }
            MemoryCap::Share(share)
        }
        _ => MemoryCap::None,
    };
    let mut synth = SynthRequest::new(n, c);
    synth.memory = memory;
    synth.evaluations = 1_000_000;
    synth.seconds = Some(seconds);
    let scaled_for_basis = scaled.clone();
    let result = match crate::synth::synthesize(&synth, &SynthCosts::File(scaled)) {
        Ok(result) => result,
        Err(SynthError::Internal(why)) => return Err(internal(&why)),
        Err(_) => return Ok(None),
    };
    let valid = result.schedule;
    let sim = dualpipe_schedule::simulate(&valid, &result.costs, request.model)
        .map_err(|e| internal(&e))?;
    let topology = valid.topology();
    let (mut peak_memory, mut parameter_bytes, mut peak_activations) = (0.0f64, 0.0, 0);
    for (rank, summary) in sim.ranks.iter().enumerate() {
        let held: Vec<_> = topology
            .stages_on(rank as u32)
            .into_iter()
            .map(|s| result.costs.stage(s))
            .collect();
        let p: f64 = held.iter().map(|c| c.param_bytes).sum();
        let largest = held.iter().map(|c| c.activation_bytes).fold(0.0, f64::max);
        let m = p + f64::from(summary.peak_activations) * largest;
        if m > peak_memory || rank == 0 {
            peak_memory = m;
            parameter_bytes = p;
        }
        peak_activations = peak_activations.max(summary.peak_activations);
    }
    let row = Row {
        family: LABEL.to_string(),
        microbatch_size: size,
        microbatches: c,
        stages: topology.num_stages(),
        basis: crate::stage_costs(&scaled_for_basis, &valid).1.name(),
        step_time: sim.makespan,
        time_per_sample: sim.makespan / f64::from(request.global_batch),
        bubble_share: sim.bubble_share(),
        peak_memory,
        parameter_bytes,
        activation_bytes: peak_memory - parameter_bytes,
        peak_activations,
        parameter_copies: result.copies,
    };
    Ok(Some((row, valid)))
}
