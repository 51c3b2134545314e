//! Cost-aware partitioning: which contiguous layers of a model each pipeline stage should hold
//! so that a given schedule runs fastest.
//!
//! Given the model's layers with their costs ([`Layers`]) and a valid schedule (any family,
//! planned or hand-written), [`partition`] returns one non-empty contiguous layer range per
//! stage, in two steps with two objectives:
//!
//! 1. **bottleneck**: the largest compute time of any rank, where a rank's time is what the
//!    schedule makes it run (every F, B, W and FB of its instruction list, with the stage
//!    costs summed from the layers; an FB costs its forward stage's `fb` when any layer gives
//!    `fb`, else the `f` and `b` of its halves). For placements where a rank holds a stage and
//!    at most its mirror image (1F1B, GPipe, ZB-H1; DualPipeV and ZB-V, whose rank 0 holds the
//!    first and the last stage; DualPipe, whose ranks `r` and `N-1-r` both hold stages `r` and
//!    `N-1-r`) the optimum is exact: a search on the bottleneck (a climb from a lower bound,
//!    then a bisection) over an exact feasibility test (see `exact.rs` for the method and why
//!    it is exact). For other placements (interleaved 1F1B) it is a local search, and the
//!    result says so.
//! 2. **step**: the simulated step time of the schedule ([`dualpipe_schedule::simulate`],
//!    blocking model, per-stage costs, messages free), improved from the bottleneck optimum by
//!    moving single layers across stage boundaries while the simulator says it helps. The
//!    schedule is lowered once; each simulation replays it with the cut's stage costs
//!    ([`Model::step`]). The result is never slower than the bottleneck optimum.
//!
//! An optional memory cap (bytes per rank) bounds, on every rank, the parameters of the stages
//! it holds plus, for each such stage, its activation bytes per micro-batch times the peak
//! number of that stage's activations live at once on that rank. Summing per-stage peaks can
//! only overstate the true peak (the stages' peaks need not coincide), so a cut within the cap
//! is within it for real; the reported `peak_memory` is the exact peak of the cut.
//!
//! ```
//! use dualpipe_partition::{Layers, Options, partition};
//! use dualpipe_planner::{Family, PlanRequest, plan};
//! use dualpipe_schedule::ValidSchedule;
//! let layers = Layers::from_json(r#"{"layers": [
//!     {"f": 4, "b": 8}, {"f": 1, "b": 2}, {"f": 1, "b": 2}, {"f": 1, "b": 2},
//!     {"f": 1, "b": 2}, {"f": 1, "b": 2}, {"f": 1, "b": 2}, {"f": 4, "b": 8}]}"#).unwrap();
//! let valid = plan(&PlanRequest::new(Family::DualPipeV, 2, 8)).unwrap();
//! let result = partition(&layers, &valid, &Options::default()).unwrap();
//! assert_eq!(result.ranges().len(), 4);
//! assert!(result.predicted_step <= result.equal_cut_step);
//! ```

mod exact;
mod layers;
mod placement;
mod step;

use std::fmt;

use dualpipe_schedule::{Costs, ExecutionModel, StageOverride, ValidSchedule, simulate};
use serde::Serialize;

pub use layers::{Layer, Layers, LayersError};

use exact::{Limits, Solver};
use placement::{ACT, BI, F, FB, Kind, PAR, Placement, Q, W};
use step::{Replay, StageTimes, StepModel};

/// How to partition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// Most bytes any rank may hold: parameters plus peak activations. `None`: no cap.
    pub memory_cap: Option<f64>,
    /// Most simulations the refinement of the step time may run (0: keep the bottleneck
    /// optimum).
    pub max_evaluations: usize,
}

impl Default for Options {
    /// No memory cap, up to 256 simulations.
    fn default() -> Self {
        Options {
            memory_cap: None,
            max_evaluations: 256,
        }
    }
}

/// What the returned cut minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// The most loaded rank's compute time.
    Bottleneck,
    /// The simulated step time, refined from the bottleneck optimum.
    Step,
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Objective::Bottleneck => "bottleneck",
            Objective::Step => "step",
        })
    }
}

/// Why a partition cannot be made.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PartitionError {
    /// Every stage needs at least one layer.
    #[error(
        "{layers} layers cannot fill {stages} stages: every stage needs at least one layer (the schedule has {stages} stages)"
    )]
    TooFewLayers {
        /// Layers given.
        layers: usize,
        /// Stages of the schedule.
        stages: usize,
    },
    /// The memory cap is not a positive finite number.
    #[error("the memory cap is {0}; it must be a finite number of bytes, not negative")]
    BadCap(f64),
    /// No cut keeps every rank within the memory cap.
    #[error("{}", memory_message(*cap, *least))]
    MemoryCap {
        /// The cap asked for.
        cap: f64,
        /// The least cap some cut meets, when the exact method applies.
        least: Option<f64>,
    },
    /// The boundaries given do not describe a cut of these layers into the schedule's stages.
    #[error("{0}")]
    BadCut(String),
    /// The layers cannot be used.
    #[error(transparent)]
    Layers(#[from] LayersError),
    /// The simulator refused the costs (a bug: the layers were checked).
    #[error("{0}")]
    Simulate(String),
}

fn memory_message(cap: f64, least: Option<f64>) -> String {
    let mut text = format!(
        "no cut keeps every rank within the memory cap of {cap} bytes (parameters plus peak activations)"
    );
    if let Some(least) = least {
        text.push_str(&format!("; the least cap any cut meets is {least} bytes"));
    }
    text
}

/// The model of one schedule over one list of layers: what any cut costs.
pub struct Model<'a> {
    valid: &'a ValidSchedule,
    layers: &'a Layers,
    placement: Placement,
    /// `prefix[i]`: the per-layer quantities summed over layers `0..i`.
    prefix: Vec<[f64; Q]>,
    /// Whether any layer gives `fb` (then every stage's `fb` is the sum of its layers').
    fb: bool,
    /// The schedule lowered for repeated simulations.
    steps: StepModel,
}

impl<'a> Model<'a> {
    /// The model of `valid` over `layers`.
    pub fn new(layers: &'a Layers, valid: &'a ValidSchedule) -> Model<'a> {
        let mut prefix = vec![[0.0; Q]];
        for layer in &layers.layers {
            let mut next = *prefix.last().unwrap_or(&[0.0; Q]);
            next[F] += layer.f;
            next[BI] += layer.b - layer.w;
            next[W] += layer.w;
            next[PAR] += layer.param_bytes;
            next[ACT] += layer.activation_bytes;
            next[FB] += layer.fb.unwrap_or(layer.f + layer.b);
            prefix.push(next);
        }
        let fb = layers.layers.iter().any(|l| l.fb.is_some());
        Model {
            valid,
            layers,
            placement: Placement::new(valid, fb),
            prefix,
            fb,
            steps: StepModel::new(valid),
        }
    }

    /// Number of stages of the schedule.
    pub fn num_stages(&self) -> usize {
        self.placement.num_stages
    }

    /// Checks that `cut` (the `S + 1` boundaries) goes from 0 to the number of layers with
    /// every stage non-empty.
    pub fn check_cut(&self, cut: &[usize]) -> Result<(), PartitionError> {
        let (l, s) = (self.layers.layers.len(), self.num_stages());
        if cut.len() != s + 1 || cut.first() != Some(&0) || cut.last() != Some(&l) {
            return Err(PartitionError::BadCut(format!(
                "a cut of {l} layers into {s} stages has {} boundaries from 0 to {l}; got {cut:?}",
                s + 1
            )));
        }
        if let Some(i) = (0..s).find(|&i| cut[i] >= cut[i + 1]) {
            return Err(PartitionError::BadCut(format!(
                "stage {i} would be empty or reversed: boundaries {} and {}",
                cut[i],
                cut[i + 1]
            )));
        }
        Ok(())
    }

    fn value(&self, kind: Kind, cut: &[usize]) -> Vec<f64> {
        self.placement
            .constraints
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| {
                c.terms
                    .iter()
                    .map(|(s, w)| {
                        let (hi, lo) = (&self.prefix[cut[s + 1]], &self.prefix[cut[*s]]);
                        (0..Q).map(|i| w[i] * (hi[i] - lo[i])).sum::<f64>()
                    })
                    .sum()
            })
            .collect()
    }

    /// Per rank, its compute time under `cut` (what the simulator counts as busy).
    pub fn rank_load(&self, cut: &[usize]) -> Vec<f64> {
        self.value(Kind::Time, cut)
    }

    /// The largest rank load under `cut`.
    pub fn bottleneck(&self, cut: &[usize]) -> f64 {
        self.rank_load(cut).into_iter().fold(0.0, f64::max)
    }

    /// Per rank, the memory bound the cap is checked against: parameters of its stages plus,
    /// per stage, activation bytes times the stage's peak live count on that rank.
    pub fn memory_bound(&self, cut: &[usize]) -> Vec<f64> {
        self.value(Kind::Memory, cut)
    }

    /// Per rank, the exact peak memory under `cut`: parameters of its stages plus the most
    /// activation bytes live at once (in list order, as the simulator counts activations).
    pub fn peak_memory(&self, cut: &[usize]) -> Vec<f64> {
        let act: Vec<f64> = (0..self.num_stages())
            .map(|s| self.prefix[cut[s + 1]][ACT] - self.prefix[cut[s]][ACT])
            .collect();
        let par: Vec<f64> = (0..self.num_stages())
            .map(|s| self.prefix[cut[s + 1]][PAR] - self.prefix[cut[s]][PAR])
            .collect();
        let mut params = vec![0.0; self.valid.schedule().num_ranks as usize];
        for (s, holders) in self.placement.holders.iter().enumerate() {
            for &r in holders {
                params[r as usize] += par[s];
            }
        }
        self.placement
            .activation_events
            .iter()
            .zip(params)
            .map(|(events, params)| {
                let (mut live, mut peak) = (0.0f64, 0.0f64);
                for &(s, sign) in events {
                    if sign > 0 {
                        live += act[s];
                        peak = peak.max(live);
                    } else {
                        live -= act[s];
                    }
                }
                params + peak
            })
            .collect()
    }

    /// Per stage, the compute times of `cut`: the sums of its layers' `f`, `b`, `w`, and
    /// `fb` when any layer gives one (a layer without it counting `f + b`).
    fn stage_times(&self, cut: &[usize]) -> StageTimes {
        let s = self.num_stages();
        let mut times = StageTimes {
            f: Vec::with_capacity(s),
            b: Vec::with_capacity(s),
            w: Vec::with_capacity(s),
            fb: Vec::with_capacity(s),
        };
        for st in 0..s {
            let range = &self.layers.layers[cut[st]..cut[st + 1]];
            let sum = |g: fn(&Layer) -> f64| range.iter().map(g).sum::<f64>();
            times.f.push(sum(|l| l.f));
            times.b.push(sum(|l| l.b));
            times.w.push(sum(|l| l.w));
            times
                .fb
                .push(self.fb.then(|| sum(|l| l.fb.unwrap_or(l.f + l.b))));
        }
        times
    }

    /// The cost model of `cut`: per stage, the sums of its layers' `f`, `b` and `w`; `fb` the
    /// sum of its layers' `fb` when any layer gives one (`f + b` for a layer without it),
    /// otherwise unset (an FB costs the `f` and the `b` of its halves); messages free.
    pub fn costs(&self, cut: &[usize]) -> Costs {
        let mut costs = Costs::default();
        let times = self.stage_times(cut);
        for s in 0..self.num_stages() {
            let range = &self.layers.layers[cut[s]..cut[s + 1]];
            let sum = |g: fn(&Layer) -> f64| range.iter().map(g).sum::<f64>();
            costs.stages.insert(
                s as u32,
                StageOverride {
                    f: Some(times.f[s]),
                    b: Some(times.b[s]),
                    w: Some(times.w[s]),
                    fb: times.fb[s],
                    bytes: None,
                    param_bytes: Some(sum(|l| l.param_bytes)),
                    activation_bytes: Some(sum(|l| l.activation_bytes)),
                },
            );
        }
        costs
    }

    /// The simulated step time of the schedule under `cut`: the makespan
    /// [`dualpipe_schedule::simulate`] gives for [`Model::costs`] under the blocking model,
    /// replayed on the schedule lowered once (the same sums in the same order, so the same
    /// number).
    pub fn step(&self, cut: &[usize]) -> Result<f64, PartitionError> {
        self.step_with(cut, &mut Replay::default())
    }

    /// [`Model::step`] with scratch space kept between calls.
    fn step_with(&self, cut: &[usize], replay: &mut Replay) -> Result<f64, PartitionError> {
        match self.steps.makespan(&self.stage_times(cut), replay) {
            Some(t) => Ok(t),
            // Not finite: let the simulator say why (or give the step time itself).
            None => simulate(self.valid, &self.costs(cut), ExecutionModel::Blocking)
                .map(|run| run.makespan)
                .map_err(|e| PartitionError::Simulate(e.to_string())),
        }
    }

    fn within_cap(&self, cut: &[usize], cap: Option<f64>) -> bool {
        cap.is_none_or(|cap| self.memory_bound(cut).iter().all(|&m| m <= cap))
    }

    /// The equal-layer cut: stage `s` holds layers `s*L/S .. (s+1)*L/S`.
    pub fn equal_cut(&self) -> Vec<usize> {
        let (l, s) = (self.layers.layers.len(), self.num_stages());
        (0..=s).map(|i| i * l / s).collect()
    }
}

/// The result of [`partition`].
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    /// What `cut` minimises.
    pub objective: Objective,
    /// The cut: `S + 1` boundaries, stage `s` holding layers `cut[s]..cut[s + 1]`.
    pub cut: Vec<usize>,
    /// The simulated step time of `cut`.
    pub predicted_step: f64,
    /// The most loaded rank's compute time under `cut`.
    pub bottleneck: f64,
    /// Per rank, its compute time under `cut`.
    pub rank_load: Vec<f64>,
    /// Per rank, its exact peak memory under `cut` (parameters plus live activations).
    pub peak_memory: Vec<f64>,
    /// The bottleneck optimum the refinement started from.
    pub bottleneck_cut: Vec<usize>,
    /// Its bottleneck.
    pub bottleneck_optimum: f64,
    /// Its simulated step time.
    pub bottleneck_step: f64,
    /// Whether the bottleneck optimum is exact (mirrored placements) or from a local search.
    pub exact: bool,
    /// The equal-layer cut, for comparison.
    pub equal_cut: Vec<usize>,
    /// Its simulated step time.
    pub equal_cut_step: f64,
    /// Its bottleneck.
    pub equal_cut_bottleneck: f64,
    /// Simulations run by the refinement.
    pub evaluations: usize,
    /// The memory cap the cut was made under.
    pub memory_cap: Option<f64>,
}

impl Partition {
    /// The half-open layer range of every stage.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        self.cut.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// The JSON document `dualpipe partition --json` prints (and `dualpipe_rs.partition`
    /// returns): `{"objective", "schedule", "num_ranks", "num_stages", "num_microbatches",
    /// "unit", "memory_cap", "ranges", "stages": [{"stage", "ranks", "layers", "f", "b", "w",
    /// "param_bytes", "activation_bytes"}], "predicted_step", "bottleneck", "rank_load",
    /// "peak_memory", "bottleneck_optimum": {"exact", "ranges", "bottleneck", "step"},
    /// "equal_cut": {"ranges", "bottleneck", "step"}, "equal_cut_step", "evaluations"}`.
    /// Numbers are rounded to 1e-9; the text is pretty-printed and ends with a newline.
    pub fn to_json(&self, model: &Model<'_>) -> String {
        let schedule = model.valid.schedule();
        let ranges = |cut: &[usize]| cut.windows(2).map(|w| [w[0], w[1]]).collect::<Vec<_>>();
        let stages = self
            .cut
            .windows(2)
            .enumerate()
            .map(|(stage, w)| {
                let layers = &model.layers.layers[w[0]..w[1]];
                let sum = |g: fn(&Layer) -> f64| round(layers.iter().map(g).sum());
                JsonStage {
                    stage,
                    ranks: model.placement.holders[stage].clone(),
                    layers: [w[0], w[1]],
                    f: sum(|l| l.f),
                    b: sum(|l| l.b),
                    w: sum(|l| l.w),
                    param_bytes: sum(|l| l.param_bytes),
                    activation_bytes: sum(|l| l.activation_bytes),
                }
            })
            .collect();
        let report = JsonReport {
            objective: self.objective.to_string(),
            schedule: &schedule.schedule,
            num_ranks: schedule.num_ranks,
            num_stages: schedule.num_stages,
            num_microbatches: schedule.num_microbatches,
            unit: model.layers.unit.as_deref(),
            memory_cap: self.memory_cap,
            ranges: ranges(&self.cut),
            stages,
            predicted_step: round(self.predicted_step),
            bottleneck: round(self.bottleneck),
            rank_load: self.rank_load.iter().map(|&v| round(v)).collect(),
            peak_memory: self.peak_memory.iter().map(|&v| round(v)).collect(),
            bottleneck_optimum: JsonCut {
                exact: Some(self.exact),
                ranges: ranges(&self.bottleneck_cut),
                bottleneck: round(self.bottleneck_optimum),
                step: round(self.bottleneck_step),
            },
            equal_cut: JsonCut {
                exact: None,
                ranges: ranges(&self.equal_cut),
                bottleneck: round(self.equal_cut_bottleneck),
                step: round(self.equal_cut_step),
            },
            equal_cut_step: round(self.equal_cut_step),
            evaluations: self.evaluations,
        };
        let mut text = serde_json::to_string_pretty(&report).unwrap_or_default();
        text.push('\n');
        text
    }
}

fn round(value: f64) -> f64 {
    (value * 1e9).round() / 1e9
}

#[derive(Serialize)]
struct JsonReport<'a> {
    objective: String,
    schedule: &'a str,
    num_ranks: u32,
    num_stages: u32,
    num_microbatches: u32,
    unit: Option<&'a str>,
    memory_cap: Option<f64>,
    ranges: Vec<[usize; 2]>,
    stages: Vec<JsonStage>,
    predicted_step: f64,
    bottleneck: f64,
    rank_load: Vec<f64>,
    peak_memory: Vec<f64>,
    bottleneck_optimum: JsonCut,
    equal_cut: JsonCut,
    equal_cut_step: f64,
    evaluations: usize,
}

#[derive(Serialize)]
struct JsonStage {
    stage: usize,
    ranks: Vec<u32>,
    layers: [usize; 2],
    f: f64,
    b: f64,
    w: f64,
    param_bytes: f64,
    activation_bytes: f64,
}

#[derive(Serialize)]
struct JsonCut {
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<bool>,
    ranges: Vec<[usize; 2]>,
    bottleneck: f64,
    step: f64,
}

/// Partitions `layers` over the stages of `valid`; see the crate documentation.
pub fn partition(
    layers: &Layers,
    valid: &ValidSchedule,
    options: &Options,
) -> Result<Partition, PartitionError> {
    layers.check()?;
    let model = Model::new(layers, valid);
    partition_model(&model, options)
}

/// [`partition`] on a prepared [`Model`].
pub fn partition_model(model: &Model<'_>, options: &Options) -> Result<Partition, PartitionError> {
    let (l, s) = (model.layers.layers.len(), model.num_stages());
    if l < s {
        return Err(PartitionError::TooFewLayers {
            layers: l,
            stages: s,
        });
    }
    let cap = options.memory_cap;
    if let Some(cap) = cap
        && !(cap.is_finite() && cap >= 0.0)
    {
        return Err(PartitionError::BadCap(cap));
    }
    let exact = model.placement.is_mirrored();
    let bottleneck_cut = if exact {
        exact_bottleneck(model, cap)?
    } else {
        local_bottleneck(model, cap)?
    };
    let bottleneck_optimum = model.bottleneck(&bottleneck_cut);
    let bottleneck_step = model.step(&bottleneck_cut)?;
    let (mut cut, mut predicted_step, mut evaluations) = refine(
        model,
        cap,
        &bottleneck_cut,
        bottleneck_step,
        options.max_evaluations,
    )?;
    let equal_cut = model.equal_cut();
    let equal_cut_step = model.step(&equal_cut)?;
    // The least loaded rank does not always give the shortest step: when the equal-layer cut
    // simulates faster, refine from it as well and keep the better of the two.
    if options.max_evaluations > 0
        && equal_cut_step < predicted_step
        && model.within_cap(&equal_cut, cap)
    {
        let (other, step, used) = refine(
            model,
            cap,
            &equal_cut,
            equal_cut_step,
            options.max_evaluations,
        )?;
        evaluations += used;
        if step < predicted_step {
            cut = other;
            predicted_step = step;
        }
    }
    Ok(Partition {
        objective: if options.max_evaluations > 0 {
            Objective::Step
        } else {
            Objective::Bottleneck
        },
        predicted_step,
        bottleneck: model.bottleneck(&cut),
        rank_load: model.rank_load(&cut),
        peak_memory: model.peak_memory(&cut),
        bottleneck_optimum,
        bottleneck_step,
        exact,
        equal_cut_step,
        equal_cut_bottleneck: model.bottleneck(&equal_cut),
        equal_cut,
        bottleneck_cut,
        cut,
        evaluations,
        memory_cap: cap,
    })
}

/// The least bottleneck to a relative `1e-10`, by tests of the exact feasibility test.
///
/// A test costs more the more slack its limit leaves above the optimum (more states stay
/// reachable), so the search avoids loose limits: it climbs from the lower bound of
/// [`Solver::lower_bound`], by limits a growing share above the last infeasible one, until a
/// test is feasible; then it bisects. A bisection alone needs about 35 tests to close the
/// bracket to the tolerance; instead, once the last cut found lies below the limit it was
/// found under by at least half the bracket (a sign that it is the optimum), the next test
/// asks whether any cut beats it by more than the tolerance, and "no" ends the search. A
/// "yes" is followed by a bisection step unless the new cut again lies that far below its
/// limit, so the search never takes more than about twice the tests of a bisection.
fn exact_bottleneck(model: &Model<'_>, cap: Option<f64>) -> Result<Vec<usize>, PartitionError> {
    const TOLERANCE: f64 = 1e-10;
    let solver = Solver::new(&model.placement, &model.prefix);
    let memory = cap.unwrap_or(f64::INFINITY);
    let unbounded = Limits {
        time: f64::INFINITY,
        memory,
    };
    // Start from the equal-layer cut when it is within the cap: it bounds the optimum
    // without a search over every cut.
    let equal = model.equal_cut();
    let start = if model.within_cap(&equal, cap) {
        Some(equal)
    } else {
        solver.feasible(unbounded)
    };
    let Some(mut best) = start else {
        return Err(PartitionError::MemoryCap {
            cap: memory,
            least: Some(least_cap(model, &solver)),
        });
    };
    let mut hi = model.bottleneck(&best);
    let mut lo = solver.lower_bound().min(hi);
    // The climb's step, as a share of `lo`, until a test is feasible.
    let mut climb = 1e-4;
    let mut found = false;
    // How far below its limit the last feasible test's cut was.
    let mut snap = 0.0f64;
    for _ in 0..400 {
        if hi - lo <= TOLERANCE * hi || hi <= 0.0 {
            break;
        }
        let half = lo + (hi - lo) / 2.0;
        let beat = found && hi - lo <= 2.0 * snap;
        let mid = if beat {
            (hi - TOLERANCE * hi).max(lo)
        } else if !found {
            (lo + climb * lo).min(half)
        } else {
            half
        };
        match solver.feasible(Limits { time: mid, memory }) {
            Some(cut) => {
                let value = model.bottleneck(&cut);
                if value >= hi {
                    // Rounding between the test's sums and the direct ones: stop here.
                    break;
                }
                best = cut;
                snap = mid - value;
                hi = value;
                found = true;
            }
            // No cut beats `hi` by more than the tolerance.
            None if beat => break,
            None => {
                lo = mid;
                climb *= 2.0;
            }
        }
    }
    Ok(best)
}

/// The least memory cap some cut meets (bisection with no time limit).
fn least_cap(model: &Model<'_>, solver: &Solver<'_>) -> f64 {
    let Some(cut) = solver.feasible(Limits {
        time: f64::INFINITY,
        memory: f64::INFINITY,
    }) else {
        return f64::INFINITY;
    };
    let mut hi = model.memory_bound(&cut).into_iter().fold(0.0, f64::max);
    let mut lo = 0.0f64;
    for _ in 0..200 {
        if hi - lo <= 1e-9 * hi || hi <= 0.0 {
            break;
        }
        let mid = lo + (hi - lo) / 2.0;
        match solver.feasible(Limits {
            time: f64::INFINITY,
            memory: mid,
        }) {
            Some(cut) => {
                let value = model.memory_bound(&cut).into_iter().fold(0.0, f64::max);
                if value >= hi {
                    break;
                }
                hi = value;
            }
            None => lo = mid,
        }
    }
    hi.ceil()
}

/// The cuts one layer away from `cut`: each boundary moved by one, stages kept non-empty.
fn neighbours(cut: &[usize]) -> impl Iterator<Item = Vec<usize>> + '_ {
    (1..cut.len() - 1).flat_map(move |i| {
        [false, true].into_iter().filter_map(move |up| {
            let moved = if up { cut[i] + 1 } else { cut[i] - 1 };
            (moved > cut[i - 1] && moved < cut[i + 1]).then(|| {
                let mut next = cut.to_vec();
                next[i] = moved;
                next
            })
        })
    })
}

/// For placements the exact method does not cover: start from the cut that balances the
/// layers' total `f + b`, then move single layers while that lowers (bottleneck, sum of
/// squared loads), under the cap.
fn local_bottleneck(model: &Model<'_>, cap: Option<f64>) -> Result<Vec<usize>, PartitionError> {
    let (l, s) = (model.layers.layers.len(), model.num_stages());
    let total = |i: usize| model.prefix[i][F] + model.prefix[i][BI] + model.prefix[i][W];
    let mut cut = vec![0usize; s + 1];
    cut[s] = l;
    for i in 1..s {
        let target = total(l) * i as f64 / s as f64;
        let mut j = (cut[i - 1] + 1).max(1);
        while j < l - (s - i) && total(j) < target {
            j += 1;
        }
        cut[i] = j;
    }
    let excess = |cut: &[usize]| match cap {
        Some(cap) => model
            .memory_bound(cut)
            .into_iter()
            .map(|m| (m - cap).max(0.0))
            .sum::<f64>(),
        None => 0.0,
    };
    let key = |cut: &[usize]| {
        let load = model.rank_load(cut);
        (
            excess(cut),
            load.iter().copied().fold(0.0, f64::max),
            load.iter().map(|v| v * v).sum::<f64>(),
        )
    };
    let mut current = key(&cut);
    loop {
        let best = neighbours(&cut)
            .map(|next| (key(&next), next))
            .min_by(|x, y| x.0.partial_cmp(&y.0).unwrap_or(std::cmp::Ordering::Equal));
        match best {
            Some((k, next)) if k < current => {
                current = k;
                cut = next;
            }
            _ => break,
        }
    }
    if current.0 > 0.0 {
        return Err(PartitionError::MemoryCap {
            cap: cap.unwrap_or(f64::INFINITY),
            least: None,
        });
    }
    Ok(cut)
}

/// Single-layer moves accepted while the simulated step time drops; boundaries next to the
/// most loaded ranks are tried first, each towards the lighter side first.
fn refine(
    model: &Model<'_>,
    cap: Option<f64>,
    start: &[usize],
    start_step: f64,
    budget: usize,
) -> Result<(Vec<usize>, f64, usize), PartitionError> {
    let mut cut = start.to_vec();
    let mut step = start_step;
    let mut evaluations = 0;
    let mut replay = Replay::default();
    let s = model.num_stages();
    'passes: while evaluations < budget {
        let load = model.rank_load(&cut);
        let stage_load: Vec<f64> = (0..s)
            .map(|st| {
                model.placement.holders[st]
                    .iter()
                    .map(|&r| load[r as usize])
                    .fold(0.0, f64::max)
            })
            .collect();
        let mut moves: Vec<(f64, usize, bool)> = (1..s)
            .flat_map(|i| {
                let (left, right) = (stage_load[i - 1], stage_load[i]);
                let heavier = left.max(right);
                // Moving the boundary down gives a layer to the right stage.
                [(heavier, i, left < right), (heavier, i, left >= right)]
            })
            .collect();
        moves.sort_by(|x, y| y.0.total_cmp(&x.0));
        for (_, i, up) in moves {
            if evaluations >= budget {
                break 'passes;
            }
            let moved = if up { cut[i] + 1 } else { cut[i] - 1 };
            if !(moved > cut[i - 1] && moved < cut[i + 1]) {
                continue;
            }
            let mut next = cut.clone();
            next[i] = moved;
            if !model.within_cap(&next, cap) {
                continue;
            }
            evaluations += 1;
            let t = model.step_with(&next, &mut replay)?;
            if t < step - 1e-12 * step {
                cut = next;
                step = t;
                continue 'passes;
            }
        }
        // A whole pass without a better move: a local optimum.
        break;
    }
    Ok((cut, step, evaluations))
}
