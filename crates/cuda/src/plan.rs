//! The stream and event plan of one step: for every rank, which stream each instruction's work
//! goes to, which events are recorded and which waits order the streams; pure data that tests
//! check on any machine.
//!
//! The plan is lowered once per rank, before any step, and issued through one loop
//! ([`crate::issue`]): the recording stand-in device of [`crate::replay`] runs it on the CPU,
//! and the GPU backend (`gpu/`) issues exactly its operations, in its order, as CUDA events on
//! the rank's real streams (its stages and transports ask the issuer for each compute and
//! batch, checked against the instruction the plan names). Buffers carry no events of their
//! own, so the checks here and in [`crate::replay`] cover the order the GPU issues.
//!
//! Each rank has three streams:
//! - **main**: every compute, in instruction order;
//! - **side**: the backward half of an `FB`, so that it overlaps the forward half on main;
//! - **comm**: the batches posted by commits, in order.
//!
//! The rules:
//! - a commit whose batch has sends records `ready` on main and comm waits for it, so the data
//!   sent was produced before the batch starts (the sends follow their producers in the list);
//! - every batch records `done` on comm when it completes;
//! - *async*: a compute that takes a received buffer makes main wait for the `done` of the
//!   commit that posted the receive, unless main already waited for that or a later `done`
//!   (batches complete in order on comm);
//! - *blocking*: main waits for every commit's `done` right after posting it, as the reference
//!   implementation's `wait()` on every request does; the wait is on the stream, not the host;
//! - an `FB` records `fb start` on main, side waits for it, the forward runs on main and the
//!   backward on side, side records `fb join` and main waits for it; in the async model main
//!   waits only for the forward half's received input and side for the backward half's (after
//!   `fb start`, unless main's waits already cover it), so the forward never waits for the
//!   backward's input gradient;
//! - the host waits for the GPU once, at the end of the step.

use std::collections::HashMap;
use std::fmt;

use dualpipe_schedule::{ExecutionModel, Instruction, Kind, ValidSchedule, Work};

/// A stream of one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    /// Computes in instruction order.
    Main,
    /// The backward half of an `FB`.
    Side,
    /// Communication batches in commit order.
    Comm,
}

/// An event, named by the instruction that records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// Recorded on main at a commit with sends: the data to send is produced.
    Ready(usize),
    /// Recorded on comm when the batch of the commit completes.
    Done(usize),
    /// Recorded on main before an `FB`.
    FbStart(usize),
    /// Recorded on side after an `FB`'s backward.
    FbJoin(usize),
}

/// What part of a compute instruction runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The whole instruction (F, B, W, or an FB run on one stream).
    Whole,
    /// The forward half of an FB.
    Forward,
    /// The backward half of an FB.
    Backward,
}

/// One operation issued to a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamOp {
    /// Records `event` on `stream`.
    Record(Stream, Event),
    /// Makes `stream` wait for `event` (a device-side wait: the host goes on).
    Wait(Stream, Event),
    /// Compute of instruction `index` on `stream`.
    Compute(Stream, usize, Part),
    /// The batch of the commit at `index`, on comm.
    Batch(usize),
    /// The host waits for every stream of the rank (the end of the step).
    HostSync,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Main => "main",
            Stream::Side => "side",
            Stream::Comm => "comm",
        })
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Ready(i) => write!(f, "ready@{i}"),
            Event::Done(i) => write!(f, "done@{i}"),
            Event::FbStart(i) => write!(f, "fb-start@{i}"),
            Event::FbJoin(i) => write!(f, "fb-join@{i}"),
        }
    }
}

impl fmt::Display for StreamOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamOp::Record(s, e) => write!(f, "{s}: record {e}"),
            StreamOp::Wait(s, e) => write!(f, "{s}: wait {e}"),
            StreamOp::Compute(s, i, Part::Whole) => write!(f, "{s}: compute {i}"),
            StreamOp::Compute(s, i, Part::Forward) => write!(f, "{s}: compute {i} forward"),
            StreamOp::Compute(s, i, Part::Backward) => write!(f, "{s}: compute {i} backward"),
            StreamOp::Batch(i) => write!(f, "comm: batch {i}"),
            StreamOp::HostSync => f.write_str("host: sync"),
        }
    }
}

/// How a step is laid out on the streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Blocking or async.
    pub model: ExecutionModel,
    /// Run an FB's backward on the side stream (otherwise both halves run on main, one after
    /// the other).
    pub fb_two_streams: bool,
}

impl PlanOptions {
    /// Every layout: both execution models, with and without the side stream for `FB`s.
    pub const ALL: [PlanOptions; 4] = [
        PlanOptions {
            model: ExecutionModel::Blocking,
            fb_two_streams: false,
        },
        PlanOptions {
            model: ExecutionModel::Blocking,
            fb_two_streams: true,
        },
        PlanOptions {
            model: ExecutionModel::Async,
            fb_two_streams: false,
        },
        PlanOptions {
            model: ExecutionModel::Async,
            fb_two_streams: true,
        },
    ];
}

/// The operations of one rank for one step, in the order the host issues them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankPlan {
    /// The rank.
    pub rank: u32,
    /// The operations.
    pub ops: Vec<StreamOp>,
}

impl RankPlan {
    /// How often the host waits for the device during the step.
    pub fn host_syncs(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| matches!(op, StreamOp::HostSync))
            .count()
    }

    /// The operations, one per line.
    pub fn text(&self) -> String {
        self.ops.iter().map(|op| format!("{op}\n")).collect()
    }
}

/// Where a compute's inputs come from, as far as ordering goes: the receives it consumes.
fn received_inputs(
    schedule: &ValidSchedule,
    rank: u32,
    instruction: &Instruction,
    part: Part,
    recv_of: &HashMap<(Kind, Work), usize>,
) -> Vec<usize> {
    let topology = schedule.topology();
    let remote = |other: Option<u32>| other.is_some_and(|r| r != rank);
    let mut recvs = Vec::new();
    let mut forward = |work: Work| {
        if work.stage > 0 && remote(topology.prev_rank(work)) {
            recvs.extend(recv_of.get(&(Kind::Act, work)).copied());
        }
    };
    let backward = |work: Work, recvs: &mut Vec<usize>| {
        if !topology.is_last_stage(work.stage) && remote(topology.next_rank(work)) {
            recvs.extend(recv_of.get(&(Kind::Grad, work)).copied());
        }
    };
    match *instruction {
        Instruction::Forward(work) => forward(work),
        Instruction::Backward { work, .. } => backward(work, &mut recvs),
        Instruction::ForwardBackward { f, b } => {
            if part != Part::Backward {
                forward(f);
            }
            if part != Part::Forward {
                backward(b, &mut recvs);
            }
        }
        _ => {}
    }
    recvs
}

/// The plan of every rank of `schedule` under `options`.
pub fn plan(schedule: &ValidSchedule, options: PlanOptions) -> Vec<RankPlan> {
    (0..schedule.schedule().num_ranks)
        .map(|rank| plan_rank(schedule, rank, options))
        .collect()
}

/// The plan of one rank.
pub fn plan_rank(schedule: &ValidSchedule, rank: u32, options: PlanOptions) -> RankPlan {
    let list = &schedule.schedule().ranks[rank as usize];
    let links = schedule.links();
    let recv_of: HashMap<(Kind, Work), usize> = list
        .iter()
        .enumerate()
        .filter_map(|(index, instruction)| match instruction {
            Instruction::Recv(m) => Some(((m.kind, m.work()), index)),
            _ => None,
        })
        .collect();
    let mut ops = Vec::with_capacity(list.len() * 2);
    // The latest commit whose `done` main has waited for.
    let mut main_waited: Option<usize> = None;
    let mut batch_has_send = false;
    for (index, instruction) in list.iter().enumerate() {
        match instruction {
            Instruction::Send(_) => batch_has_send = true,
            Instruction::Recv(_) => {}
            Instruction::Commit => {
                if batch_has_send {
                    ops.push(StreamOp::Record(Stream::Main, Event::Ready(index)));
                    ops.push(StreamOp::Wait(Stream::Comm, Event::Ready(index)));
                }
                ops.push(StreamOp::Batch(index));
                ops.push(StreamOp::Record(Stream::Comm, Event::Done(index)));
                if options.model == ExecutionModel::Blocking {
                    ops.push(StreamOp::Wait(Stream::Main, Event::Done(index)));
                    main_waited = Some(index);
                }
                batch_has_send = false;
            }
            compute => {
                let split = matches!(compute, Instruction::ForwardBackward { .. })
                    && options.fb_two_streams;
                let asynchronous = options.model == ExecutionModel::Async;
                let needed = |part: Part| {
                    received_inputs(schedule, rank, compute, part, &recv_of)
                        .into_iter()
                        .filter_map(|recv| links.commit_of(rank as usize, recv))
                        .max()
                };
                if asynchronous {
                    let part = if split { Part::Forward } else { Part::Whole };
                    if let Some(commit) = needed(part) {
                        if main_waited.is_none_or(|w| w < commit) {
                            ops.push(StreamOp::Wait(Stream::Main, Event::Done(commit)));
                            main_waited = Some(commit);
                        }
                    }
                }
                if split {
                    ops.push(StreamOp::Record(Stream::Main, Event::FbStart(index)));
                    ops.push(StreamOp::Wait(Stream::Side, Event::FbStart(index)));
                    if asynchronous && let Some(commit) = needed(Part::Backward) {
                        // Side has seen, through `fb start`, every batch main waited for.
                        if main_waited.is_none_or(|w| w < commit) {
                            ops.push(StreamOp::Wait(Stream::Side, Event::Done(commit)));
                        }
                    }
                    ops.push(StreamOp::Compute(Stream::Main, index, Part::Forward));
                    ops.push(StreamOp::Compute(Stream::Side, index, Part::Backward));
                    ops.push(StreamOp::Record(Stream::Side, Event::FbJoin(index)));
                    ops.push(StreamOp::Wait(Stream::Main, Event::FbJoin(index)));
                } else {
                    ops.push(StreamOp::Compute(Stream::Main, index, Part::Whole));
                }
            }
        }
    }
    ops.push(StreamOp::HostSync);
    RankPlan { rank, ops }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualpipe_planner::{Family, PlanRequest};
    use std::collections::{HashSet, VecDeque};

    fn schedule(family: Family, n: u32, c: u32) -> ValidSchedule {
        let mut request = PlanRequest::new(family, n, c);
        if family == Family::Interleaved1F1B {
            request.chunks_per_rank = Some(2);
        }
        dualpipe_planner::plan(&request).unwrap()
    }

    /// A node of the happens-before graph: (rank, position in the rank's ops).
    type Node = (u32, usize);

    /// Happens-before over every rank's ops: program order per stream, record -> wait of the
    /// same event, and each send's batch -> its receive's batch (the data leaves the sender's
    /// batch and lands in the receiver's).
    struct Order {
        edges: HashMap<Node, Vec<Node>>,
        position: HashMap<(u32, StreamOp), usize>,
    }

    impl Order {
        fn new(schedule: &ValidSchedule, plans: &[RankPlan]) -> Order {
            let mut edges: HashMap<Node, Vec<Node>> = HashMap::new();
            let mut position = HashMap::new();
            for plan in plans {
                let mut last_on: HashMap<Stream, usize> = HashMap::new();
                let mut recorded: HashMap<Event, usize> = HashMap::new();
                for (at, op) in plan.ops.iter().enumerate() {
                    position.insert((plan.rank, *op), at);
                    let stream = match *op {
                        StreamOp::Record(s, _)
                        | StreamOp::Wait(s, _)
                        | StreamOp::Compute(s, ..) => Some(s),
                        StreamOp::Batch(_) => Some(Stream::Comm),
                        StreamOp::HostSync => None,
                    };
                    match stream {
                        Some(s) => {
                            if let Some(&before) = last_on.get(&s) {
                                edges
                                    .entry((plan.rank, before))
                                    .or_default()
                                    .push((plan.rank, at));
                            }
                            last_on.insert(s, at);
                        }
                        None => {
                            for &before in last_on.values() {
                                edges
                                    .entry((plan.rank, before))
                                    .or_default()
                                    .push((plan.rank, at));
                            }
                        }
                    }
                    match *op {
                        StreamOp::Record(_, e) => {
                            assert!(recorded.insert(e, at).is_none(), "{e} recorded twice");
                        }
                        StreamOp::Wait(s, e) => {
                            let from = *recorded.get(&e).unwrap_or_else(|| {
                                panic!(
                                    "rank {}: {s} waits for {e} before it is recorded",
                                    plan.rank
                                )
                            });
                            edges
                                .entry((plan.rank, from))
                                .or_default()
                                .push((plan.rank, at));
                        }
                        _ => {}
                    }
                }
            }
            let links = schedule.links();
            for (rank, list) in schedule.schedule().ranks.iter().enumerate() {
                for (index, instruction) in list.iter().enumerate() {
                    if let Instruction::Send(m) = instruction {
                        let recv = links.partner(rank, index).unwrap();
                        let send_commit = links.commit_of(rank, index).unwrap();
                        let recv_commit = links.commit_of(m.peer as usize, recv).unwrap();
                        let from = position[&(rank as u32, StreamOp::Batch(send_commit))];
                        let to = position[&(m.peer, StreamOp::Batch(recv_commit))];
                        edges
                            .entry((rank as u32, from))
                            .or_default()
                            .push((m.peer, to));
                    }
                }
            }
            Order { edges, position }
        }

        fn before(&self, from: Node, to: Node) -> bool {
            let mut seen = HashSet::from([from]);
            let mut queue = VecDeque::from([from]);
            while let Some(node) = queue.pop_front() {
                if node == to {
                    return true;
                }
                for &next in self.edges.get(&node).map_or(&[][..], Vec::as_slice) {
                    if seen.insert(next) {
                        queue.push_back(next);
                    }
                }
            }
            false
        }

        /// Where the compute of `(rank, index)` that produces or consumes `part` sits.
        fn compute(&self, rank: u32, index: usize, part: Part) -> Node {
            for (stream, part) in [
                (Stream::Main, part),
                (Stream::Main, Part::Whole),
                (Stream::Side, part),
            ] {
                if let Some(&at) = self
                    .position
                    .get(&(rank, StreamOp::Compute(stream, index, part)))
                {
                    return (rank, at);
                }
            }
            panic!("no compute of instruction {index} on rank {rank}")
        }
    }

    /// The instruction on `rank` that computes the buffer `(kind, work)` and the part of it.
    fn producer(schedule: &ValidSchedule, rank: u32, kind: Kind, work: Work) -> (usize, Part) {
        schedule.schedule().ranks[rank as usize]
            .iter()
            .enumerate()
            .find_map(|(index, instruction)| match (*instruction, kind) {
                (Instruction::Forward(w), Kind::Act) if w == work => Some((index, Part::Whole)),
                (Instruction::Backward { work: w, .. }, Kind::Grad) if w == work => {
                    Some((index, Part::Whole))
                }
                (Instruction::ForwardBackward { f, .. }, Kind::Act) if f == work => {
                    Some((index, Part::Forward))
                }
                (Instruction::ForwardBackward { b, .. }, Kind::Grad) if b == work => {
                    Some((index, Part::Backward))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("rank {rank}: nothing produces {kind:?} {work}"))
    }

    /// Every message's producer is ordered before its consumer, through the plan's events
    /// alone; and the two halves of every FB are left free to overlap.
    fn check_orders_every_dependency(schedule: &ValidSchedule, options: PlanOptions) {
        let plans = plan(schedule, options);
        let order = Order::new(schedule, &plans);
        let doc = schedule.schedule();
        let links = schedule.links();
        let mut checked = 0;
        for (rank, list) in doc.ranks.iter().enumerate() {
            let rank = rank as u32;
            let recv_of: HashMap<(Kind, Work), usize> = list
                .iter()
                .enumerate()
                .filter_map(|(i, ins)| match ins {
                    Instruction::Recv(m) => Some(((m.kind, m.work()), i)),
                    _ => None,
                })
                .collect();
            for (index, instruction) in list.iter().enumerate() {
                let consumed = received_inputs(schedule, rank, instruction, Part::Whole, &recv_of);
                for recv in consumed {
                    let Instruction::Recv(m) = list[recv] else {
                        unreachable!()
                    };
                    let send = links.partner(rank as usize, recv).unwrap();
                    let Instruction::Send(sent) = doc.ranks[m.peer as usize][send] else {
                        unreachable!()
                    };
                    let (made_at, made_part) = producer(schedule, m.peer, sent.kind, sent.work());
                    let use_part = match (instruction, m.kind) {
                        (Instruction::ForwardBackward { .. }, Kind::Act) => Part::Forward,
                        (Instruction::ForwardBackward { .. }, Kind::Grad) => Part::Backward,
                        _ => Part::Whole,
                    };
                    let from = order.compute(m.peer, made_at, made_part);
                    let to = order.compute(rank, index, use_part);
                    assert!(
                        order.before(from, to),
                        "{} {options:?}: rank {} instruction {made_at} `{}` is not ordered before rank {rank} instruction {index} `{instruction}`",
                        doc.schedule,
                        m.peer,
                        doc.ranks[m.peer as usize][made_at]
                    );
                    checked += 1;
                }
                if let (Instruction::ForwardBackward { .. }, true) =
                    (instruction, options.fb_two_streams)
                {
                    let f = order.compute(rank, index, Part::Forward);
                    let b = order.compute(rank, index, Part::Backward);
                    assert!(
                        !order.before(f, b) && !order.before(b, f),
                        "the halves of FB at rank {rank} instruction {index} are serialized"
                    );
                }
            }
        }
        let messages = doc
            .ranks
            .iter()
            .flatten()
            .filter(|i| matches!(i, Instruction::Send(_)))
            .count();
        assert_eq!(
            checked, messages,
            "{}: every message has one consumer",
            doc.schedule
        );
        for plan in &plans {
            assert_eq!(plan.host_syncs(), 1, "the host waits once, at the end");
            assert_eq!(plan.ops.last(), Some(&StreamOp::HostSync));
        }
    }

    const OPTIONS: [PlanOptions; 4] = [
        PlanOptions {
            model: ExecutionModel::Async,
            fb_two_streams: true,
        },
        PlanOptions {
            model: ExecutionModel::Async,
            fb_two_streams: false,
        },
        PlanOptions {
            model: ExecutionModel::Blocking,
            fb_two_streams: true,
        },
        PlanOptions {
            model: ExecutionModel::Blocking,
            fb_two_streams: false,
        },
    ];

    #[test]
    fn every_family_orders_every_message_through_events() {
        for (family, n, c) in [
            (Family::DualPipe, 4, 10),
            (Family::DualPipe, 8, 16),
            (Family::DualPipeV, 1, 5),
            (Family::DualPipeV, 4, 10),
            (Family::OneFOneB, 4, 8),
            (Family::GPipe, 3, 5),
            (Family::Zb1p, 4, 8),
            (Family::Zbv, 4, 8),
            (Family::Interleaved1F1B, 2, 4),
        ] {
            let schedule = schedule(family, n, c);
            for options in OPTIONS {
                check_orders_every_dependency(&schedule, options);
            }
        }
    }

    #[test]
    fn async_main_waits_only_for_batches_it_consumes_and_never_twice() {
        let schedule = schedule(Family::DualPipeV, 4, 10);
        let options = OPTIONS[0];
        for plan in plan(&schedule, options) {
            let mut seen = HashSet::new();
            let mut last = None;
            for op in &plan.ops {
                if let StreamOp::Wait(Stream::Main, Event::Done(c)) = *op {
                    assert!(seen.insert(c), "rank {}: done@{c} waited twice", plan.rank);
                    assert!(last < Some(c), "rank {}: waits go forward", plan.rank);
                    last = Some(c);
                }
            }
            let commits = schedule.schedule().ranks[plan.rank as usize]
                .iter()
                .filter(|i| matches!(i, Instruction::Commit))
                .count();
            assert!(
                seen.len() < commits,
                "rank {}: async waits for fewer batches ({}) than it commits ({commits})",
                plan.rank,
                seen.len()
            );
        }
    }

    /// In the async model with two streams, an FB's forward half (main) never waits for the
    /// batch that brought only its backward half's gradient; side waits for that batch.
    #[test]
    fn the_forward_half_of_an_fb_does_not_wait_for_the_backward_halfs_gradient() {
        let mut split = 0;
        for (family, n, c) in [
            (Family::DualPipeV, 4, 10),
            (Family::DualPipe, 4, 10),
            (Family::Zbv, 4, 8),
        ] {
            let schedule = schedule(family, n, c);
            let links = schedule.links();
            for plan in plan(&schedule, OPTIONS[0]) {
                let rank = plan.rank;
                let list = &schedule.schedule().ranks[rank as usize];
                let recv_of: HashMap<(Kind, Work), usize> = list
                    .iter()
                    .enumerate()
                    .filter_map(|(i, ins)| match ins {
                        Instruction::Recv(m) => Some(((m.kind, m.work()), i)),
                        _ => None,
                    })
                    .collect();
                let needed = |index: usize, part: Part| {
                    received_inputs(&schedule, rank, &list[index], part, &recv_of)
                        .into_iter()
                        .filter_map(|recv| links.commit_of(rank as usize, recv))
                        .max()
                };
                let mut main_waited = None;
                for (at, op) in plan.ops.iter().enumerate() {
                    match *op {
                        StreamOp::Wait(Stream::Main, Event::Done(c)) => main_waited = Some(c),
                        StreamOp::Record(Stream::Main, Event::FbStart(index)) => {
                            let Some(b) = needed(index, Part::Backward) else {
                                continue;
                            };
                            if needed(index, Part::Forward).is_some_and(|f| f >= b)
                                || main_waited.is_some_and(|w| w >= b)
                            {
                                assert!(main_waited >= needed(index, Part::Forward));
                                continue;
                            }
                            split += 1;
                            assert_eq!(
                                plan.ops[at + 2],
                                StreamOp::Wait(Stream::Side, Event::Done(b)),
                                "{family} rank {rank}: FB {index}'s backward half waits for its gradient on side"
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
        assert!(
            split > 0,
            "some FB takes a gradient its forward does not need"
        );
    }

    #[test]
    fn the_first_rank_of_dualpipev_reads_as_expected() {
        // 1 rank, 2 micro-batches: no messages at all, FBs on two streams.
        let schedule = schedule(Family::DualPipeV, 1, 2);
        let text = plan(&schedule, OPTIONS[0])[0].text();
        assert!(!text.contains("batch"), "{text}");
        assert!(text.ends_with("host: sync\n"));
        // 2 ranks: rank 1's first forward waits for the batch that received its input.
        let schedule = schedule_text(Family::DualPipeV, 2, 4);
        let first_wait = schedule.1[1]
            .lines()
            .position(|l| l.starts_with("main: wait done@"))
            .unwrap();
        let first_compute = schedule.1[1]
            .lines()
            .position(|l| l.starts_with("main: compute"))
            .unwrap();
        assert!(first_wait < first_compute, "{}", schedule.1[1]);
    }

    fn schedule_text(family: Family, n: u32, c: u32) -> (ValidSchedule, Vec<String>) {
        let s = schedule(family, n, c);
        let texts = plan(&s, OPTIONS[0]).iter().map(RankPlan::text).collect();
        (s, texts)
    }
}
