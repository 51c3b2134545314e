//! Lowering: from per-rank compute orders to a full schedule with sends, receives and commits.
//!
//! The pass is deadlock-free by construction under both execution models:
//!
//! 1. Give every compute a start time: run the compute orders as soon as possible with typical
//!    durations (forward 1, backward 2, ...) and instant messages.
//! 2. A message whose consumer starts at time `t` is received in the gap just before the
//!    consumer, and sent in the producer rank's gap that holds `t`: after its computes that start
//!    before `t` (the producer among them, since it ends by `t`), before those that start at `t`
//!    or later.
//! 3. Each gap posts one batch per distinct `t`, in increasing order; inside a batch, messages
//!    are sorted by (kind, sending stage, micro-batch), the same key on both sides of every
//!    channel.
//!
//! Every batch then pairs only with batches of the same `t` on other ranks, and the batches of
//! one rank are in strictly increasing order of `t`, so by induction on `t` every batch is posted
//! and completes: no rank can wait on a batch of a later time. The durations only decide where
//! messages go; realistic ones put each send where its receiver will want it.

use std::fmt;

use dualpipe_schedule::{
    Format, Instruction, Kind, Pipeline, Schedule, Topology, TorchOrder, compute_times,
};

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
    if let Some((rank, index, instruction)) = schedule
        .ranks
        .iter()
        .enumerate()
        .find_map(|(r, l)| l.iter().position(|i| !i.is_compute()).map(|i| (r, i, l[i])))
    {
        return Err(LowerError::Invalid(format!(
            "rank {rank} instruction {index}: `{instruction}` is not a compute; lowering takes compute orders only"
        )));
    }
    let rounds: Vec<Vec<u32>> = compute_times(&schedule, &topology, &typical_duration)
        .map_err(|stalled| LowerError::Cyclic(stalled.0))?
        .into_iter()
        .map(|list| list.into_iter().map(|r| r.round).collect())
        .collect();
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

/// Lowers a compute order read from torch's CSV (`dualpipe_schedule::read_torch_csv`) into a
/// schedule labelled `name`: one pipeline along the order's stage placement, every micro-batch
/// on it.
pub fn lower_torch_order(order: TorchOrder, name: &str) -> Result<Schedule, LowerError> {
    let header = Header {
        schedule: name.to_string(),
        num_ranks: order.num_ranks,
        num_stages: order.num_stages,
        num_microbatches: order.num_microbatches,
        forward_only: order.forward_only,
        pipelines: vec![Pipeline {
            route: order.route,
            microbatches: (0..order.num_microbatches).collect(),
        }],
    };
    lower(header, order.order)
}

/// The durations the placement assumes: the usual proportions of a transformer layer, forward 1,
/// full backward 2 (input gradient 1, weight gradient 1), an overlapped pair 3. Any consistent
/// durations keep the result deadlock-free; realistic ones put each send where the receiver
/// will want it, so that a blocking commit rarely waits.
fn typical_duration(instruction: Instruction) -> u32 {
    match instruction {
        Instruction::Forward(_) | Instruction::Weight(_) => 1,
        Instruction::Backward { defer_w: true, .. } => 1,
        Instruction::Backward { defer_w: false, .. } => 2,
        Instruction::ForwardBackward { .. } => 3,
        Instruction::Send(_) | Instruction::Recv(_) | Instruction::Commit => 0,
    }
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
