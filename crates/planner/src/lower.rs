//! Lowering: from per-rank compute orders to a full schedule with sends, receives and commits.
//!
//! The pass is deadlock-free by construction under both execution models:
//!
//! 1. Give every compute a round: its start in an as-soon-as-possible run of the compute orders
//!    where each compute takes one round and messages are instant.
//! 2. A message whose consumer runs in round `t` is received in the gap just before the
//!    consumer and sent in the producer rank's gap that holds round `t` (after its computes of
//!    earlier rounds, before those of round `t` and later).
//! 3. Each gap posts one batch per round, in round order; inside a batch, messages are sorted by
//!    (kind, sending stage, micro-batch), the same key on both sides of every channel.
//!
//! Every batch then pairs only with batches of the same round on other ranks, and the batches of
//! one rank are in strictly increasing round order, so by induction on the round every batch is
//! posted and completes: no rank can wait on a batch of a later round.

use std::collections::HashMap;
use std::fmt;

use dualpipe_schedule::{Format, Instruction, Kind, Pipeline, Schedule, Topology, Work};

/// The header of the schedule to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Family name or label.
    pub schedule: String,
    /// Number of ranks.
    pub num_ranks: u32,
    /// Number of stages.
    pub num_stages: u32,
    /// Number of micro-batches.
    pub num_microbatches: u32,
    /// Inference only.
    pub forward_only: bool,
    /// Routes.
    pub pipelines: Vec<Pipeline>,
}

/// Why a compute order cannot be lowered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LowerError {
    /// The header or an instruction is inconsistent.
    Invalid(String),
    /// The compute orders wait on each other in a cycle.
    Cyclic(String),
}

impl fmt::Display for LowerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LowerError::Invalid(why) => write!(f, "cannot lower: {why}"),
            LowerError::Cyclic(why) => write!(f, "the compute order cannot run: {why}"),
        }
    }
}

impl std::error::Error for LowerError {}

/// One message to place: produced on `from` (sending stage `stage`), consumed on `to` in round
/// `round`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Placed {
    round: u32,
    kind: Kind,
    /// The sending stage.
    stage: u32,
    mb: u32,
    from: u32,
    to: u32,
}

/// Lowers per-rank compute orders (F, B, W, FB only) into a schedule.
///
/// ```
/// use dualpipe_planner::lower::{lower, Header};
/// use dualpipe_schedule::{parse_program, validate, Pipeline};
/// let header = Header {
///     schedule: "demo".into(),
///     num_ranks: 2,
///     num_stages: 2,
///     num_microbatches: 1,
///     forward_only: false,
///     pipelines: vec![Pipeline { route: vec![0, 1], microbatches: vec![0] }],
/// };
/// let order = vec![parse_program("F s0 m0 | B s0 m0").unwrap(), parse_program("F s1 m0 | B s1 m0").unwrap()];
/// let schedule = lower(header, order).unwrap();
/// validate(&schedule).unwrap();
/// assert_eq!(schedule.ranks[0].len(), 6); // F, send, commit, recv, commit, B
/// ```
pub fn lower(header: Header, order: Vec<Vec<Instruction>>) -> Result<Schedule, LowerError> {
    let mut schedule = Schedule {
        format: Format::V1,
        schedule: header.schedule,
        num_ranks: header.num_ranks,
        num_stages: header.num_stages,
        num_microbatches: header.num_microbatches,
        forward_only: header.forward_only,
        pipelines: header.pipelines,
        ranks: order,
    };
    let topology = Topology::new(&schedule).map_err(|problems| {
        LowerError::Invalid(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let rounds = rounds(&schedule, &topology)?;
    let messages = messages(&schedule, &topology, &rounds);

    // Per rank, per gap (before compute k; k = len is after the last), the messages to post.
    let mut gaps: Vec<Vec<Vec<(Placed, bool)>>> = schedule
        .ranks
        .iter()
        .map(|list| vec![Vec::new(); list.len() + 1])
        .collect();
    for message in messages {
        let gap_on = |rank: u32| rounds[rank as usize].partition_point(|&t| t < message.round);
        gaps[message.from as usize][gap_on(message.from)].push((message, true));
        gaps[message.to as usize][gap_on(message.to)].push((message, false));
    }

    for (rank, list) in schedule.ranks.iter_mut().enumerate() {
        let computes = std::mem::take(list);
        let rank_gaps = &mut gaps[rank];
        for (k, gap) in rank_gaps.iter_mut().enumerate() {
            gap.sort_unstable_by_key(|&(m, is_send)| (m.round, !is_send, m.kind, m.stage, m.mb));
            let mut round = None;
            for &(m, is_send) in gap.iter() {
                if round.is_some_and(|r| r != m.round) {
                    list.push(Instruction::Commit);
                }
                round = Some(m.round);
                list.push(if is_send {
                    Instruction::send(m.kind, m.stage, m.mb, m.to)
                } else {
                    let stage = match m.kind {
                        Kind::Act => m.stage + 1,
                        Kind::Grad => m.stage - 1,
                    };
                    Instruction::recv(m.kind, stage, m.mb, m.from)
                });
            }
            if round.is_some() {
                list.push(Instruction::Commit);
            }
            if let Some(&compute) = computes.get(k) {
                list.push(compute);
            }
        }
    }
    Ok(schedule)
}

const FORWARD: usize = 0;
const BACKWARD: usize = 1;

/// What a compute needs before it can start: `(FORWARD, w)` or `(BACKWARD, w)` of other work.
fn dependencies(instruction: Instruction, topology: &Topology, out: &mut Vec<(usize, Work)>) {
    out.clear();
    let forward = |w: Work, out: &mut Vec<(usize, Work)>| {
        if w.stage > 0 {
            out.push((FORWARD, Work::new(w.stage - 1, w.mb)));
        }
    };
    let backward = |w: Work, out: &mut Vec<(usize, Work)>| {
        out.push((FORWARD, w));
        if !topology.is_last_stage(w.stage) {
            out.push((BACKWARD, Work::new(w.stage + 1, w.mb)));
        }
    };
    match instruction {
        Instruction::Forward(w) => forward(w, out),
        Instruction::Backward { work, .. } => backward(work, out),
        Instruction::Weight(w) => out.push((BACKWARD, w)),
        Instruction::ForwardBackward { f, b } => {
            forward(f, out);
            backward(b, out);
        }
        Instruction::Send(_) | Instruction::Recv(_) | Instruction::Commit => {}
    }
}

/// The round of every compute, rank by rank, in an as-soon-as-possible run. A worklist of
/// ranks: a rank runs until a compute lacks an input, then waits on that input.
fn rounds(schedule: &Schedule, topology: &Topology) -> Result<Vec<Vec<u32>>, LowerError> {
    let slots = topology.num_stages() as usize * topology.num_microbatches() as usize;
    let slot = |w: Work| w.stage as usize * topology.num_microbatches() as usize + w.mb as usize;
    const UNSET: u32 = u32::MAX;
    // done[0] for forwards, done[1] for backwards: the round in which each ran.
    let mut done = [vec![UNSET; slots], vec![UNSET; slots]];
    let mut waiters: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
    let mut rounds: Vec<Vec<u32>> = schedule
        .ranks
        .iter()
        .map(|l| Vec::with_capacity(l.len()))
        .collect();
    let mut ready: Vec<usize> = (0..schedule.ranks.len()).rev().collect();
    let mut deps = Vec::new();
    while let Some(rank) = ready.pop() {
        let list = &schedule.ranks[rank];
        'rank: while let Some(&instruction) = list.get(rounds[rank].len()) {
            if !instruction.is_compute() {
                return Err(LowerError::Invalid(format!(
                    "rank {rank} instruction {}: `{instruction}` is not a compute; lowering takes compute orders only",
                    rounds[rank].len()
                )));
            }
            if works(instruction).any(|w| !topology.contains(w)) {
                return Err(LowerError::Invalid(format!(
                    "rank {rank}: `{instruction}` is out of range"
                )));
            }
            dependencies(instruction, topology, &mut deps);
            let mut at = rounds[rank].last().map_or(0, |&t| t + 1);
            for &(which, work) in &deps {
                let round = done[which][slot(work)];
                if round == UNSET {
                    waiters.entry((which, slot(work))).or_default().push(rank);
                    break 'rank;
                }
                at = at.max(round + 1);
            }
            let mut finish = |which: usize, work: Work, ready: &mut Vec<usize>| {
                done[which][slot(work)] = at;
                if let Some(woken) = waiters.remove(&(which, slot(work))) {
                    ready.extend(woken);
                }
            };
            match instruction {
                Instruction::Forward(w) => finish(FORWARD, w, &mut ready),
                Instruction::Backward { work, .. } => finish(BACKWARD, work, &mut ready),
                Instruction::ForwardBackward { f, b } => {
                    finish(FORWARD, f, &mut ready);
                    finish(BACKWARD, b, &mut ready);
                }
                _ => {}
            }
            rounds[rank].push(at);
        }
    }
    let stuck: Vec<String> = schedule
        .ranks
        .iter()
        .enumerate()
        .filter_map(|(rank, list)| {
            list.get(rounds[rank].len())
                .map(|i| format!("rank {rank} waits at `{i}`"))
        })
        .collect();
    if stuck.is_empty() {
        Ok(rounds)
    } else {
        Err(LowerError::Cyclic(stuck.join(", ")))
    }
}

fn works(instruction: Instruction) -> impl Iterator<Item = Work> {
    let (a, b) = match instruction {
        Instruction::Forward(w) | Instruction::Weight(w) => (Some(w), None),
        Instruction::Backward { work, .. } => (Some(work), None),
        Instruction::ForwardBackward { f, b } => (Some(f), Some(b)),
        _ => (None, None),
    };
    a.into_iter().chain(b)
}

/// Every cross-rank message with the round of its consumer.
fn messages(schedule: &Schedule, topology: &Topology, rounds: &[Vec<u32>]) -> Vec<Placed> {
    let mut out = Vec::new();
    for (rank, list) in schedule.ranks.iter().enumerate() {
        let rank = rank as u32;
        for (k, &instruction) in list.iter().enumerate() {
            let round = rounds[rank as usize][k];
            let (f, b) = match instruction {
                Instruction::Forward(w) => (Some(w), None),
                Instruction::Backward { work, .. } => (None, Some(work)),
                Instruction::ForwardBackward { f, b } => (Some(f), Some(b)),
                _ => (None, None),
            };
            if let Some(w) = f
                && let Some(prev) = topology.prev_rank(w)
                && prev != rank
            {
                out.push(Placed {
                    round,
                    kind: Kind::Act,
                    stage: w.stage - 1,
                    mb: w.mb,
                    from: prev,
                    to: rank,
                });
            }
            if let Some(w) = b
                && let Some(next) = topology.next_rank(w)
                && next != rank
            {
                out.push(Placed {
                    round,
                    kind: Kind::Grad,
                    stage: w.stage + 1,
                    mb: w.mb,
                    from: next,
                    to: rank,
                });
            }
        }
    }
    out
}
