//! The auto-tuner: for every schedule family and every micro-batch size that divides the
//! global batch, plan the step, simulate it under costs scaled to that micro-batch size, count
//! the memory every rank needs, drop what exceeds a memory cap, and rank the rest by step time.
//!
//! Pure: no I/O, nothing printed. The cost model is the cost file's ([`Costs`]), which must
//! say the micro-batch size it was measured at ([`Costs::microbatch_size`]); times, message
//! bytes and activation bytes scale linearly from there ([`Costs::at_microbatch_size`]).
//!
//! Each family cuts the model into its own number of stages S, so each candidate says on
//! which [`Basis`] its per-stage costs were made: the file's per-stage entries when they
//! describe exactly S stages, else its per-layer entries cut into S stages by the partitioner
//! (bottleneck optimum), else whole-model costs (the sum of the file's stages, or its top-level
//! costs when it has none) divided by S.
//!
//! Memory per rank: the parameter bytes of every stage it holds (DualPipe holds two copies of
//! the model) plus the activation bytes of its largest stage times the most activations the
//! simulation finds live at once on it. The largest rank's figure is the candidate's peak.
//!
//! ```
//! use dualpipe_schedule::Costs;
//! use dualpipe_tune::{TuneRequest, tune};
//! let costs = Costs::from_json(r#"{"per": "sample", "f": 4, "b": 8, "w": 4,
//!     "param_bytes": 1e9, "activation_bytes": 1e6}"#).unwrap();
//! let tuning = tune(&TuneRequest::new(4, 32), &costs).unwrap();
//! let best = tuning.best().unwrap();
//! assert!(tuning.ranked.iter().all(|c| c.step_time >= best.step_time));
//! assert_eq!(best.microbatch_size * best.microbatches, 32);
//! ```

pub mod synth;

use std::fmt;

mod report;
pub use report::{Refusal, Report, Row, synthesize_row};

use dualpipe_partition::{Layer, Layers, Options, partition};
use dualpipe_planner::{Family, PlanRequest, check, plan, plan_for};
use dualpipe_schedule::{Costs, ExecutionModel, StageCosts, ValidSchedule, simulate};

/// What to tune.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneRequest {
    /// Number of ranks N.
    pub ranks: u32,
    /// Samples in one training step, G.
    pub global_batch: u32,
    /// Micro-batch sizes to try; `None`: every divisor of the global batch. Sizes that do not
    /// divide the global batch are skipped ([`Tuning::skipped_sizes`]).
    pub microbatch_sizes: Option<Vec<u32>>,
    /// Most bytes one rank may hold (parameters plus live activations); `None`: no cap.
    pub memory_cap: Option<f64>,
    /// Stages per rank of `interleaved-1f1b`.
    pub chunks_per_rank: u32,
    /// The execution model simulated.
    pub model: ExecutionModel,
}

impl TuneRequest {
    /// Every micro-batch size dividing `global_batch`, no memory cap, the planner's default
    /// chunks per rank for interleaved 1F1B ([`dualpipe_planner::DEFAULT_CHUNKS_PER_RANK`]),
    /// the blocking model.
    pub fn new(ranks: u32, global_batch: u32) -> TuneRequest {
        TuneRequest {
            ranks,
            global_batch,
            microbatch_sizes: None,
            memory_cap: None,
            chunks_per_rank: dualpipe_planner::DEFAULT_CHUNKS_PER_RANK,
            model: ExecutionModel::Blocking,
        }
    }
}

/// Where a candidate's per-stage costs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The cost file's per-stage entries, which describe exactly the family's stages.
    Stages,
    /// The cost file's per-layer entries, cut into the family's stages by the partitioner.
    Layers,
    /// Whole-model costs (the sum of the file's stages, or its top-level costs) divided
    /// equally over the family's stages.
    Model,
}

impl Basis {
    /// The name shown in tables and JSON: `stages`, `layers` or `model`.
    pub const fn name(self) -> &'static str {
        match self {
            Basis::Stages => "stages",
            Basis::Layers => "layers",
            Basis::Model => "model",
        }
    }
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One family at one micro-batch size, simulated.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// What was planned (with [`plan_for`] and [`Candidate::costs`]).
    pub request: PlanRequest,
    /// Samples per micro-batch.
    pub microbatch_size: u32,
    /// Micro-batches per step (global batch / micro-batch size).
    pub microbatches: u32,
    /// Stages of the family.
    pub stages: u32,
    /// Where the per-stage costs come from.
    pub basis: Basis,
    /// The per-stage costs simulated, at this micro-batch size.
    pub costs: Costs,
    /// Simulated step time, in the costs' unit.
    pub step_time: f64,
    /// Step time divided by the global batch.
    pub time_per_sample: f64,
    /// Share of rank time spent idle.
    pub bubble_share: f64,
    /// Most bytes one rank holds: [`Candidate::parameter_bytes`] plus live activations.
    pub peak_memory: f64,
    /// Parameter bytes held by that rank.
    pub parameter_bytes: f64,
    /// Most live activations on one rank, in the family's stages.
    pub peak_activations: u32,
    /// Parameters held by the busiest rank in N-ths of the model: 2 for DualPipe's two copies,
    /// 1 for the others.
    pub parameter_copies: f64,
}

impl Candidate {
    /// The family.
    pub fn family(&self) -> Family {
        self.request.family
    }
}

/// A family that does not accept one micro-batch count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotApplicable {
    /// The family.
    pub family: Family,
    /// Samples per micro-batch.
    pub microbatch_size: u32,
    /// Micro-batches per step.
    pub microbatches: u32,
    /// Why, from the planner.
    pub reason: String,
}

/// The result of [`tune`].
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    /// Candidates within the memory cap, fastest first (ties: less memory first).
    pub ranked: Vec<Candidate>,
    /// Candidates over the memory cap, least memory first.
    pub over_cap: Vec<Candidate>,
    /// Families that do not accept a micro-batch count.
    pub not_applicable: Vec<NotApplicable>,
    /// The micro-batch sizes tried, ascending.
    pub sizes: Vec<u32>,
    /// Sizes asked for that do not divide the global batch.
    pub skipped_sizes: Vec<u32>,
    /// The memory cap applied.
    pub memory_cap: Option<f64>,
}

impl Tuning {
    /// The fastest candidate within the memory cap.
    pub fn best(&self) -> Option<&Candidate> {
        self.ranked.first()
    }
}

/// Why nothing can be tuned.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TuneError {
    /// The request is not usable (a zero batch, no size dividing it, a bad cap).
    #[error("{0}")]
    Request(String),
    /// The costs cannot be used.
    #[error("costs: {0}")]
    Costs(String),
    /// No family accepts any micro-batch count on these ranks.
    #[error("{0}")]
    NothingApplies(String),
    /// A planned schedule is invalid or does not simulate: a bug.
    #[error("internal error, please report it: {0}")]
    Internal(String),
}

/// Every divisor of `n`, ascending.
pub fn divisors(n: u32) -> Vec<u32> {
    (1..=n).filter(|d| n % d == 0).collect()
}

/// Ranks every family at every micro-batch size; see the crate documentation.
pub fn tune(request: &TuneRequest, costs: &Costs) -> Result<Tuning, TuneError> {
    let g = request.global_batch;
    if g == 0 {
        return Err(TuneError::Request(
            "the global batch is 0 samples; it must be at least 1".into(),
        ));
    }
    if let Some(cap) = request.memory_cap
        && !(cap.is_finite() && cap >= 0.0)
    {
        return Err(TuneError::Request(format!(
            "the memory cap is {cap}; it must be a finite number of bytes, not negative"
        )));
    }
    costs.check().map_err(|e| TuneError::Costs(e.0))?;
    if costs.microbatch_size.is_none() {
        // Refused before any work, with the message that says how to fix the file.
        costs
            .at_microbatch_size(1.0)
            .map_err(|e| TuneError::Costs(e.0))?;
    }
    let (sizes, skipped_sizes) = match &request.microbatch_sizes {
        None => (divisors(g), Vec::new()),
        Some(list) => {
            if list.contains(&0) {
                return Err(TuneError::Request(
                    "micro-batch size 0: sizes are at least 1 sample".into(),
                ));
            }
            let mut sizes: Vec<u32> = list.clone();
            sizes.sort_unstable();
            sizes.dedup();
            let (fit, skipped): (Vec<u32>, Vec<u32>) = sizes.into_iter().partition(|s| g % s == 0);
            if fit.is_empty() {
                return Err(TuneError::Request(format!(
                    "no micro-batch size given ({}) divides the global batch of {g} samples; its divisors are {}",
                    join(&skipped),
                    join(&divisors(g))
                )));
            }
            (fit, skipped)
        }
    };
    let mut tuning = Tuning {
        ranked: Vec::new(),
        over_cap: Vec::new(),
        not_applicable: Vec::new(),
        sizes: sizes.clone(),
        skipped_sizes,
        memory_cap: request.memory_cap,
    };
    for &size in &sizes {
        let scaled = costs
            .at_microbatch_size(f64::from(size))
            .map_err(|e| TuneError::Costs(e.0))?;
        let c = g / size;
        for family in Family::ALL {
            let mut plan_request = PlanRequest::new(family, request.ranks, c);
            if family == Family::Interleaved1F1B {
                plan_request = plan_request.chunks_per_rank(request.chunks_per_rank);
            }
            if let Err(why) = check(&plan_request) {
                tuning.not_applicable.push(NotApplicable {
                    family,
                    microbatch_size: size,
                    microbatches: c,
                    reason: why.to_string(),
                });
                continue;
            }
            let candidate = evaluate(plan_request, size, g, &scaled, request.model)?;
            match request.memory_cap {
                Some(cap) if candidate.peak_memory > cap => tuning.over_cap.push(candidate),
                _ => tuning.ranked.push(candidate),
            }
        }
    }
    if tuning.ranked.is_empty() && tuning.over_cap.is_empty() {
        let mut reasons: Vec<String> = Vec::new();
        for n in &tuning.not_applicable {
            let line = format!("{}: {}", n.family, n.family.constraint());
            if !reasons.contains(&line) {
                reasons.push(line);
            }
        }
        return Err(TuneError::NothingApplies(format!(
            "no schedule family accepts {} ranks with {} micro-batches (global batch {g}, micro-batch sizes {}):\n  {}",
            request.ranks,
            join(&sizes.iter().map(|s| g / s).collect::<Vec<_>>()),
            join(&sizes),
            reasons.join("\n  ")
        )));
    }
    let order = |a: &Candidate, b: &Candidate| {
        a.step_time
            .total_cmp(&b.step_time)
            .then(a.peak_memory.total_cmp(&b.peak_memory))
    };
    tuning.ranked.sort_by(order);
    tuning.over_cap.sort_by(|a, b| {
        a.peak_memory
            .total_cmp(&b.peak_memory)
            .then(a.step_time.total_cmp(&b.step_time))
    });
    Ok(tuning)
}

fn join(values: &[u32]) -> String {
    values
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn internal(family: Family, what: impl fmt::Display) -> TuneError {
    TuneError::Internal(format!("{family}: {what}"))
}

/// Plans, simulates and measures one candidate under `costs` (already at `size`).
fn evaluate(
    request: PlanRequest,
    size: u32,
    global_batch: u32,
    costs: &Costs,
    model: ExecutionModel,
) -> Result<Candidate, TuneError> {
    let family = request.family;
    let default = plan(&request).map_err(|e| internal(family, e))?;
    let (stage_costs, basis) = stage_costs(costs, &default);
    let valid = plan_for(&request, &stage_costs).map_err(|e| internal(family, e))?;
    let sim = simulate(&valid, &stage_costs, model).map_err(|e| internal(family, e))?;
    let topology = valid.topology();
    let stages = topology.num_stages();
    let (mut peak_memory, mut parameter_bytes, mut peak_activations) = (0.0f64, 0.0, 0);
    for (rank, summary) in sim.ranks.iter().enumerate() {
        let held: Vec<StageCosts> = topology
            .stages_on(rank as u32)
            .into_iter()
            .map(|s| stage_costs.stage(s))
            .collect();
        let params: f64 = held.iter().map(|c| c.param_bytes).sum();
        let largest = held.iter().map(|c| c.activation_bytes).fold(0.0, f64::max);
        let memory = params + f64::from(summary.peak_activations) * largest;
        if memory > peak_memory || rank == 0 {
            peak_memory = memory;
            parameter_bytes = params;
        }
        peak_activations = peak_activations.max(summary.peak_activations);
    }
    let held = topology.stages_per_rank().into_iter().max().unwrap_or(0);
    Ok(Candidate {
        request,
        microbatch_size: size,
        microbatches: request.microbatches,
        stages,
        basis,
        costs: stage_costs,
        step_time: sim.makespan,
        time_per_sample: sim.makespan / f64::from(global_batch),
        bubble_share: sim.bubble_share(),
        peak_memory,
        parameter_bytes,
        peak_activations,
        parameter_copies: f64::from(held) * f64::from(request.ranks) / f64::from(stages.max(1)),
    })
}

/// The per-stage costs of `valid`'s stages from a cost file's, and the basis they were made
/// on: the file's per-stage entries when they describe exactly these stages; else its layers
/// cut by the partitioner when there are at least as many layers as stages; else the whole
/// model (the sum of the file's described stages, or its top-level costs when it has no
/// per-stage entries) divided equally, times and parameter and activation bytes alike.
/// Messages (`latency`, `bandwidth`, top-level `bytes`) are kept as they are.
///
/// ```
/// use dualpipe_planner::{Family, PlanRequest, plan};
/// use dualpipe_schedule::{Costs, ValidSchedule};
/// use dualpipe_tune::{Basis, stage_costs};
/// let costs = Costs::from_json(r#"{"f": 8, "b": 16, "w": 8, "param_bytes": 800}"#).unwrap();
/// let valid = plan(&PlanRequest::new(Family::DualPipeV, 2, 4)).unwrap();
/// let (per_stage, basis) = stage_costs(&costs, &valid);
/// assert_eq!(basis, Basis::Model);
/// assert_eq!((per_stage.stage(3).f, per_stage.stage(3).param_bytes), (2.0, 200.0));
/// ```
pub fn stage_costs(costs: &Costs, valid: &ValidSchedule) -> (Costs, Basis) {
    let stages = valid.topology().num_stages();
    let described = costs.described_stages();
    if described == Some(stages) {
        return (costs.clone(), Basis::Stages);
    }
    let mut out = costs.clone();
    out.stages.clear();
    if costs.layers.len() >= stages as usize {
        let layers = Layers {
            unit: Some(costs.unit.clone()),
            layers: costs
                .layers
                .iter()
                .map(|l| Layer {
                    name: Some(l.name.clone()),
                    f: l.f,
                    b: l.b,
                    w: l.w,
                    fb: l.fb,
                    param_bytes: l.param_bytes,
                    activation_bytes: l.activation_bytes,
                })
                .collect(),
        };
        let options = Options {
            memory_cap: None,
            max_evaluations: 0,
        };
        let layer_count = costs.layers.len();
        let cut = partition(&layers, valid, &options)
            .map(|p| p.cut)
            .unwrap_or_else(|_| {
                (0..=stages as usize)
                    .map(|i| i * layer_count / stages as usize)
                    .collect()
            });
        let any_fb = costs.layers.iter().any(|l| l.fb.is_some());
        for s in 0..stages as usize {
            let range = &costs.layers[cut[s]..cut[s + 1]];
            let sum = |g: &dyn Fn(&dualpipe_schedule::LayerCost) -> f64| range.iter().map(g).sum();
            out.stages.insert(
                s as u32,
                dualpipe_schedule::StageOverride {
                    f: Some(sum(&|l| l.f)),
                    b: Some(sum(&|l| l.b)),
                    w: Some(sum(&|l| l.w)),
                    fb: any_fb.then(|| sum(&|l| l.fb.unwrap_or(l.f + l.b))),
                    bytes: None,
                    param_bytes: Some(sum(&|l| l.param_bytes)),
                    activation_bytes: Some(sum(&|l| l.activation_bytes)),
                },
            );
        }
        return (out, Basis::Layers);
    }
    let whole = match described {
        Some(d) => {
            let each: Vec<StageCosts> = (0..d).map(|s| costs.stage(s)).collect();
            let sum = |g: &dyn Fn(&StageCosts) -> f64| each.iter().map(g).sum::<f64>();
            StageCosts {
                f: sum(&|c| c.f),
                b: sum(&|c| c.b),
                w: sum(&|c| c.w),
                fb: each
                    .iter()
                    .all(|c| c.fb.is_some())
                    .then(|| sum(&|c| c.fb.unwrap_or(0.0))),
                bytes: costs.uniform.bytes,
                param_bytes: sum(&|c| c.param_bytes),
                activation_bytes: sum(&|c| c.activation_bytes),
            }
        }
        None => costs.uniform,
    };
    let n = f64::from(stages.max(1));
    out.uniform = StageCosts {
        f: whole.f / n,
        b: whole.b / n,
        w: whole.w / n,
        fb: whole.fb.map(|fb| fb / n),
        bytes: whole.bytes,
        param_bytes: whole.param_bytes / n,
        activation_bytes: whole.activation_bytes / n,
    };
    (out, Basis::Model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(family: Family, n: u32, c: u32) -> ValidSchedule {
        plan(&PlanRequest::new(family, n, c)).unwrap()
    }

    #[test]
    fn the_basis_follows_what_the_file_describes() {
        let text = r#"{"microbatch_size": 1, "f": 1, "b": 2, "w": 1,
            "stages": [{"stage": 0, "f": 2, "param_bytes": 10},
                       {"stage": 1, "f": 4, "b": 4, "param_bytes": 30}]}"#;
        let costs = Costs::from_json(text).unwrap();
        // Two stages: 1F1B on two ranks takes them as they are.
        let (same, basis) = stage_costs(&costs, &valid(Family::OneFOneB, 2, 4));
        assert_eq!(basis, Basis::Stages);
        assert_eq!(same, costs);
        // DualPipeV on two ranks has four: the two stages' sum, divided by four.
        let (quarter, basis) = stage_costs(&costs, &valid(Family::DualPipeV, 2, 4));
        assert_eq!(basis, Basis::Model);
        let c = quarter.stage(3);
        assert_eq!((c.f, c.b, c.w, c.param_bytes), (1.5, 1.5, 0.5, 10.0));
        assert!(quarter.stages.is_empty());
        // With layers, the partitioner cuts them into the four stages.
        let with_layers = Costs::from_json(
            r#"{"microbatch_size": 1, "stages": [{"stage": 0}, {"stage": 1}], "layers": [
                {"name": "a", "f": 4, "b": 8, "w": 4, "param_bytes": 1},
                {"name": "b", "f": 1, "b": 2, "w": 1, "param_bytes": 2},
                {"name": "c", "f": 1, "b": 2, "w": 1, "param_bytes": 3},
                {"name": "d", "f": 1, "b": 2, "w": 1, "param_bytes": 4},
                {"name": "e", "f": 1, "b": 2, "w": 1, "param_bytes": 5}]}"#,
        )
        .unwrap();
        let (cut, basis) = stage_costs(&with_layers, &valid(Family::DualPipeV, 2, 4));
        assert_eq!(basis, Basis::Layers);
        let total: f64 = (0..4).map(|s| cut.stage(s).f).sum();
        assert_eq!(total, 8.0);
        let params: f64 = (0..4).map(|s| cut.stage(s).param_bytes).sum();
        assert_eq!(params, 15.0);
        assert_eq!(cut.stage(0).f, 4.0, "the heavy first layer stands alone");
        // More stages than layers: back to the whole model.
        let (_, basis) = stage_costs(&with_layers, &valid(Family::DualPipeV, 4, 8));
        assert_eq!(basis, Basis::Model);
    }

    #[test]
    fn costs_scale_with_the_microbatch_size() {
        let costs = Costs::from_json(
            r#"{"microbatch_size": 2, "f": 2, "b": 4, "w": 2,
                "param_bytes": 100, "activation_bytes": 10}"#,
        )
        .unwrap();
        let mut request = TuneRequest::new(1, 8);
        request.microbatch_sizes = Some(vec![1, 4, 3]);
        let tuning = tune(&request, &costs).unwrap();
        assert_eq!(tuning.sizes, [1, 4]);
        assert_eq!(tuning.skipped_sizes, [3]);
        let gpipe = |size: u32| {
            tuning
                .ranked
                .iter()
                .find(|c| c.family() == Family::GPipe && c.microbatch_size == size)
                .unwrap()
                .clone()
        };
        // One rank, one stage: the whole step is C x (f + b), the same for any split.
        let (one, four) = (gpipe(1), gpipe(4));
        assert_eq!(one.costs.stage(0).f, 1.0);
        assert_eq!(four.costs.stage(0).f, 4.0);
        assert_eq!(one.step_time, 8.0 * 3.0);
        assert_eq!(four.step_time, 2.0 * 12.0);
        assert_eq!(one.time_per_sample, 3.0);
        // GPipe keeps every micro-batch: 8 x 5 bytes against 2 x 20, parameters unscaled.
        assert_eq!(one.peak_memory, 100.0 + 8.0 * 5.0);
        assert_eq!(four.peak_memory, 100.0 + 2.0 * 20.0);
        // 1F1B on one rank keeps one.
        let f1b = tuning
            .ranked
            .iter()
            .find(|c| c.family() == Family::OneFOneB && c.microbatch_size == 1)
            .unwrap();
        assert_eq!(f1b.peak_memory, 105.0);
    }

    #[test]
    fn ranking_and_the_memory_cap() {
        let costs = Costs::from_json(
            r#"{"per": "sample", "f": 4, "b": 8, "w": 4,
                "param_bytes": 1000, "activation_bytes": 10}"#,
        )
        .unwrap();
        let mut request = TuneRequest::new(4, 16);
        let all = tune(&request, &costs).unwrap();
        assert!(all.over_cap.is_empty());
        for pair in all.ranked.windows(2) {
            assert!(pair[0].step_time <= pair[1].step_time);
        }
        let dualpipe = all
            .ranked
            .iter()
            .find(|c| c.family() == Family::DualPipe)
            .unwrap();
        assert_eq!(dualpipe.parameter_copies, 2.0);
        assert_eq!(dualpipe.basis, Basis::Model);
        // Whole-model parameters 1000: DualPipe's rank holds two quarters.
        assert_eq!(dualpipe.parameter_bytes, 500.0);
        request.memory_cap = Some(400.0);
        let capped = tune(&request, &costs).unwrap();
        assert!(capped.ranked.iter().all(|c| c.peak_memory <= 400.0));
        assert!(capped.over_cap.iter().all(|c| c.peak_memory > 400.0));
        assert!(
            capped
                .over_cap
                .iter()
                .any(|c| c.family() == Family::DualPipe)
        );
        assert_eq!(
            capped.ranked.len() + capped.over_cap.len(),
            all.ranked.len()
        );
    }

    #[test]
    fn unusable_requests_say_why() {
        let costs = Costs::from_json(r#"{"per": "sample"}"#).unwrap();
        let mut request = TuneRequest::new(4, 0);
        assert!(matches!(tune(&request, &costs), Err(TuneError::Request(_))));
        request.global_batch = 6;
        request.microbatch_sizes = Some(vec![4, 5]);
        let error = tune(&request, &costs).unwrap_err().to_string();
        assert!(error.contains("divisors are 1, 2, 3, 6"), "{error}");
        let error = tune(&TuneRequest::new(0, 8), &costs).unwrap_err();
        assert!(matches!(error, TuneError::NothingApplies(_)), "{error}");
        let error = tune(&TuneRequest::new(2, 8), &Costs::default()).unwrap_err();
        assert!(error.to_string().contains("microbatch_size"), "{error}");
    }
}
