//! Compute-order analyses that need no cost model: unit-time rounds, per-rank counts and
//! activation peaks, and the text grid printed by `inspect`.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::format::{Instruction, Schedule, Work};
use crate::topology::Topology;

const FORWARD: usize = 0;
const BACKWARD: usize = 1;

/// The computes of a schedule cannot all run: some rank waits, directly or not, on itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the compute order cannot run to the end: {0}")]
pub struct Stalled(pub String);

/// The round of one compute in a unit-time run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    /// Index of the compute in its rank's list.
    pub index: usize,
    /// The round in which it runs (0-based).
    pub round: u32,
}

/// Runs the computes of `schedule` as soon as possible, each taking one round, with messages
/// instant and sends, receives and commits ignored. Returns, per rank, the round of every
/// compute in list order. A compute runs one round after the last compute it depends on
/// (forward of the previous stage; forward of the same work and backward of the next stage for a
/// backward; the deferred backward for a `W`) and after the previous compute of its rank.
///
/// Out-of-range work is treated as a stall; validate first for precise errors.
pub fn compute_rounds(
    schedule: &Schedule,
    topology: &Topology,
) -> Result<Vec<Vec<Round>>, Stalled> {
    compute_times(schedule, topology, &|_| 1)
}

/// Like [`compute_rounds`], with each compute taking `duration(instruction)` time units
/// (at least 1): `round` is then the start time of each compute.
pub fn compute_times(
    schedule: &Schedule,
    topology: &Topology,
    duration: &dyn Fn(Instruction) -> u32,
) -> Result<Vec<Vec<Round>>, Stalled> {
    let slots = topology.num_stages() as usize * topology.num_microbatches() as usize;
    const UNSET: u32 = u32::MAX;
    let mut done = [vec![UNSET; slots], vec![UNSET; slots]];
    let mut waiters: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
    let mut cursor = vec![0usize; schedule.ranks.len()];
    // When each rank's previous compute ends.
    let mut free = vec![0u32; schedule.ranks.len()];
    let mut rounds: Vec<Vec<Round>> = schedule
        .ranks
        .iter()
        .map(|l| Vec::with_capacity(l.len()))
        .collect();
    let mut ready: Vec<usize> = (0..schedule.ranks.len()).rev().collect();
    let mut deps = Vec::new();
    while let Some(rank) = ready.pop() {
        let list = &schedule.ranks[rank];
        'rank: while let Some(&instruction) = list.get(cursor[rank]) {
            if !instruction.is_compute() {
                cursor[rank] += 1;
                continue;
            }
            if works(instruction).any(|w| !topology.contains(w)) {
                break 'rank;
            }
            dependencies(instruction, topology, &mut deps);
            let mut at = free[rank];
            for &(which, work) in &deps {
                let end = done[which][topology.slot(work)];
                if end == UNSET {
                    waiters
                        .entry((which, topology.slot(work)))
                        .or_default()
                        .push(rank);
                    break 'rank;
                }
                at = at.max(end);
            }
            let end = at + duration(instruction).max(1);
            free[rank] = end;
            let mut finish = |which: usize, work: Work, ready: &mut Vec<usize>| {
                done[which][topology.slot(work)] = end;
                if let Some(woken) = waiters.remove(&(which, topology.slot(work))) {
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
            rounds[rank].push(Round {
                index: cursor[rank],
                round: at,
            });
            cursor[rank] += 1;
        }
    }
    let stuck: Vec<String> = schedule
        .ranks
        .iter()
        .enumerate()
        .filter_map(|(rank, list)| {
            list.get(cursor[rank])
                .map(|i| format!("rank {rank} waits at instruction {} `{i}`", cursor[rank]))
        })
        .collect();
    if stuck.is_empty() {
        Ok(rounds)
    } else {
        Err(Stalled(stuck.join(", ")))
    }
}

/// What a compute needs before it can start.
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

/// The work items an instruction computes on (none for communication).
pub fn works(instruction: Instruction) -> impl Iterator<Item = Work> {
    let (a, b) = match instruction {
        Instruction::Forward(w) | Instruction::Weight(w) => (Some(w), None),
        Instruction::Backward { work, .. } => (Some(work), None),
        Instruction::ForwardBackward { f, b } => (Some(f), Some(b)),
        _ => (None, None),
    };
    a.into_iter().chain(b)
}

/// Counts of one rank's instructions and its peaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RankStats {
    /// Forwards, the forward halves of FB included.
    pub forwards: u32,
    /// Backwards, the backward halves of FB included.
    pub backwards: u32,
    /// FB instructions.
    pub overlapped: u32,
    /// Backwards with `defer_w`.
    pub deferred: u32,
    /// W instructions.
    pub weights: u32,
    /// Send instructions.
    pub sends: u32,
    /// Recv instructions.
    pub recvs: u32,
    /// Commit instructions.
    pub commits: u32,
    /// Most activations held at once, in list order: an activation is held from its forward to
    /// its backward, or to its `W` when the backward defers it; an FB takes its forward's
    /// activation before its backward frees one.
    pub peak_activations: u32,
    /// Most deferred weight gradients pending at once.
    pub peak_pending_w: u32,
}

/// Per-rank counts and peaks of `schedule`, in list order.
pub fn rank_stats(schedule: &Schedule) -> Vec<RankStats> {
    schedule
        .ranks
        .iter()
        .map(|list| {
            let mut s = RankStats::default();
            let (mut live, mut pending) = (0u32, 0u32);
            let hold = |live: &mut u32, s: &mut RankStats| {
                *live += 1;
                s.peak_activations = s.peak_activations.max(*live);
            };
            for instruction in list {
                match *instruction {
                    Instruction::Forward(_) => {
                        s.forwards += 1;
                        hold(&mut live, &mut s);
                    }
                    Instruction::Backward { defer_w, .. } => {
                        s.backwards += 1;
                        if defer_w {
                            s.deferred += 1;
                            pending += 1;
                            s.peak_pending_w = s.peak_pending_w.max(pending);
                        } else {
                            live = live.saturating_sub(1);
                        }
                    }
                    Instruction::Weight(_) => {
                        s.weights += 1;
                        pending = pending.saturating_sub(1);
                        live = live.saturating_sub(1);
                    }
                    Instruction::ForwardBackward { .. } => {
                        s.overlapped += 1;
                        s.forwards += 1;
                        s.backwards += 1;
                        hold(&mut live, &mut s);
                        live -= 1;
                    }
                    Instruction::Send(_) => s.sends += 1,
                    Instruction::Recv(_) => s.recvs += 1,
                    Instruction::Commit => s.commits += 1,
                }
            }
            s
        })
        .collect()
}

/// The compute order as a grid, one row per rank, one column per unit-time round (see
/// [`compute_rounds`]), like the figures of the DualPipe README.
///
/// Cells: `F` forward, `B` full backward, `I` input-only backward (`defer_w`), `W` weight
/// gradient, followed by the micro-batch; an FB shows both halves as `F3+B7`. Upper case marks
/// the first stage a rank holds (in stage order along the micro-batch's route), lower case the
/// second; interleaved schedules with more stages per rank add `:k` for the k-th.
pub fn order_grid(schedule: &Schedule, topology: &Topology) -> Result<String, Stalled> {
    let rounds = compute_rounds(schedule, topology)?;
    let legs = Legs::new(topology);
    let label = |rank: usize, instruction: Instruction| legs.label(rank as u32, instruction);
    let width_rounds = rounds
        .iter()
        .filter_map(|r| r.last().map(|x| x.round + 1))
        .max()
        .unwrap_or(0) as usize;
    let mut cells: Vec<Vec<String>> = vec![vec![String::new(); width_rounds]; rounds.len()];
    let mut width = 1;
    for (rank, list) in rounds.iter().enumerate() {
        for r in list {
            let text = label(rank, schedule.ranks[rank][r.index]);
            width = width.max(text.len());
            cells[rank][r.round as usize] = text;
        }
    }
    let name_width = format!("rank {}", rounds.len().saturating_sub(1)).len();
    let mut out = String::new();
    for (rank, row) in cells.iter().enumerate() {
        let _ = write!(out, "{:<name_width$} |", format!("rank {rank}"));
        for cell in row {
            let _ = write!(out, " {cell:<width$}");
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    }
    Ok(out)
}

/// For each (rank, pipeline, stage) a rank runs, its leg: the rank's (pipeline, stage) pairs
/// numbered in the order the routes visit them, the first pipeline's route first. Leg 0 is the
/// way down (DualPipe's first direction, the way down DualPipeV's V), leg 1 the way back.
pub(crate) struct Legs<'a> {
    topology: &'a Topology,
    legs: HashMap<(u32, usize, u32), u32>,
}

impl<'a> Legs<'a> {
    pub(crate) fn new(topology: &'a Topology) -> Self {
        let mut next = vec![0u32; topology.num_ranks() as usize];
        let mut legs = HashMap::new();
        for p in 0..topology.num_pipelines() {
            for (stage, &rank) in topology.route(p).iter().enumerate() {
                legs.insert((rank, p, stage as u32), next[rank as usize]);
                next[rank as usize] += 1;
            }
        }
        Legs { topology, legs }
    }

    /// The leg of `work` on `rank` (0 when the rank does not run it).
    pub(crate) fn leg(&self, rank: u32, work: Work) -> u32 {
        self.legs
            .get(&(rank, self.topology.pipeline_of(work.mb), work.stage))
            .copied()
            .unwrap_or(0)
    }

    /// The grid label of a compute: `F`, `B`, `I` (deferred-weight backward) or `W` and the
    /// micro-batch, lower case on leg 1, with `:k` on leg k >= 2; `F3+b7` for an FB. Empty for
    /// communication.
    pub(crate) fn label(&self, rank: u32, instruction: Instruction) -> String {
        let cell = |op: char, w: Work| {
            let leg = self.leg(rank, w);
            let op = if leg == 1 {
                op.to_ascii_lowercase()
            } else {
                op
            };
            if leg >= 2 {
                format!("{op}{}:{leg}", w.mb)
            } else {
                format!("{op}{}", w.mb)
            }
        };
        match instruction {
            Instruction::Forward(w) => cell('F', w),
            Instruction::Backward { work, defer_w } => cell(if defer_w { 'I' } else { 'B' }, work),
            Instruction::Weight(w) => cell('W', w),
            Instruction::ForwardBackward { f, b } => format!("{}+{}", cell('F', f), cell('B', b)),
            _ => String::new(),
        }
    }
}
