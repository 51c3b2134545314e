//! One rank's instruction list with its data routes resolved once, before any step runs:
//! where each compute finds its input and where its result goes.

use dualpipe_schedule::{Instruction, Kind, Topology, ValidSchedule, Work};

/// Where a compute's incoming buffer comes from. Buffers are looked up by the consuming
/// work's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The step's input (stage 0) or target.
    Feed,
    /// A hand-off from the neighbouring stage on this rank.
    Local,
    /// A buffer received from another rank.
    Received,
    /// None: the last stage's backward starts from its own loss.
    Loss,
}

/// Where a compute's result goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sink {
    /// To the neighbouring stage on this rank, stored under that stage's slot.
    Local(usize),
    /// Held under the producer's slot until its `send`.
    Outgoing,
    /// The model output (last stage's forward).
    Output,
    /// Nobody needs it (the first stage's input gradient).
    Discard,
}

/// A resolved forward.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForwardOp {
    pub work: Work,
    pub slot: usize,
    pub input: Source,
    pub output: Sink,
    pub last: bool,
}

/// A resolved backward.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardOp {
    pub work: Work,
    pub slot: usize,
    pub defer_w: bool,
    pub grad: Source,
    pub input_grad: Sink,
}

/// A resolved instruction.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Forward(ForwardOp),
    Backward(BackwardOp),
    Weight(Work),
    ForwardBackward(ForwardOp, BackwardOp),
    /// Send the buffer held under the producer's `slot`.
    Send {
        kind: Kind,
        slot: usize,
        peer: u32,
    },
    /// Receive into the consumer's `slot`; `commit` is the index of the commit posting it.
    Recv {
        kind: Kind,
        slot: usize,
        peer: u32,
        commit: usize,
    },
    Commit,
}

/// One rank's resolved list.
#[derive(Clone, Debug)]
pub(crate) struct Program {
    pub rank: u32,
    pub ops: Vec<Op>,
    /// The stages this rank holds, ascending.
    pub stages: Vec<u32>,
    /// Number of slots (`num_stages * num_microbatches`).
    pub slots: usize,
}

pub(crate) fn slot(topology: &Topology, work: Work) -> usize {
    work.stage as usize * topology.num_microbatches() as usize + work.mb as usize
}

impl Program {
    pub(crate) fn compile(schedule: &ValidSchedule, rank: u32) -> Program {
        let topology = schedule.topology();
        let list = &schedule.schedule().ranks[rank as usize];
        let local = |other: Option<u32>| other == Some(rank);
        let forward = |work: Work| {
            let last = topology.is_last_stage(work.stage);
            ForwardOp {
                work,
                slot: slot(topology, work),
                input: if work.stage == 0 {
                    Source::Feed
                } else if local(topology.prev_rank(work)) {
                    Source::Local
                } else {
                    Source::Received
                },
                output: if last {
                    Sink::Output
                } else if local(topology.next_rank(work)) {
                    Sink::Local(slot(topology, Work::new(work.stage + 1, work.mb)))
                } else {
                    Sink::Outgoing
                },
                last,
            }
        };
        let backward = |work: Work, defer_w: bool| BackwardOp {
            work,
            slot: slot(topology, work),
            defer_w,
            grad: if topology.is_last_stage(work.stage) {
                Source::Loss
            } else if local(topology.next_rank(work)) {
                Source::Local
            } else {
                Source::Received
            },
            input_grad: if work.stage == 0 {
                Sink::Discard
            } else if local(topology.prev_rank(work)) {
                Sink::Local(slot(topology, Work::new(work.stage - 1, work.mb)))
            } else {
                Sink::Outgoing
            },
        };
        let links = schedule.links();
        let ops = list
            .iter()
            .enumerate()
            .map(|(index, instruction)| match *instruction {
                Instruction::Forward(work) => Op::Forward(forward(work)),
                Instruction::Backward { work, defer_w } => Op::Backward(backward(work, defer_w)),
                Instruction::Weight(work) => Op::Weight(work),
                Instruction::ForwardBackward { f, b } => {
                    Op::ForwardBackward(forward(f), backward(b, false))
                }
                Instruction::Send(m) => Op::Send {
                    kind: m.kind,
                    slot: slot(topology, m.work()),
                    peer: m.peer,
                },
                Instruction::Recv(m) => Op::Recv {
                    kind: m.kind,
                    slot: slot(topology, m.work()),
                    peer: m.peer,
                    commit: links
                        .commit_of(rank as usize, index)
                        .expect("a valid schedule commits every receive"),
                },
                Instruction::Commit => Op::Commit,
            })
            .collect();
        let mut stages: Vec<u32> = (0..topology.num_pipelines())
            .flat_map(|p| {
                topology
                    .route(p)
                    .iter()
                    .enumerate()
                    .filter(|&(_, &r)| r == rank)
                    .map(|(stage, _)| stage as u32)
            })
            .collect();
        stages.sort_unstable();
        stages.dedup();
        Program {
            rank,
            ops,
            stages,
            slots: topology.num_stages() as usize * topology.num_microbatches() as usize,
        }
    }
}
