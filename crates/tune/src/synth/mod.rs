//! The schedule synthesiser: a search over compute orders for the user's own costs, starting
//! from the planner's families, within an activation-memory cap.
//!
//! What is searched, for a fixed placement of stages on ranks (the start family's: V for
//! `dualpipev` and `zbv`, a loop for `interleaved-1f1b`, one stage per rank for `1f1b` and
//! `zb1p`, DualPipe's two routes when two copies are allowed): each rank's order of computes,
//! where forward and backward pairs are overlapped into `FB`, which backwards defer their
//! weight gradient, and where each `W` goes. From each start point the search first builds
//! orders by list scheduling with random policies (`build.rs`), judged by the fast timing of
//! `order.rs` (the as-soon-as-possible run of the compute order with message latencies), and
//! lowers the best few; then it climbs by local moves (swap neighbours, move a compute a few
//! places, defer or undo a `W`, move a `W`, split or form an `FB`, shift the pairing of a run
//! of `FB`s on one rank or on several). A move whose fast timing is clearly slower than the
//! current order's is dropped unlowered; every other candidate is lowered by the planner's
//! lowering pass for the costs, validated and simulated under both execution models, and kept
//! when it is not slower by `max(blocking, async)`, then their sum. Orders over the memory cap or that
//! wait in a cycle are never lowered. The start family's own planned schedule is a candidate
//! too, so the result is never slower than its start point.
//!
//! Costs follow `compare --model-cost`: whole-model costs per micro-batch divided over each
//! layout's stages ([`SynthCosts::Model`]), or a cost file's costs made per stage as the tuner
//! makes them ([`SynthCosts::File`], see [`crate::stage_costs`]). Memory is activation memory
//! in N-ths of the model's activations per micro-batch: 1F1B holds N of them on its first rank.
//!
//! Deterministic: the same request (seed and evaluation budget included) gives the same
//! schedule; a wall-time cap ([`SynthRequest::seconds`]) only cuts the search short.
//!
//! ```
//! use dualpipe_schedule::Costs;
//! use dualpipe_tune::synth::{MemoryCap, SynthCosts, SynthRequest, synthesize};
//! let mut model = Costs::default();
//! model.apply_assignments("f=4,b=8,w=4,fb=10,comm=0.1").unwrap();
//! let mut request = SynthRequest::new(2, 8);
//! request.memory = MemoryCap::Like(dualpipe_planner::Family::DualPipeV);
//! request.evaluations = 500;
//! let result = synthesize(&request, &SynthCosts::Model(model)).unwrap();
//! assert!(result.objective() <= result.start_objective());
//! assert!(result.peak_memory <= result.memory_cap.unwrap() + 1e-9);
//! ```

mod build;
mod deep;
mod order;

pub use deep::{Depth, DepthPoint, deep_v};

use std::fmt;
use std::time::{Duration, Instant};

use dualpipe_planner::lower::{Header, lower_for};
use dualpipe_planner::{Family, PlanRequest, check, plan, plan_for};
use dualpipe_schedule::{
    ComputeOrder, Costs, ExecutionModel, Instruction, Schedule, ValidSchedule, simulate,
};

use build::{Policy, build};
use order::{Figures, Rng, Scratch, random_move};

/// The label in the `schedule` field of a synthesised schedule.
pub const LABEL: &str = "synthesized";

/// The costs a synthesis runs under.
#[derive(Clone, Debug, PartialEq)]
pub enum SynthCosts {
    /// Whole-model costs per micro-batch (f, b, w, fb of the whole model; messages as they
    /// are), divided equally over the stages of each layout ([`Costs::per_stage_of_model`]).
    Model(Costs),
    /// A cost file's costs, made per stage for each layout as [`crate::stage_costs`] does.
    File(Costs),
}

impl SynthCosts {
    /// The per-stage costs of `valid`'s layout.
    pub fn for_layout(&self, valid: &ValidSchedule) -> Costs {
        match self {
            SynthCosts::Model(model) => model.per_stage_of_model(valid.topology().num_stages()),
            SynthCosts::File(file) => crate::stage_costs(file, valid).0,
        }
    }

    fn costs(&self) -> &Costs {
        match self {
            SynthCosts::Model(c) | SynthCosts::File(c) => c,
        }
    }
}

/// The activation-memory cap of a synthesis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryCap {
    /// No cap.
    None,
    /// At most this much activation memory on any rank, in N-ths of the model's activations
    /// per micro-batch.
    Share(f64),
    /// At most the peak of this family's planned schedule under the same costs.
    Like(Family),
}

/// What to synthesise.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthRequest {
    /// Number of ranks N.
    pub ranks: u32,
    /// Micro-batches per step C.
    pub microbatches: u32,
    /// Stages S (a multiple of N); `None`: every family's own layout, N or 2N stages
    /// (interleaved 1F1B with two chunks per rank).
    pub stages: Option<u32>,
    /// The activation-memory cap.
    pub memory: MemoryCap,
    /// Parameter copies allowed per rank, in N-ths of the model: 1, or 2 (DualPipe's two
    /// copies may then be a start point).
    pub copies: u32,
    /// Start only from this family; `None`: every family with S stages that fits.
    pub start: Option<Family>,
    /// Seed of the search.
    pub seed: u64,
    /// Compute orders evaluated by the search (the budget that makes it deterministic).
    pub evaluations: u64,
    /// Wall-time cap in seconds; `None`: none. Only cuts the search short.
    pub seconds: Option<f64>,
}

impl SynthRequest {
    /// Every family's layout, no memory cap, one copy, every start family, seed 0, 20 000 evaluations, no
    /// wall-time cap.
    pub fn new(ranks: u32, microbatches: u32) -> SynthRequest {
        SynthRequest {
            ranks,
            microbatches,
            stages: None,
            memory: MemoryCap::None,
            copies: 1,
            start: None,
            seed: 0,
            evaluations: 20_000,
            seconds: None,
        }
    }
}

/// Why nothing was synthesised.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SynthError {
    /// A parameter is out of range; the message names it.
    #[error("{0}")]
    Request(String),
    /// The costs cannot be used.
    #[error("costs: {0}")]
    Costs(String),
    /// No start point fits the memory cap.
    #[error("{0}")]
    Cap(String),
    /// A lowered or planned schedule is invalid or does not simulate: a bug.
    #[error("internal error, please report it: {0}")]
    Internal(String),
}

/// One planned family under the synthesis's costs.
#[derive(Clone, Debug, PartialEq)]
pub struct Baseline {
    /// The family.
    pub family: Family,
    /// Its stages.
    pub stages: u32,
    /// Step time under the blocking model.
    pub blocking: f64,
    /// Step time under the async model.
    pub async_step: f64,
    /// Activation memory of its fullest rank, in N-ths of the model's activations per
    /// micro-batch.
    pub peak_memory: f64,
    /// Parameters held by its fullest rank, in N-ths of the model.
    pub copies: f64,
}

impl Baseline {
    /// `max(blocking, async)`.
    pub fn objective(&self) -> f64 {
        self.blocking.max(self.async_step)
    }
}

/// The result of [`synthesize`].
#[derive(Clone, Debug)]
pub struct Synthesis {
    /// The schedule (label [`LABEL`], lowered for [`Synthesis::costs`], validated).
    pub schedule: ValidSchedule,
    /// The per-stage costs it was lowered and simulated for.
    pub costs: Costs,
    /// The family whose placement and order it started from.
    pub start: Family,
    /// Step time under the blocking model.
    pub blocking: f64,
    /// Step time under the async model.
    pub async_step: f64,
    /// Activation memory of its fullest rank, in N-ths of the model's activations per
    /// micro-batch.
    pub peak_memory: f64,
    /// Parameters held by its fullest rank, in N-ths of the model.
    pub copies: f64,
    /// The cap applied, in the same unit; `None`: no cap.
    pub memory_cap: Option<f64>,
    /// The start family's planned schedule under the same costs.
    pub start_point: Baseline,
    /// Every family that accepts the request's N and C, planned under the same costs.
    pub baselines: Vec<Baseline>,
    /// Compute orders the search evaluated.
    pub evaluations: u64,
    /// Schedules lowered, validated and simulated.
    pub lowered: u64,
    /// Whether the wall-time cap cut the search short.
    pub cut_short: bool,
}

impl Synthesis {
    /// `max(blocking, async)` of the result.
    pub fn objective(&self) -> f64 {
        self.blocking.max(self.async_step)
    }

    /// `max(blocking, async)` of the start point.
    pub fn start_objective(&self) -> f64 {
        self.start_point.objective()
    }
}

/// Stages of a family on `n` ranks (interleaved 1F1B with two chunks per rank).
fn family_stages(family: Family, n: u32) -> u32 {
    match family {
        Family::DualPipeV | Family::Zbv | Family::Interleaved1F1B => 2 * n,
        _ => n,
    }
}

fn family_request(family: Family, n: u32, c: u32, stages: u32) -> PlanRequest {
    let mut request = PlanRequest::new(family, n, c);
    if family == Family::Interleaved1F1B {
        request = request.chunks_per_rank((stages / n.max(1)).max(1));
    }
    request
}

/// The compute order of a schedule: every rank's computes, messages dropped.
fn computes(schedule: &Schedule) -> Vec<Vec<Instruction>> {
    schedule
        .ranks
        .iter()
        .map(|l| l.iter().copied().filter(|i| i.is_compute()).collect())
        .collect()
}

/// Simulates `valid` under both models.
fn both(valid: &ValidSchedule, costs: &Costs) -> Result<(f64, f64), String> {
    let b = simulate(valid, costs, ExecutionModel::Blocking).map_err(|e| e.to_string())?;
    let a = simulate(valid, costs, ExecutionModel::Async).map_err(|e| e.to_string())?;
    Ok((b.makespan, a.makespan))
}

fn copies_of(valid: &ValidSchedule) -> f64 {
    let t = valid.topology();
    let held = t.stages_per_rank().into_iter().max().unwrap_or(0);
    f64::from(held) * f64::from(t.num_ranks()) / f64::from(t.num_stages().max(1))
}

/// A planned family: its schedule, costs and figures.
struct Planned {
    baseline: Baseline,
    valid: ValidSchedule,
    costs: Costs,
}

fn plan_family(request: &PlanRequest, costs: &SynthCosts) -> Result<Planned, SynthError> {
    let family = request.family;
    let internal = |e: &dyn fmt::Display| SynthError::Internal(format!("{family}: {e}"));
    let default = plan(request).map_err(|e| internal(&e))?;
    let layout = costs.for_layout(&default);
    let valid = plan_for(request, &layout).map_err(|e| internal(&e))?;
    let (blocking, async_step) = both(&valid, &layout).map_err(|e| internal(&e))?;
    let figures = Figures::new(valid.topology(), &layout);
    let baseline = Baseline {
        family,
        stages: valid.topology().num_stages(),
        blocking,
        async_step,
        peak_memory: figures.peak_memory(&computes(valid.schedule())),
        copies: copies_of(&valid),
    };
    Ok(Planned {
        baseline,
        valid,
        costs: layout,
    })
}

/// Margin on memory comparisons, against rounding of the per-stage shares.
const EPS: f64 = 1e-9;

/// The climb with the best objective so far (the first of equals); `climbs` is not empty.
fn leading(climbs: &[Climb]) -> usize {
    (0..climbs.len())
        .min_by(|&x, &y| {
            climbs[x]
                .best
                .0
                .partial_cmp(&climbs[y].best.0)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(x.cmp(&y))
        })
        .expect("at least one start point")
}

/// Synthesises a schedule; see the module documentation.
pub fn synthesize(request: &SynthRequest, costs: &SynthCosts) -> Result<Synthesis, SynthError> {
    let began = Instant::now();
    let deadline = match request.seconds {
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            return Err(SynthError::Request(format!(
                "seconds: {s} is not a usable wall-time cap; give a number of seconds, not negative"
            )));
        }
        Some(s) => Some(began + Duration::from_secs_f64(s.min(1e9))),
        None => None,
    };
    let (n, c) = (request.ranks, request.microbatches);
    if n == 0 {
        return Err(SynthError::Request(
            "ranks: 0; a schedule needs at least 1 rank".into(),
        ));
    }
    if c == 0 {
        return Err(SynthError::Request(
            "microbatches: 0; a step needs at least 1 micro-batch".into(),
        ));
    }
    if !(1..=2).contains(&request.copies) {
        return Err(SynthError::Request(format!(
            "copies: {}; a rank holds 1 or 2 copies of its share of the parameters",
            request.copies
        )));
    }
    let stages = request.stages.unwrap_or(2 * n);
    if stages == 0 || stages % n != 0 {
        return Err(SynthError::Request(format!(
            "stages: {stages}; the layouts searched place the same number of stages on every rank, so S must be a positive multiple of N = {n}"
        )));
    }
    costs
        .costs()
        .check()
        .map_err(|e| SynthError::Costs(e.to_string()))?;
    if let Some(start) = request.start {
        let own = family_stages(start, n);
        if request.stages.is_some() && start != Family::Interleaved1F1B && own != stages {
            return Err(SynthError::Request(format!(
                "start: {start} cuts the model into {} stages, not the {stages} asked for (--stages)",
                start.stages_formula()
            )));
        }
        if start == Family::DualPipe && request.copies < 2 {
            return Err(SynthError::Request(
                "start: dualpipe holds two copies of the parameters; allow them with copies 2"
                    .into(),
            ));
        }
        check(&family_request(start, n, c, stages)).map_err(|e| {
            SynthError::Request(format!(
                "start: {e} (micro-batches C = {c} is too few or does not fit)"
            ))
        })?;
    }

    // Baselines: every family that accepts N and C, at its own stage count.
    let mut baselines = Vec::new();
    let mut starts: Vec<Planned> = Vec::new();
    for family in Family::ALL {
        let own = family_request(family, n, c, family_stages(family, n));
        if check(&own).is_err() {
            continue;
        }
        let planned = plan_family(&own, costs)?;
        baselines.push(planned.baseline.clone());
        let as_start = family_request(family, n, c, stages);
        let eligible = match request.start {
            Some(s) => s == family,
            None => {
                (request.stages.is_none()
                    || family_stages(family, n) == stages
                    || family == Family::Interleaved1F1B)
                    && (family != Family::DualPipe || request.copies >= 2)
                    && family != Family::GPipe
            }
        };
        if !eligible || check(&as_start).is_err() {
            continue;
        }
        if as_start == own {
            starts.push(planned);
        } else {
            starts.push(plan_family(&as_start, costs)?);
        }
    }
    let cap = match request.memory {
        MemoryCap::None => None,
        MemoryCap::Share(x) => {
            if !(x.is_finite() && x > 0.0) {
                return Err(SynthError::Request(format!(
                    "memory cap: {x}; give a positive number of N-ths of the model's activations per micro-batch"
                )));
            }
            Some(x)
        }
        MemoryCap::Like(family) => match baselines.iter().find(|b| b.family == family) {
            Some(b) => Some(b.peak_memory),
            None => {
                return Err(SynthError::Request(format!(
                    "memory like {family}: {family} does not accept N = {n}, C = {c} (it needs {})",
                    family.constraint()
                )));
            }
        },
    };
    if starts.is_empty() {
        return Err(SynthError::Request(format!(
            "no family gives a start point with N = {n}, C = {c}, S = {stages}: micro-batches C = {c} is too few or S does not match a family's layout (dualpipev and zbv: S = 2N; zb1p and 1f1b: S = N; interleaved-1f1b: S = kN)"
        )));
    }
    if let Some(cap) = cap {
        let least = starts
            .iter()
            .map(|p| p.baseline.peak_memory)
            .fold(f64::INFINITY, f64::min);
        starts.retain(|p| p.baseline.peak_memory <= cap + EPS);
        if starts.is_empty() {
            return Err(SynthError::Cap(format!(
                "memory cap {cap:.4} N-ths of the model's activations is below every start point: the least is {least:.4}"
            )));
        }
    }

    // The search: a quarter of the budget shared equally by the start points, in family
    // order; the rest to the one that is best after its share.
    let mut climbs: Vec<Climb> = Vec::with_capacity(starts.len());
    let mut cut_short = false;
    let first = request.evaluations / 4 / starts.len() as u64;
    for (index, start) in starts.iter().enumerate() {
        let judge = Judge {
            figures: Figures::new(start.valid.topology(), &start.costs),
            header: Header {
                schedule: LABEL.into(),
                num_ranks: n,
                num_stages: start.valid.topology().num_stages(),
                num_microbatches: c,
                forward_only: false,
                pipelines: start.valid.schedule().pipelines.clone(),
            },
            costs: start.costs.clone(),
            cap: cap.unwrap_or(f64::INFINITY),
        };
        let rng = Rng::new(request.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut climb = Climb::new(judge, start, rng);
        cut_short |= climb.run(first, deadline);
        climbs.push(climb);
    }
    let leader = leading(&climbs);
    let spent: u64 = climbs.iter().map(|c| c.used).sum();
    if !cut_short {
        cut_short |= climbs[leader].run(request.evaluations.saturating_sub(spent), deadline);
    }
    let evaluations: u64 = climbs.iter().map(|c| c.used).sum();
    let lowered: u64 = climbs.iter().map(|c| c.lowered).sum();
    let index = leading(&climbs);
    let ((_, _), blocking, async_step, valid) = climbs.swap_remove(index).best;
    let start = &starts[index];
    let figures = Figures::new(valid.topology(), &start.costs);
    let peak_memory = figures.peak_memory(&computes(valid.schedule()));
    Ok(Synthesis {
        copies: copies_of(&valid),
        schedule: valid,
        costs: start.costs.clone(),
        start: start.baseline.family,
        blocking,
        async_step,
        peak_memory,
        memory_cap: cap,
        start_point: start.baseline.clone(),
        baselines,
        evaluations,
        lowered,
        cut_short,
    })
}

/// The schedule with the batches posted back to back in one gap between computes merged into
/// one: a commit followed only by sends and receives up to the next commit is dropped, so the
/// later batch's messages are posted with the earlier one's. Posting earlier never delays a
/// partner; the result is validated before use all the same.
fn merge_batches(schedule: &Schedule) -> Schedule {
    let mut out = schedule.clone();
    for list in &mut out.ranks {
        let mut merged = Vec::with_capacity(list.len());
        for (i, &instruction) in list.iter().enumerate() {
            if instruction == Instruction::Commit {
                // The next instruction that is not a send or receive.
                let next = list[i + 1..]
                    .iter()
                    .find(|x| !matches!(x, Instruction::Send(_) | Instruction::Recv(_)));
                if next == Some(&Instruction::Commit) {
                    continue;
                }
            }
            merged.push(instruction);
        }
        *list = merged;
    }
    out
}

/// Lowers, validates and simulates compute orders of one placement.
struct Judge {
    figures: Figures,
    header: Header,
    costs: Costs,
    cap: f64,
}

/// The search key: `(max(blocking, async), blocking + async)`, less is better.
type Key = (f64, f64);

fn key(blocking: f64, async_step: f64) -> Key {
    (blocking.max(async_step), blocking + async_step)
}

impl Judge {
    /// The simulated steps of `order` once lowered, or `None` when it is over the memory cap,
    /// waits in a cycle or does not lower.
    fn judge(
        &self,
        order: &[Vec<Instruction>],
        scratch: &mut Scratch,
    ) -> Option<(f64, f64, ValidSchedule)> {
        if self.figures.peak_memory(order) > self.cap + EPS {
            return None;
        }
        self.figures.makespan(order, scratch)?;
        let order = ComputeOrder::new(self.header.clone(), order.to_vec()).ok()?;
        let schedule = lower_for(order, &self.costs).ok()?;
        // One batch per gap between computes where that is valid: every commit costs a
        // blocking rank the message time.
        if let Ok(valid) = ValidSchedule::new(merge_batches(&schedule))
            && let Ok((b, a)) = both(&valid, &self.costs)
        {
            return Some((b, a, valid));
        }
        let valid = ValidSchedule::new(schedule).ok()?;
        let (b, a) = both(&valid, &self.costs).ok()?;
        Some((b, a, valid))
    }
}

/// How much slower than the current order's, relatively, a candidate's fast timing may be for
/// the candidate to be lowered.
const SCREEN: f64 = 0.003;

/// What building one order counts against the evaluation budget.
const BUILD_COST: u64 = 1;

/// The search from one start point: a share of its budget builds orders with random policies
/// ([`build`]) and keeps the best of them; then it climbs by local moves from the best order
/// met, accepting a move whose lowered schedule is not slower (by `max(blocking, async)`, then
/// their sum) and keeps the memory cap.
struct Climb {
    judge: Judge,
    rng: Rng,
    current: Vec<Vec<Instruction>>,
    value: Key,
    /// The fast timing of `current` ([`Figures::makespan`]).
    fast: f64,
    /// The best schedule met: its key, blocking and async steps.
    best: (Key, f64, f64, ValidSchedule),
    used: u64,
    lowered: u64,
    built: bool,
    scratch: Scratch,
}

impl Climb {
    fn new(judge: Judge, start: &Planned, rng: Rng) -> Climb {
        let b = start.baseline.blocking;
        let a = start.baseline.async_step;
        Climb {
            judge,
            rng,
            current: computes(start.valid.schedule()),
            value: (f64::INFINITY, f64::INFINITY),
            fast: f64::INFINITY,
            best: (key(b, a), b, a, start.valid.clone()),
            used: 0,
            lowered: 0,
            built: false,
            scratch: Scratch::default(),
        }
    }

    fn offer(&mut self, order: &[Vec<Instruction>]) -> Option<Key> {
        self.lowered += 1;
        let (b, a, valid) = self.judge.judge(order, &mut self.scratch)?;
        let k = key(b, a);
        if k < self.best.0 {
            self.best = (k, b, a, valid);
        }
        Some(k)
    }

    /// Runs `budget` more evaluations; `true` when the deadline stopped it.
    fn run(&mut self, budget: u64, deadline: Option<Instant>) -> bool {
        let end = self.used + budget;
        let late = || deadline.is_some_and(|d| Instant::now() >= d);
        if !self.built {
            self.built = true;
            let initial = self.current.clone();
            if let Some(k) = self.offer(&initial) {
                self.value = k;
            }
            self.fast = self
                .judge
                .figures
                .makespan(&initial, &mut self.scratch)
                .unwrap_or(f64::INFINITY);
            self.used += 1;
            // Building blocks: a tenth of this share; the best few by fast timing lowered.
            let builds = budget / 10;
            let mut built: Vec<(f64, Vec<Vec<Instruction>>)> = Vec::new();
            let mut spent = 0;
            while spent < builds {
                if late() {
                    return true;
                }
                spent += BUILD_COST;
                let policy = Policy::random(&mut self.rng);
                let ranks = self.judge.header.num_ranks;
                let Some(order) = build(
                    &self.judge.figures,
                    ranks,
                    self.judge.cap,
                    &policy,
                    &mut self.rng,
                ) else {
                    continue;
                };
                if self.judge.figures.peak_memory(&order) > self.judge.cap + EPS {
                    continue;
                }
                if let Some(v) = self.judge.figures.makespan(&order, &mut self.scratch) {
                    built.push((v, order));
                }
            }
            self.used += spent;
            built.sort_by(|x, y| x.0.total_cmp(&y.0));
            for (fast, order) in built.into_iter().take(4) {
                self.used += 1;
                if let Some(k) = self.offer(&order)
                    && k < self.value
                {
                    self.value = k;
                    self.fast = fast;
                    self.current = order;
                }
            }
        }
        let mut candidate = self.current.clone();
        while self.used < end {
            if self.used % 8 == 0 && late() {
                return true;
            }
            self.used += 1;
            candidate.clone_from(&self.current);
            if !random_move(&mut candidate, &mut self.rng, true) {
                continue;
            }
            // Screen by the fast timing: a move that it finds much slower than the current
            // order, over the cap or waiting in a cycle is not lowered.
            if self.judge.figures.peak_memory(&candidate) > self.judge.cap + EPS {
                continue;
            }
            let Some(fast) = self.judge.figures.makespan(&candidate, &mut self.scratch) else {
                continue;
            };
            if fast > self.fast + SCREEN * self.fast {
                continue;
            }
            let Some(k) = self.offer(&candidate) else {
                continue;
            };
            if k <= self.value {
                std::mem::swap(&mut self.current, &mut candidate);
                self.value = k;
                self.fast = fast;
            }
        }
        false
    }
}
