//! A recording stand-in device: runs every rank's [`RankPlan`] on the CPU, stream by stream,
//! with values in the buffers, and catches a consumer that does not wait for its producer.
//!
//! Each rank has the three streams of [`crate::plan`]. The device runs one operation at a
//! time, taking the next operation of some stream that can run (a wait whose event is
//! recorded, a batch whose receives have arrived) in an order drawn from a seed, so a plan is
//! run in many interleavings. Computes read and write real buffers: every forward, backward
//! and weight gradient turns the values it reads into a new value, sends carry values between
//! ranks, and at the end each rank's results must equal a sequential evaluation of the same
//! schedule.
//!
//! Ordering is checked exactly, whatever the interleaving: every stream keeps a vector clock
//! (one entry per stream of every rank), events and messages carry clocks, and every buffer
//! remembers the clock of its writer. A read whose writer does not happen before it (no chain
//! of stream order, waits on recorded events and message batches leads from the write to the
//! read) is a [`ReplayError::Race`], even when this interleaving happened to run the writer
//! first. A plan that cannot run to the end is a [`ReplayError::Stalled`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;

use dualpipe_schedule::{Instruction, Kind, ValidSchedule, Work};

use crate::issue::{IssueError, StreamDevice, issue};
use crate::plan::{Event, Part, RankPlan, Stream, StreamOp};

/// What went wrong in a replay.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// A read of a buffer whose write does not happen before it (whether or not the write
    /// ran earlier in this interleaving).
    #[error(
        "rank {rank}: {stream} reads {buffer} at op {op} ({what}) without waiting for its producer"
    )]
    Race {
        /// The reading rank.
        rank: u32,
        /// The reading stream.
        stream: Stream,
        /// Position of the reading operation in the rank's plan.
        op: usize,
        /// The operation, as the plan prints it.
        what: String,
        /// The buffer read.
        buffer: String,
    },
    /// No stream can go on and some have operations left.
    #[error("the plan stalls: {0}")]
    Stalled(String),
    /// The values at the end differ from the sequential evaluation.
    #[error("rank {rank}: {buffer} is {got:#x}, the sequential evaluation gives {want:#x}")]
    Value {
        /// The rank.
        rank: u32,
        /// The buffer.
        buffer: String,
        /// The replayed value.
        got: u64,
        /// The sequential value.
        want: u64,
    },
}

/// A buffer of one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Buffer {
    /// The output of the forward of a work item.
    Act(Work),
    /// The input gradient made by the backward of a work item.
    Grad(Work),
    /// The received activation a work item's forward consumes.
    RecvAct(Work),
    /// The received gradient a work item's backward consumes.
    RecvGrad(Work),
    /// What a backward keeps for its weight gradient.
    Saved(Work),
    /// The weight gradient of a work item.
    Weight(Work),
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, w) = match self {
            Buffer::Act(w) => ("activation", w),
            Buffer::Grad(w) => ("gradient", w),
            Buffer::RecvAct(w) => ("received activation", w),
            Buffer::RecvGrad(w) => ("received gradient", w),
            Buffer::Saved(w) => ("saved backward state", w),
            Buffer::Weight(w) => ("weight gradient", w),
        };
        write!(f, "{name} s{} m{}", w.stage, w.mb)
    }
}

/// A vector clock over every stream of every rank.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Clock(Vec<u32>);

impl Clock {
    fn join(&mut self, other: &Clock) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a = (*a).max(*b);
        }
    }

    fn covers(&self, other: &Clock) -> bool {
        self.0.iter().zip(&other.0).all(|(a, b)| a >= b)
    }
}

const STREAMS: [Stream; 3] = [Stream::Main, Stream::Side, Stream::Comm];

fn slot(stream: Stream) -> usize {
    match stream {
        Stream::Main => 0,
        Stream::Side => 1,
        Stream::Comm => 2,
    }
}

fn mix(parts: &[u64]) -> u64 {
    // splitmix64 over the parts: a value that depends on every input and its order.
    let mut h = 0x9e37_79b9_7f4a_7c15_u64;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

const F: u64 = 1;
const B: u64 = 2;
const W: u64 = 3;

fn work_id(w: Work) -> u64 {
    (u64::from(w.stage) << 32) | u64::from(w.mb)
}

/// The sequential values: what each buffer must hold once the step ran.
struct Reference<'a> {
    schedule: &'a ValidSchedule,
    act: HashMap<Work, u64>,
    grad: HashMap<Work, u64>,
}

impl<'a> Reference<'a> {
    fn new(schedule: &'a ValidSchedule) -> Self {
        Reference {
            schedule,
            act: HashMap::new(),
            grad: HashMap::new(),
        }
    }

    fn input(&mut self, w: Work) -> u64 {
        if w.stage == 0 {
            mix(&[0xfeed, u64::from(w.mb)])
        } else {
            self.act(Work::new(w.stage - 1, w.mb))
        }
    }

    fn act(&mut self, w: Work) -> u64 {
        if let Some(&v) = self.act.get(&w) {
            return v;
        }
        let v = mix(&[F, work_id(w), self.input(w)]);
        self.act.insert(w, v);
        v
    }

    fn grad_in(&mut self, w: Work) -> u64 {
        if self.schedule.topology().is_last_stage(w.stage) {
            self.act(w)
        } else {
            self.grad(Work::new(w.stage + 1, w.mb))
        }
    }

    fn grad(&mut self, w: Work) -> u64 {
        if let Some(&v) = self.grad.get(&w) {
            return v;
        }
        let (g, x) = (self.grad_in(w), self.input(w));
        let v = mix(&[B, work_id(w), g, x]);
        self.grad.insert(w, v);
        v
    }

    fn weight(&mut self, w: Work) -> u64 {
        let saved = mix(&[B ^ W, work_id(w), self.grad_in(w), self.input(w)]);
        mix(&[W, work_id(w), saved])
    }
}

struct Written {
    value: u64,
    clock: Clock,
}

struct RankState<'p> {
    plan: &'p RankPlan,
    /// The operations of each stream, as positions in the plan, and how far each has run.
    queues: [Vec<usize>; 3],
    next: [usize; 3],
    clocks: [Clock; 3],
    events: HashMap<Event, Clock>,
    buffers: HashMap<Buffer, Written>,
    /// A batch posted on comm and waiting for its receives: the position of its op.
    posted: Option<usize>,
}

/// The stand-in device as the host issues to it: each operation joins the queue of its
/// stream (the position in the plan is how many operations came before it), and the host
/// sync, which waits for every stream, joins none.
#[derive(Default)]
struct Enqueue {
    queues: [Vec<usize>; 3],
    issued: usize,
}

impl Enqueue {
    fn push(&mut self, stream: Option<Stream>) -> Result<(), Infallible> {
        if let Some(stream) = stream {
            self.queues[slot(stream)].push(self.issued);
        }
        self.issued += 1;
        Ok(())
    }
}

impl StreamDevice for Enqueue {
    type Error = Infallible;

    fn record(&mut self, stream: Stream, _: Event) -> Result<(), Infallible> {
        self.push(Some(stream))
    }

    fn wait(&mut self, stream: Stream, _: Event) -> Result<(), Infallible> {
        self.push(Some(stream))
    }

    fn compute(&mut self, stream: Stream, _: usize, _: Part) -> Result<(), Infallible> {
        self.push(Some(stream))
    }

    fn batch(&mut self, _: usize) -> Result<(), Infallible> {
        self.push(Some(Stream::Comm))
    }

    fn host_sync(&mut self) -> Result<(), Infallible> {
        self.push(None)
    }
}

/// Runs `plans` (one per rank of `schedule`, as [`crate::plan::plan`] makes them) on the
/// stand-in device, taking streams in an order drawn from `seed`; checks every read and the
/// values at the end. Returns how many operations ran.
pub fn replay(
    schedule: &ValidSchedule,
    plans: &[RankPlan],
    seed: u64,
) -> Result<usize, ReplayError> {
    let doc = schedule.schedule();
    let n = plans.len();
    let width = 3 * n;
    let mut ranks: Vec<RankState<'_>> = Vec::with_capacity(n);
    for plan in plans {
        // The host issues the plan through the shared loop; each operation joins its
        // stream's queue.
        let mut device = Enqueue::default();
        match issue(plan, &mut device) {
            Ok(()) => {}
            Err(IssueError::Device { error, .. }) => match error {},
            Err(mismatch @ IssueError::Mismatch { .. }) => {
                return Err(ReplayError::Stalled(mismatch.to_string()));
            }
        }
        ranks.push(RankState {
            plan,
            queues: device.queues,
            next: [0; 3],
            clocks: std::array::from_fn(|_| Clock(vec![0; width])),
            events: HashMap::new(),
            buffers: HashMap::new(),
            posted: None,
        });
    }
    // Messages in flight: (receiving rank, kind, the receiver's work) -> value and clock.
    let mut mailbox: HashMap<(u32, Kind, Work), Written> = HashMap::new();
    let mut rng = seed ^ 0x5851_f42d_4c95_7f2d;
    let mut ran = 0usize;
    loop {
        let mut ready = Vec::new();
        let mut left = false;
        for (r, state) in ranks.iter().enumerate() {
            for s in 0..3 {
                let Some(&at) = state.queues[s].get(state.next[s]) else {
                    continue;
                };
                left = true;
                if runnable(state, &mailbox, r as u32, at, doc) {
                    ready.push((r, s));
                }
            }
        }
        if ready.is_empty() {
            if !left {
                break;
            }
            let mut heads = Vec::new();
            for (r, state) in ranks.iter().enumerate() {
                for (s, stream) in STREAMS.iter().enumerate() {
                    if let Some(&at) = state.queues[s].get(state.next[s]) {
                        heads.push(format!("rank {r} {stream}: {}", state.plan.ops[at]));
                    }
                }
            }
            return Err(ReplayError::Stalled(heads.join("; ")));
        }
        rng = mix(&[rng]);
        let (r, s) = ready[(rng % ready.len() as u64) as usize];
        step(schedule, &mut ranks, &mut mailbox, r, s)?;
        ran += 1;
    }
    check_values(schedule, &ranks)?;
    Ok(ran)
}

/// Whether the next op of stream `at` of rank `rank` can run now.
fn runnable(
    state: &RankState<'_>,
    mailbox: &HashMap<(u32, Kind, Work), Written>,
    rank: u32,
    at: usize,
    doc: &dualpipe_schedule::Schedule,
) -> bool {
    match state.plan.ops[at] {
        StreamOp::Wait(_, e) => state.events.contains_key(&e),
        StreamOp::Batch(commit) if state.posted == Some(at) => {
            batch(doc, rank, commit)
                .iter()
                .all(|i| match doc.ranks[rank as usize][*i] {
                    Instruction::Recv(m) => mailbox.contains_key(&(rank, m.kind, m.work())),
                    _ => true,
                })
        }
        _ => true,
    }
}

/// The send and receive instructions of the batch that the commit at `commit` posts.
fn batch(doc: &dualpipe_schedule::Schedule, rank: u32, commit: usize) -> Vec<usize> {
    let list = &doc.ranks[rank as usize];
    let mut start = commit;
    while start > 0 && !matches!(list[start - 1], Instruction::Commit) {
        start -= 1;
    }
    (start..commit)
        .filter(|&i| matches!(list[i], Instruction::Send(_) | Instruction::Recv(_)))
        .collect()
}

fn step(
    schedule: &ValidSchedule,
    ranks: &mut [RankState<'_>],
    mailbox: &mut HashMap<(u32, Kind, Work), Written>,
    r: usize,
    s: usize,
) -> Result<(), ReplayError> {
    let doc = schedule.schedule();
    let topology = schedule.topology();
    let rank = r as u32;
    let state = &mut ranks[r];
    let at = state.queues[s][state.next[s]];
    let op = state.plan.ops[at];
    state.clocks[s].0[3 * r + s] += 1;
    let stream = STREAMS[s];
    let what = op.to_string();
    // Reads check the writer happens before; writes stamp the stream's clock.
    let read = |state: &RankState<'_>, buffer: Buffer| -> Result<u64, ReplayError> {
        let Some(written) = state.buffers.get(&buffer) else {
            return Err(ReplayError::Race {
                rank,
                stream,
                op: at,
                what: what.clone(),
                buffer: buffer.to_string(),
            });
        };
        if !state.clocks[s].covers(&written.clock) {
            return Err(ReplayError::Race {
                rank,
                stream,
                op: at,
                what: what.clone(),
                buffer: buffer.to_string(),
            });
        }
        Ok(written.value)
    };
    let write = |state: &mut RankState<'_>, buffer: Buffer, value: u64| {
        let clock = state.clocks[s].clone();
        state.buffers.insert(buffer, Written { value, clock });
    };
    let input = |state: &RankState<'_>, w: Work| -> Result<u64, ReplayError> {
        if w.stage == 0 {
            Ok(mix(&[0xfeed, u64::from(w.mb)]))
        } else if topology.prev_rank(w) == Some(rank) {
            read(state, Buffer::Act(Work::new(w.stage - 1, w.mb)))
        } else {
            read(state, Buffer::RecvAct(w))
        }
    };
    let grad_in = |state: &RankState<'_>, w: Work| -> Result<u64, ReplayError> {
        if topology.is_last_stage(w.stage) {
            read(state, Buffer::Act(w))
        } else if topology.next_rank(w) == Some(rank) {
            read(state, Buffer::Grad(Work::new(w.stage + 1, w.mb)))
        } else {
            read(state, Buffer::RecvGrad(w))
        }
    };
    let forward = |state: &mut RankState<'_>, w: Work| -> Result<(), ReplayError> {
        let x = input(state, w)?;
        write(state, Buffer::Act(w), mix(&[F, work_id(w), x]));
        Ok(())
    };
    let backward = |state: &mut RankState<'_>, w: Work, defer: bool| -> Result<(), ReplayError> {
        // The backward also reads what its forward left (the saved input).
        read(state, Buffer::Act(w))?;
        let (g, x) = (grad_in(state, w)?, input(state, w)?);
        write(state, Buffer::Grad(w), mix(&[B, work_id(w), g, x]));
        let saved = mix(&[B ^ W, work_id(w), g, x]);
        if defer {
            write(state, Buffer::Saved(w), saved);
        } else {
            write(state, Buffer::Weight(w), mix(&[W, work_id(w), saved]));
        }
        Ok(())
    };
    match op {
        StreamOp::Record(_, e) => {
            let clock = state.clocks[s].clone();
            state.events.insert(e, clock);
        }
        StreamOp::Wait(_, e) => {
            let clock = state.events[&e].clone();
            state.clocks[s].join(&clock);
        }
        StreamOp::Compute(_, index, part) => match (doc.ranks[r][index], part) {
            (Instruction::Forward(w), _) => forward(state, w)?,
            (Instruction::Backward { work, defer_w }, _) => backward(state, work, defer_w)?,
            (Instruction::Weight(w), _) => {
                let saved = read(state, Buffer::Saved(w))?;
                write(state, Buffer::Weight(w), mix(&[W, work_id(w), saved]));
            }
            (Instruction::ForwardBackward { f, b }, part) => {
                if part != Part::Backward {
                    forward(state, f)?;
                }
                if part != Part::Forward {
                    backward(state, b, false)?;
                }
            }
            _ => {}
        },
        StreamOp::Batch(commit) => {
            let items = batch(doc, rank, commit);
            if state.posted != Some(at) {
                // Post: the sends leave with the values they read now.
                for &i in &items {
                    if let Instruction::Send(m) = doc.ranks[r][i] {
                        let (value, to) = match m.kind {
                            Kind::Act => (
                                read(state, Buffer::Act(m.work()))?,
                                Work::new(m.stage + 1, m.mb),
                            ),
                            Kind::Grad => (
                                read(state, Buffer::Grad(m.work()))?,
                                Work::new(m.stage - 1, m.mb),
                            ),
                        };
                        let clock = state.clocks[s].clone();
                        mailbox.insert((m.peer, m.kind, to), Written { value, clock });
                    }
                }
                state.posted = Some(at);
                // The batch stays at the head of comm until its receives arrive.
                return Ok(());
            }
            state.posted = None;
            for &i in &items {
                if let Instruction::Recv(m) = doc.ranks[r][i] {
                    let message = mailbox
                        .remove(&(rank, m.kind, m.work()))
                        .expect("runnable only once every receive arrived");
                    state.clocks[s].join(&message.clock);
                    let buffer = match m.kind {
                        Kind::Act => Buffer::RecvAct(m.work()),
                        Kind::Grad => Buffer::RecvGrad(m.work()),
                    };
                    write(state, buffer, message.value);
                }
            }
        }
        StreamOp::HostSync => {}
    }
    state.next[s] += 1;
    Ok(())
}

/// Every forward output, input gradient and weight gradient was made and equals the
/// sequential value.
fn check_values(schedule: &ValidSchedule, ranks: &[RankState<'_>]) -> Result<(), ReplayError> {
    let mut reference = Reference::new(schedule);
    let training = !schedule.schedule().forward_only;
    for (r, state) in ranks.iter().enumerate() {
        let rank = r as u32;
        let mut expected = Vec::new();
        for instruction in &schedule.schedule().ranks[r] {
            match *instruction {
                Instruction::Forward(w) => expected.push(Buffer::Act(w)),
                Instruction::Backward { work, .. } if training => {
                    expected.push(Buffer::Grad(work));
                    expected.push(Buffer::Weight(work));
                }
                Instruction::ForwardBackward { f, b } => {
                    expected.extend([Buffer::Act(f), Buffer::Grad(b), Buffer::Weight(b)]);
                }
                _ => {}
            }
        }
        for buffer in expected {
            let want = match buffer {
                Buffer::Act(w) => reference.act(w),
                Buffer::Grad(w) => reference.grad(w),
                Buffer::Weight(w) => reference.weight(w),
                _ => continue,
            };
            let Some(got) = state.buffers.get(&buffer) else {
                return Err(ReplayError::Stalled(format!(
                    "rank {rank}: {buffer} was never made"
                )));
            };
            if got.value != want {
                return Err(ReplayError::Value {
                    rank,
                    buffer: buffer.to_string(),
                    got: got.value,
                    want,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlanOptions, plan};
    use dualpipe_planner::{Family, PlanRequest};
    use dualpipe_schedule::ExecutionModel;

    fn schedule(family: Family, n: u32, c: u32, forward_only: bool) -> Option<ValidSchedule> {
        let mut request = PlanRequest::new(family, n, c);
        request.forward_only = forward_only;
        dualpipe_planner::plan(&request).ok()
    }

    #[test]
    fn every_family_replays_with_the_sequential_values_in_any_order() {
        let mut replayed = 0;
        for family in Family::ALL {
            for (n, c) in [(1, 2), (2, 4), (2, 8), (4, 8), (4, 16)] {
                for forward_only in [false, true] {
                    let Some(schedule) = schedule(family, n, c, forward_only) else {
                        continue;
                    };
                    for options in PlanOptions::ALL {
                        let plans = plan(&schedule, options);
                        for seed in 0..4 {
                            let ran = replay(&schedule, &plans, seed).unwrap_or_else(|e| {
                                panic!("{family} {n}x{c} fwd-only {forward_only} {options:?} seed {seed}: {e}")
                            });
                            assert!(ran >= plans.iter().map(|p| p.ops.len() - 1).sum::<usize>());
                        }
                        replayed += 1;
                    }
                }
            }
        }
        assert!(replayed > 100, "{replayed}");
    }

    #[test]
    fn a_consumer_without_its_wait_is_caught_in_every_order() {
        let schedule = schedule(Family::DualPipeV, 2, 8, false).unwrap();
        for options in PlanOptions::ALL {
            let plans = plan(&schedule, options);
            let waits: Vec<(usize, usize)> = plans
                .iter()
                .enumerate()
                .flat_map(|(r, p)| {
                    p.ops.iter().enumerate().filter_map(move |(at, op)| {
                        matches!(op, StreamOp::Wait(..)).then_some((r, at))
                    })
                })
                .collect();
            assert!(!waits.is_empty());
            let mut caught = 0;
            for &(r, at) in &waits {
                let mut broken = plans.clone();
                let dropped = broken[r].ops.remove(at);
                // Every seed gives the same verdict: the check does not depend on luck.
                let verdicts: Vec<bool> = (0..3)
                    .map(|seed| match replay(&schedule, &broken, seed) {
                        Ok(_) => false,
                        Err(ReplayError::Race { .. }) => true,
                        Err(other) => panic!("dropping a wait: {other}"),
                    })
                    .collect();
                assert!(
                    verdicts.iter().all(|&v| v == verdicts[0]),
                    "{options:?}: dropping rank {r} op {at} ({dropped}) gives {verdicts:?}"
                );
                caught += usize::from(verdicts[0]);
            }
            // Most waits guard a read; the others are covered by a later wait or stream order.
            assert!(
                caught * 2 >= waits.len(),
                "{options:?}: {caught} of {}",
                waits.len()
            );
        }
    }

    #[test]
    fn the_race_names_the_rank_stream_and_buffer() {
        let schedule = schedule(Family::OneFOneB, 2, 4, false).unwrap();
        let options = PlanOptions {
            model: ExecutionModel::Async,
            fb_two_streams: false,
        };
        let mut plans = plan(&schedule, options);
        // Rank 1's first wait is for the activation its first forward receives.
        let at = plans[1]
            .ops
            .iter()
            .position(|op| matches!(op, StreamOp::Wait(Stream::Main, Event::Done(_))))
            .unwrap();
        plans[1].ops.remove(at);
        let error = replay(&schedule, &plans, 0).unwrap_err();
        match &error {
            ReplayError::Race {
                rank,
                stream,
                buffer,
                ..
            } => {
                assert_eq!((*rank, *stream), (1, Stream::Main), "{error}");
                assert!(buffer.starts_with("received activation s1"), "{error}");
            }
            other => panic!("expected a race, got {other}"),
        }
        assert!(
            error
                .to_string()
                .contains("without waiting for its producer")
        );
    }

    #[test]
    fn a_missing_record_stalls() {
        let schedule = schedule(Family::Zbv, 2, 4, false).unwrap();
        let options = PlanOptions {
            model: ExecutionModel::Blocking,
            fb_two_streams: false,
        };
        let mut plans = plan(&schedule, options);
        let at = plans[0]
            .ops
            .iter()
            .position(|op| matches!(op, StreamOp::Record(Stream::Comm, _)))
            .unwrap();
        plans[0].ops.remove(at);
        let error = replay(&schedule, &plans, 1).unwrap_err();
        assert!(matches!(error, ReplayError::Stalled(_)), "{error}");
    }
}
