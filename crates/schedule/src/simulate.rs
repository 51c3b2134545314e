//! The simulator: when every instruction of a valid schedule starts and ends under a cost model,
//! and what that costs each rank (busy and idle time, activation and weight-gradient peaks).
//!
//! It follows the two execution models of the validator (`validate/progress.rs`) exactly, with
//! times attached:
//!
//! - **Blocking** (the reference implementation): a rank runs its list in order on one clock. A
//!   compute takes its cost. A commit posts its batch at the rank's clock and returns when every
//!   op of the batch has met its partner: an op completes at the later of the two posts plus the
//!   message time, and the commit returns when its last op completes.
//! - **Async**: each rank has a host, a compute stream and a communication stream. A commit
//!   launches its batch at the host's time and returns at once. A batch starts when it is
//!   launched, the previous batch of the stream has finished, and every compute whose result it
//!   sends has ended; an op completes at the later of its batch's start and its partner batch's
//!   start plus the message time; a batch finishes with its last op. A compute starts when the
//!   previous compute has ended and every batch carrying one of its inputs has finished; the host
//!   waits for those inputs too before it goes on.
//!
//! Every event time of the async model is at most the matching one of the blocking model, so an
//! async step is never longer than a blocking one.
//!
//! The run is event driven: each rank advances until it needs the time of a batch that another
//! rank has not reached yet, and waits on that batch. The work is linear in the number of
//! instructions.

use std::fmt;

use serde::Serialize;

use crate::costs::{ComputeCosts, CostError, Costs};
use crate::diagnostics::ExecutionModel;
use crate::format::{Instruction, Kind, Schedule, Work};
use crate::timeline::{Lane, Source, Span, Timeline, bubble_share};
use crate::topology::Topology;
use crate::validate::ValidSchedule;

/// When one instruction ran. For a send or receive, from the post (blocking) or start (async)
/// of its batch to the completion of the op; for a commit, the whole batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Interval {
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
}

/// What one rank did during the step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankSummary {
    /// Time spent computing (F, B, W and FB).
    pub busy: f64,
    /// `makespan - busy`: time the compute stream had nothing to do, the bubble.
    pub idle: f64,
    /// When the rank's last instruction ended.
    pub end: f64,
    /// Most activations live at once; an activation of (stage, mb) is live from the start of
    /// its forward to the end of its backward, or of its `W` when the backward defers it.
    pub peak_activations: u32,
    /// Most deferred weight gradients waiting for their `W` at once.
    pub peak_pending_w: u32,
}

/// The result of a simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    /// The execution model simulated.
    pub model: ExecutionModel,
    /// Time from the start of the step to the end of the last rank.
    pub makespan: f64,
    /// One summary per rank.
    pub ranks: Vec<RankSummary>,
    /// Per rank, per instruction: when it ran.
    pub times: Vec<Vec<Interval>>,
    /// The time unit of every time above: the cost model's (`""` for abstract units).
    pub unit: String,
}

impl Simulation {
    /// Share of the ranks' time spent idle: total idle over `ranks x makespan`.
    pub fn bubble_share(&self) -> f64 {
        bubble_share(self.makespan, self.ranks.iter().map(|r| r.busy))
    }

    /// The simulated timeline: every compute and commit of `schedule` (the schedule simulated)
    /// with its times, in the costs' unit.
    pub fn timeline(&self, schedule: &Schedule) -> Timeline {
        let mut spans = Vec::new();
        for (rank, list) in schedule.ranks.iter().enumerate() {
            for (index, instruction) in list.iter().enumerate() {
                let lane = match instruction {
                    Instruction::Commit => Lane::Comm,
                    i if i.is_compute() => Lane::Compute,
                    _ => continue,
                };
                let t = self.times[rank][index];
                spans.push(Span {
                    rank: rank as u32,
                    index,
                    lane,
                    start: t.start,
                    end: t.end,
                });
            }
        }
        Timeline {
            source: Source::Simulated(self.model),
            unit: self.unit.clone(),
            makespan: self.makespan,
            busy: self.ranks.iter().map(|r| r.busy).collect(),
            spans,
        }
    }
}

impl Simulation {
    /// The simulation of `valid` as the JSON document `dualpipe simulate --json` prints:
    /// `{"schedule", "num_ranks", "num_stages", "num_microbatches", "model", "costs", "unit",
    /// "costs_per", "makespan", "bubble_share", "ranks": [{"rank", "busy", "idle", "end",
    /// "peak_activations", "peak_pending_w"}, ...]}`, with `"instructions"` (per rank, per
    /// instruction: `{"index", "instruction", "start", "end"}`) added when `timeline` is set.
    /// `unit` is the cost model's time unit (`""` for abstract units), in which every time is
    /// given; `costs_per` is `"stage"`: the costs are those of one stage.
    /// Times are rounded to 1e-9 so that float noise does not show; the text is pretty-printed
    /// and ends with a newline.
    ///
    /// `valid` must be the schedule simulated and `costs` the cost model it ran with.
    pub fn to_json(&self, valid: &ValidSchedule, costs: &Costs, timeline: bool) -> String {
        let schedule = valid.schedule();
        let costs_text = costs.to_string();
        let report = JsonReport {
            schedule: &schedule.schedule,
            num_ranks: schedule.num_ranks,
            num_stages: schedule.num_stages,
            num_microbatches: schedule.num_microbatches,
            model: self.model.to_string(),
            costs: &costs_text,
            unit: &self.unit,
            costs_per: "stage",
            makespan: round(self.makespan),
            bubble_share: round(self.bubble_share()),
            ranks: self
                .ranks
                .iter()
                .enumerate()
                .map(|(rank, r)| JsonRank {
                    rank,
                    busy: round(r.busy),
                    idle: round(r.idle),
                    end: round(r.end),
                    peak_activations: r.peak_activations,
                    peak_pending_w: r.peak_pending_w,
                })
                .collect(),
            instructions: timeline.then(|| {
                schedule
                    .ranks
                    .iter()
                    .zip(&self.times)
                    .map(|(list, times)| {
                        list.iter()
                            .zip(times)
                            .enumerate()
                            .map(|(index, (i, t))| JsonTimed {
                                index,
                                instruction: i.to_string(),
                                start: round(t.start),
                                end: round(t.end),
                            })
                            .collect()
                    })
                    .collect()
            }),
        };
        // Strings, integers and floats only: serializing cannot fail (a non-finite float
        // becomes `null`).
        let mut text = serde_json::to_string_pretty(&report).unwrap_or_default();
        text.push('\n');
        text
    }

    /// The simulated timeline of `valid` as a Chrome trace ([`crate::chrome_trace`]), in real
    /// time when the costs named their unit, else one abstract time unit written as
    /// [`crate::TRACE_UNIT_US`] microseconds.
    pub fn chrome_trace(&self, valid: &ValidSchedule) -> String {
        crate::trace::chrome_trace(valid, &self.timeline(valid.schedule()))
    }
}

/// Times in JSON, rounded to 1e-9 so that float noise does not show.
fn round(value: f64) -> f64 {
    (value * 1e9).round() / 1e9
}

#[derive(Serialize)]
struct JsonReport<'a> {
    schedule: &'a str,
    num_ranks: u32,
    num_stages: u32,
    num_microbatches: u32,
    model: String,
    costs: &'a str,
    unit: &'a str,
    costs_per: &'static str,
    makespan: f64,
    bubble_share: f64,
    ranks: Vec<JsonRank>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instructions: Option<Vec<Vec<JsonTimed>>>,
}

#[derive(Serialize)]
struct JsonRank {
    rank: usize,
    busy: f64,
    idle: f64,
    end: f64,
    peak_activations: u32,
    peak_pending_w: u32,
}

#[derive(Serialize)]
struct JsonTimed {
    index: usize,
    instruction: String,
    start: f64,
    end: f64,
}

/// Why a simulation could not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimulateError {
    /// The cost model does not fit the schedule.
    Costs(CostError),
    /// The run stopped before the end. The validator rules this out for valid schedules, so
    /// this means the two disagree: a bug to report.
    Stalled(String),
}

impl fmt::Display for SimulateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimulateError::Costs(error) => write!(f, "{error}"),
            SimulateError::Stalled(where_) => write!(
                f,
                "internal error, please report it: the simulation of a valid schedule stopped: {where_}"
            ),
        }
    }
}

impl std::error::Error for SimulateError {}

impl From<CostError> for SimulateError {
    fn from(error: CostError) -> Self {
        SimulateError::Costs(error)
    }
}

const NONE: u32 = u32::MAX;

/// One send or receive, as its batch sees it.
#[derive(Clone, Copy, Debug)]
struct Op {
    /// Instruction index on its rank.
    index: u32,
    /// Global id of the partner's batch.
    partner: u32,
    /// Message time.
    time: f64,
    /// For a send under the async model: the producer whose end the batch waits for, as
    /// `2 * slot + kind` (0 = forward, 1 = backward); `NONE` for a receive.
    producer: u32,
}

/// The batches of [`ValidSchedule::batches`] with their ops and message times, laid out flat.
struct BatchOps {
    /// Per rank: global id of its first batch.
    first: Vec<u32>,
    /// Per global batch: range of its ops in `ops` (`op_start[g]..op_start[g + 1]`).
    op_start: Vec<u32>,
    ops: Vec<Op>,
    /// Per global batch: its rank and the index of its commit.
    commit: Vec<(u32, u32)>,
}

impl BatchOps {
    fn new(valid: &ValidSchedule, costs: &Costs, topology: &Topology) -> BatchOps {
        let schedule = valid.schedule();
        let links = valid.links();
        let numbering = valid.batches();
        let total = numbering.total();
        let first: Vec<u32> = (0..schedule.ranks.len())
            .map(|rank| numbering.first(rank))
            .collect();
        let mut op_start = Vec::with_capacity(total as usize + 1);
        let mut commit = Vec::with_capacity(total as usize);
        let mut ops = Vec::new();
        // Message time per boundary, computed once.
        let boundary: Vec<f64> = (0..topology.num_stages())
            .map(|s| costs.message_time(s))
            .collect();
        for (rank, list) in schedule.ranks.iter().enumerate() {
            op_start.push(ops.len() as u32);
            for (index, instruction) in list.iter().enumerate() {
                match *instruction {
                    Instruction::Send(m) | Instruction::Recv(m) => {
                        let is_send = matches!(instruction, Instruction::Send(_));
                        let partner = links
                            .partner(rank, index)
                            .expect("a valid schedule pairs every message");
                        let peer = m.peer as usize;
                        // The boundary the message crosses: after the sending stage.
                        let sender_stage = match (m.kind, is_send) {
                            (Kind::Act, true) | (Kind::Grad, false) => m.stage,
                            (Kind::Act, false) | (Kind::Grad, true) => m.stage - 1,
                        };
                        let producer = if is_send {
                            let kind = u32::from(m.kind == Kind::Grad);
                            2 * topology.slot(m.work()) as u32 + kind
                        } else {
                            NONE
                        };
                        ops.push(Op {
                            index: index as u32,
                            partner: numbering.of(peer, partner),
                            time: boundary[sender_stage as usize],
                            producer,
                        });
                    }
                    Instruction::Commit => {
                        commit.push((rank as u32, index as u32));
                        op_start.push(ops.len() as u32);
                    }
                    _ => {}
                }
            }
            // Ops after the last commit are never posted; a valid schedule has none.
            ops.truncate(*op_start.last().expect("pushed above") as usize);
            op_start.pop();
        }
        op_start.push(ops.len() as u32);
        BatchOps {
            first,
            op_start,
            ops,
            commit,
        }
    }

    fn ops(&self, g: u32) -> std::ops::Range<usize> {
        self.op_start[g as usize] as usize..self.op_start[g as usize + 1] as usize
    }
}

/// Where one rank is.
#[derive(Clone, Copy, Debug, Default)]
struct RankState {
    cursor: usize,
    /// Commits passed.
    batches: u32,
    /// Blocking: the rank's clock. Async: the host's clock.
    clock: f64,
    /// Async: when the compute stream is free.
    compute_free: f64,
    busy: f64,
    live: u32,
    pending: u32,
    peak_live: u32,
    peak_pending: u32,
    /// Next rank waiting on the same batch (intrusive list).
    next_waiter: u32,
    done: bool,
}

/// Simulates one step of `valid` under `costs` and `model`.
///
/// ```
/// use dualpipe_schedule::{simulate, parse_program, Costs, ExecutionModel, Format, Pipeline,
///     Schedule, ValidSchedule};
/// let schedule = Schedule {
///     format: Format::V1,
///     schedule: "demo".into(),
///     num_ranks: 2,
///     num_stages: 2,
///     num_microbatches: 1,
///     forward_only: false,
///     pipelines: vec![Pipeline { route: vec![0, 1], microbatches: vec![0] }],
///     ranks: vec![
///         parse_program("F s0 m0 | send act s0 m0 -> r1 | commit | recv grad s0 m0 <- r1 | commit | B s0 m0").unwrap(),
///         parse_program("recv act s1 m0 <- r0 | commit | F s1 m0 | B s1 m0 | send grad s1 m0 -> r0 | commit").unwrap(),
///     ],
/// };
/// let valid = ValidSchedule::new(schedule).unwrap();
/// let run = simulate(&valid, &Costs::default(), ExecutionModel::Blocking).unwrap();
/// assert_eq!(run.makespan, 6.0); // F, F, B, B: 1 + 1 + 2 + 2
/// assert_eq!(run.ranks[0].idle, 3.0);
/// ```
pub fn simulate(
    valid: &ValidSchedule,
    costs: &Costs,
    model: ExecutionModel,
) -> Result<Simulation, SimulateError> {
    let schedule = valid.schedule();
    let topology = valid.topology();
    costs.check()?;
    costs.check_stages(topology.num_stages())?;
    let batches = BatchOps::new(valid, costs, topology);
    let compute = ComputeCosts::new(costs, topology.num_stages());
    let mut simulation = Run::new(schedule, topology, &batches, &compute, model).run()?;
    simulation.unit.clone_from(&costs.unit);
    Ok(simulation)
}

struct Run<'a> {
    schedule: &'a Schedule,
    topology: &'a Topology,
    batches: &'a BatchOps,
    compute: &'a ComputeCosts,
    model: ExecutionModel,
    /// Per global batch: when it was posted (blocking) or started (async); NaN until known.
    posted: Vec<f64>,
    /// Per global batch: when its last op completed; NaN until known.
    finished: Vec<f64>,
    /// Per global batch: first rank waiting for `posted`.
    waiters: Vec<u32>,
    /// Async: per (kind, slot) of a received buffer, the batch that receives it.
    received_by: [Vec<u32>; 2],
    /// Async: end of the forward and of the backward of each slot, as `2 * slot + kind`.
    produced: Vec<f64>,
    ranks: Vec<RankState>,
    times: Vec<Vec<Interval>>,
    ready: Vec<u32>,
}

/// What a rank needs before it can go on.
enum Step {
    /// Done with the list.
    Finished,
    /// Waiting for the post (blocking) or start (async) of this batch.
    Wait(u32),
}

impl<'a> Run<'a> {
    fn new(
        schedule: &'a Schedule,
        topology: &'a Topology,
        batches: &'a BatchOps,
        compute: &'a ComputeCosts,
        model: ExecutionModel,
    ) -> Self {
        let total = batches.commit.len();
        let slots = topology.num_stages() as usize * topology.num_microbatches() as usize;
        let is_async = model == ExecutionModel::Async;
        Run {
            schedule,
            topology,
            batches,
            compute,
            model,
            posted: vec![f64::NAN; total],
            finished: vec![f64::NAN; total],
            waiters: vec![NONE; total],
            received_by: if is_async {
                [vec![NONE; slots], vec![NONE; slots]]
            } else {
                [Vec::new(), Vec::new()]
            },
            produced: if is_async {
                vec![0.0; 2 * slots]
            } else {
                Vec::new()
            },
            ranks: vec![
                RankState {
                    next_waiter: NONE,
                    ..RankState::default()
                };
                schedule.ranks.len()
            ],
            times: schedule
                .ranks
                .iter()
                .map(|l| vec![Interval::default(); l.len()])
                .collect(),
            ready: (0..schedule.ranks.len() as u32).rev().collect(),
        }
    }

    fn run(mut self) -> Result<Simulation, SimulateError> {
        while let Some(rank) = self.ready.pop() {
            match self.advance(rank as usize) {
                Step::Finished => self.ranks[rank as usize].done = true,
                Step::Wait(g) => {
                    self.ranks[rank as usize].next_waiter = self.waiters[g as usize];
                    self.waiters[g as usize] = rank;
                }
            }
        }
        if self.ranks.iter().any(|r| !r.done) {
            let lines: Vec<String> = self
                .ranks
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.done)
                .take(8)
                .map(|(rank, r)| {
                    let list = &self.schedule.ranks[rank];
                    let at = r.cursor.min(list.len().saturating_sub(1));
                    format!("rank {rank} at instruction {at} `{}`", list[at])
                })
                .collect();
            return Err(SimulateError::Stalled(format!(
                "under the {} model: {}",
                self.model,
                lines.join("; ")
            )));
        }
        let makespan = self.ranks.iter().map(|r| r.clock).fold(0.0, f64::max);
        if !(makespan * self.ranks.len() as f64).is_finite() {
            return Err(SimulateError::Costs(CostError(format!(
                "the costs are too large: the step time times the number of ranks is {}, not a finite number",
                makespan * self.ranks.len() as f64
            ))));
        }
        let ranks = self
            .ranks
            .iter()
            .map(|r| RankSummary {
                busy: r.busy,
                idle: makespan - r.busy,
                end: r.clock,
                peak_activations: r.peak_live,
                peak_pending_w: r.peak_pending,
            })
            .collect();
        Ok(Simulation {
            model: self.model,
            makespan,
            ranks,
            times: self.times,
            unit: String::new(),
        })
    }

    /// Sets the post or start time of batch `g` and wakes the ranks waiting for it.
    fn set_posted(&mut self, g: u32, t: f64) {
        self.posted[g as usize] = t;
        let mut waiter = std::mem::replace(&mut self.waiters[g as usize], NONE);
        while waiter != NONE {
            self.ready.push(waiter);
            waiter = std::mem::replace(&mut self.ranks[waiter as usize].next_waiter, NONE);
        }
    }

    /// The completion of batch `g`, whose own post or start is known; `Err(p)` when partner
    /// batch `p` has not been posted or started yet.
    fn finish(&mut self, g: u32) -> Result<f64, u32> {
        let done = self.finished[g as usize];
        if !done.is_nan() {
            return Ok(done);
        }
        let own = self.posted[g as usize];
        let batches = self.batches;
        let ops = batches.ops(g);
        if let Some(op) = batches.ops[ops.clone()]
            .iter()
            .find(|op| self.posted[op.partner as usize].is_nan())
        {
            return Err(op.partner);
        }
        let (rank, commit) = batches.commit[g as usize];
        let rank = rank as usize;
        let mut end = own;
        for op in &batches.ops[ops] {
            let t = own.max(self.posted[op.partner as usize]) + op.time;
            self.times[rank][op.index as usize] = Interval { start: own, end: t };
            end = end.max(t);
        }
        self.finished[g as usize] = end;
        self.times[rank][commit as usize] = Interval { start: own, end };
        Ok(end)
    }

    /// Runs `rank` as far as it can go.
    fn advance(&mut self, rank: usize) -> Step {
        let schedule = self.schedule;
        let list = &schedule.ranks[rank];
        let first = self.batches.first[rank];
        let is_async = self.model == ExecutionModel::Async;
        loop {
            let state = self.ranks[rank];
            let Some(&instruction) = list.get(state.cursor) else {
                if is_async && state.batches > 0 {
                    // The step ends when the last batch has finished too.
                    let last = first + state.batches - 1;
                    match self.finish(last) {
                        Ok(t) => {
                            let r = &mut self.ranks[rank];
                            r.clock = r.clock.max(t).max(r.compute_free);
                        }
                        Err(p) => return Step::Wait(p),
                    }
                } else if is_async {
                    let r = &mut self.ranks[rank];
                    r.clock = r.clock.max(r.compute_free);
                }
                return Step::Finished;
            };
            match instruction {
                Instruction::Commit => {
                    let g = first + state.batches;
                    if self.posted[g as usize].is_nan() {
                        let t = if is_async {
                            match self.async_start(rank, g) {
                                Ok(t) => t,
                                Err(p) => return Step::Wait(p),
                            }
                        } else {
                            state.clock
                        };
                        self.set_posted(g, t);
                    }
                    if !is_async {
                        match self.finish(g) {
                            Ok(t) => self.ranks[rank].clock = t,
                            Err(p) => return Step::Wait(p),
                        }
                    }
                    let r = &mut self.ranks[rank];
                    r.batches += 1;
                    r.cursor += 1;
                }
                Instruction::Send(_) => self.ranks[rank].cursor += 1,
                Instruction::Recv(m) => {
                    if is_async {
                        let k = usize::from(m.kind == Kind::Grad);
                        let slot = self.topology.slot(m.work());
                        self.received_by[k][slot] = first + state.batches;
                    }
                    self.ranks[rank].cursor += 1;
                }
                compute => {
                    let start = if is_async {
                        match self.inputs_ready(compute) {
                            Ok(t) => {
                                let r = &mut self.ranks[rank];
                                r.clock = r.clock.max(t);
                                r.compute_free.max(t)
                            }
                            Err(p) => return Step::Wait(p),
                        }
                    } else {
                        state.clock
                    };
                    let cost = self.compute.duration(compute);
                    let end = start + cost;
                    self.times[rank][state.cursor] = Interval { start, end };
                    let r = &mut self.ranks[rank];
                    r.busy += cost;
                    if is_async {
                        r.compute_free = end;
                    } else {
                        r.clock = end;
                    }
                    account(r, compute);
                    r.cursor += 1;
                    if is_async {
                        self.record_products(compute, end);
                    }
                }
            }
        }
    }

    /// Async: when batch `g` of `rank` starts.
    fn async_start(&mut self, rank: usize, g: u32) -> Result<f64, u32> {
        let batches = self.batches;
        let mut t = self.ranks[rank].clock;
        if g > batches.first[rank] {
            t = t.max(self.finish(g - 1)?);
        }
        for op in &batches.ops[batches.ops(g)] {
            if op.producer != NONE {
                t = t.max(self.produced[op.producer as usize]);
            }
        }
        Ok(t)
    }

    /// Async: the time every received input of `compute` has arrived.
    fn inputs_ready(&mut self, compute: Instruction) -> Result<f64, u32> {
        let mut t = 0.0f64;
        let mut need = |kind: usize, work: Work, run: &mut Self| -> Result<(), u32> {
            let g = run.received_by[kind][run.topology.slot(work)];
            if g != NONE {
                t = t.max(run.finish(g)?);
            }
            Ok(())
        };
        match compute {
            Instruction::Forward(w) => need(0, w, self)?,
            Instruction::Backward { work, .. } => need(1, work, self)?,
            Instruction::ForwardBackward { f, b } => {
                need(0, f, self)?;
                need(1, b, self)?;
            }
            _ => {}
        }
        Ok(t)
    }

    /// Async: remembers when the results a send may carry were produced.
    fn record_products(&mut self, compute: Instruction, end: f64) {
        let mut put = |kind: usize, work: Work| {
            self.produced[2 * self.topology.slot(work) + kind] = end;
        };
        match compute {
            Instruction::Forward(w) => put(0, w),
            Instruction::Backward { work, .. } => put(1, work),
            Instruction::ForwardBackward { f, b } => {
                put(0, f);
                put(1, b);
            }
            _ => {}
        }
    }
}

/// Updates the live-activation and pending-W counts of a rank for one compute, in list order
/// (on one compute stream, list order is time order).
fn account(r: &mut RankState, compute: Instruction) {
    match compute {
        Instruction::Forward(_) => {
            r.live += 1;
            r.peak_live = r.peak_live.max(r.live);
        }
        Instruction::Backward { defer_w, .. } => {
            if defer_w {
                r.pending += 1;
                r.peak_pending = r.peak_pending.max(r.pending);
            } else {
                r.live = r.live.saturating_sub(1);
            }
        }
        Instruction::Weight(_) => {
            r.pending = r.pending.saturating_sub(1);
            r.live = r.live.saturating_sub(1);
        }
        Instruction::ForwardBackward { .. } => {
            // The forward's activation is taken before the backward frees its own.
            r.live += 1;
            r.peak_live = r.peak_live.max(r.live);
            r.live -= 1;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Format, Pipeline};
    use crate::parse_program;

    /// A schedule on a straight route `0 -> 1 -> ...` with one stage per rank.
    fn straight(forward_only: bool, microbatches: u32, programs: &[&str]) -> ValidSchedule {
        let n = programs.len() as u32;
        let schedule = Schedule {
            format: Format::V1,
            schedule: "test".into(),
            num_ranks: n,
            num_stages: n,
            num_microbatches: microbatches,
            forward_only,
            pipelines: vec![Pipeline {
                route: (0..n).collect(),
                microbatches: (0..microbatches).collect(),
            }],
            ranks: programs.iter().map(|p| parse_program(p).unwrap()).collect(),
        };
        ValidSchedule::new(schedule).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Simulates and compares the makespan and each rank's end and idle time.
    fn check(
        valid: &ValidSchedule,
        costs: &str,
        model: ExecutionModel,
        expected: (f64, &[(f64, f64)]),
    ) {
        let mut c = Costs::default();
        c.apply_assignments(costs).unwrap();
        let sim = simulate(valid, &c, model).unwrap();
        let ends: Vec<(f64, f64)> = sim.ranks.iter().map(|r| (r.end, r.idle)).collect();
        assert_eq!(
            (sim.makespan, ends.as_slice()),
            expected,
            "{model} with {costs}"
        );
    }

    const ROUND_TRIP: [&str; 2] = [
        "F s0 m0 | send act s0 m0 -> r1 | commit | recv grad s0 m0 <- r1 | commit | B s0 m0",
        "recv act s1 m0 <- r0 | commit | F s1 m0 | B s1 m0 | send grad s1 m0 -> r0 | commit",
    ];

    #[test]
    fn one_microbatch_there_and_back() {
        let valid = straight(false, 1, &ROUND_TRIP);
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            check(&valid, "", model, (6.0, &[(6.0, 3.0), (4.0, 3.0)]));
            // Each of the two messages adds its latency to the critical path.
            check(&valid, "comm=0.5", model, (7.0, &[(7.0, 4.0), (5.0, 4.0)]));
            check(
                &valid,
                "comm=0.5,bytes=10,bandwidth=20",
                model,
                (8.0, &[(8.0, 5.0), (6.0, 5.0)]),
            );
        }
    }

    #[test]
    fn async_sender_does_not_wait_for_a_busy_receiver() {
        let valid = straight(
            true,
            2,
            &[
                "F s0 m0 | send act s0 m0 -> r1 | commit | F s0 m1 | send act s0 m1 -> r1 | commit",
                "recv act s1 m0 <- r0 | commit | F s1 m0 | recv act s1 m1 <- r0 | commit | F s1 m1",
            ],
        );
        let mut costs = Costs::default();
        costs.stages.insert(
            1,
            crate::StageOverride {
                f: Some(3.0),
                ..Default::default()
            },
        );
        let blocking = simulate(&valid, &costs, ExecutionModel::Blocking).unwrap();
        let overlapped = simulate(&valid, &costs, ExecutionModel::Async).unwrap();
        assert_eq!(blocking.makespan, 7.0);
        assert_eq!(overlapped.makespan, 7.0);
        // Blocking: rank 0's second commit waits until rank 1 posts its receive at t = 4.
        assert_eq!(blocking.ranks[0].end, 4.0);
        assert_eq!(
            blocking.times[0][5],
            Interval {
                start: 2.0,
                end: 4.0
            }
        );
        // Async: rank 1's receive was launched at t = 1, so the message lands at t = 2.
        assert_eq!(overlapped.ranks[0].end, 2.0);
        assert_eq!(
            overlapped.times[1][4],
            Interval {
                start: 1.0,
                end: 2.0
            }
        );
        assert_eq!(
            overlapped.times[1][5],
            Interval {
                start: 4.0,
                end: 7.0
            }
        );
    }

    #[test]
    fn deferred_weights_split_the_backward() {
        let valid = straight(false, 1, &["F s0 m0 | B s0 m0 defer_w | W s0 m0"]);
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            check(&valid, "f=1,b=3,w=1", model, (4.0, &[(4.0, 0.0)]));
            let sim = simulate(&valid, &Costs::default(), model).unwrap();
            let spans: Vec<(f64, f64)> = sim.times[0].iter().map(|t| (t.start, t.end)).collect();
            assert_eq!(spans, [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]);
            assert_eq!(sim.ranks[0].peak_pending_w, 1);
            assert_eq!(sim.ranks[0].peak_activations, 1);
        }
    }

    #[test]
    fn overlapped_pair_costs_fb_or_the_sum_of_its_halves() {
        let valid = straight(false, 2, &["F s0 m0 | FB F s0 m1 + B s0 m0 | B s0 m1"]);
        check(&valid, "", ExecutionModel::Blocking, (6.0, &[(6.0, 0.0)]));
        check(
            &valid,
            "fb=2.5",
            ExecutionModel::Blocking,
            (5.5, &[(5.5, 0.0)]),
        );
        let sim = simulate(&valid, &Costs::default(), ExecutionModel::Blocking).unwrap();
        assert_eq!(sim.ranks[0].peak_activations, 2);
    }

    #[test]
    fn empty_commits_take_no_time() {
        let valid = straight(true, 1, &["commit | F s0 m0 | commit"]);
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            check(&valid, "comm=5", model, (1.0, &[(1.0, 0.0)]));
        }
    }

    #[test]
    fn costs_for_missing_stages_are_refused() {
        let valid = straight(false, 1, &["F s0 m0 | B s0 m0"]);
        let costs = Costs::from_json(r#"{"stages": [{"stage": 4, "f": 2}]}"#).unwrap();
        let error = simulate(&valid, &costs, ExecutionModel::Blocking).unwrap_err();
        assert!(error.to_string().contains("override stage 4"), "{error}");
    }

    #[test]
    fn spans_cover_computes_and_commits() {
        let valid = straight(false, 1, &ROUND_TRIP);
        let sim = simulate(&valid, &Costs::default(), ExecutionModel::Blocking).unwrap();
        let timeline = sim.timeline(valid.schedule());
        let spans = &timeline.spans;
        assert_eq!(spans.len(), 8);
        let last = spans.iter().find(|s| s.rank == 0 && s.index == 5).unwrap();
        assert_eq!(
            (
                last.lane,
                last.start * timeline.unit_us(),
                last.end * timeline.unit_us()
            ),
            (Lane::Compute, 4000.0, 6000.0)
        );
        assert_eq!(sim.bubble_share(), 0.5);
        assert_eq!(timeline.bubble_share(), 0.5);
    }

    #[test]
    fn a_step_time_that_is_not_finite_is_an_error() {
        let valid = straight(false, 2, &["F s0 m0 | F s0 m1 | B s0 m0 | B s0 m1"]);
        let mut costs = Costs::default();
        costs.apply_assignments("f=1e308,b=1e308").unwrap();
        let error = simulate(&valid, &costs, ExecutionModel::Blocking).unwrap_err();
        assert!(
            error.to_string().contains("the costs are too large"),
            "{error}"
        );
        costs.apply_assignments("f=1e300,b=1e300").unwrap();
        assert!(simulate(&valid, &costs, ExecutionModel::Async).is_ok());
    }
}
