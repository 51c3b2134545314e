//! Random mutations of valid schedules, for the mutation tests and `cargo xtask mutations`.

use dualpipe_schedule::{Instruction, Kind, Message, Schedule, Work};

/// A small deterministic random number generator (SplitMix64), so that every mutation can be
/// reproduced from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The kinds of mutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// Remove one instruction.
    Drop,
    /// Insert a copy of an instruction right after it or somewhere else on the rank.
    Duplicate,
    /// Swap two instructions of one rank (adjacent half of the time).
    Swap,
    /// Change the peer of a send or receive.
    Peer,
    /// Change the stage of an instruction.
    Stage,
    /// Change the micro-batch of an instruction.
    Microbatch,
    /// Move a commit elsewhere on its rank.
    MoveCommit,
    /// Flip `defer_w` of a backward, or the kind of a message.
    Flip,
    /// Move an instruction to another rank.
    MoveRank,
}

impl Mutation {
    /// Every kind.
    pub const ALL: [Mutation; 9] = [
        Mutation::Drop,
        Mutation::Duplicate,
        Mutation::Swap,
        Mutation::Peer,
        Mutation::Stage,
        Mutation::Microbatch,
        Mutation::MoveCommit,
        Mutation::Flip,
        Mutation::MoveRank,
    ];
}

/// Applies one random mutation to `schedule` in place and describes it. Returns `None` when the
/// chosen mutation does not apply (for example no commit to move); the caller draws again.
pub fn mutate(schedule: &mut Schedule, rng: &mut Rng) -> Option<String> {
    let kind = Mutation::ALL[rng.below(Mutation::ALL.len())];
    let ranks = schedule.ranks.len();
    if ranks == 0 {
        return None;
    }
    let r = rng.below(ranks);
    let len = schedule.ranks[r].len();
    if len == 0 {
        return None;
    }
    let i = rng.below(len);
    let list = &mut schedule.ranks[r];
    let before = list[i];
    let small = |rng: &mut Rng, value: u32, limit: u32| -> u32 {
        match rng.below(3) {
            0 => value.wrapping_add(1),
            1 => value.wrapping_sub(1),
            _ => rng.below(limit as usize + 1) as u32,
        }
    };
    let num_stages = schedule.num_stages;
    let num_mbs = schedule.num_microbatches;
    let description = match kind {
        Mutation::Drop => {
            list.remove(i);
            format!("drop rank {r} instruction {i} `{before}`")
        }
        Mutation::Duplicate => {
            let at = if rng.below(2) == 0 {
                i + 1
            } else {
                rng.below(len + 1)
            };
            list.insert(at, before);
            format!("duplicate rank {r} instruction {i} `{before}` at {at}")
        }
        Mutation::Swap => {
            let j = if rng.below(2) == 0 {
                (i + 1).min(len - 1)
            } else {
                rng.below(len)
            };
            if i == j || list[i] == list[j] {
                return None;
            }
            list.swap(i, j);
            format!("swap rank {r} instructions {i} and {j}")
        }
        Mutation::Peer => {
            let (Instruction::Send(m) | Instruction::Recv(m)) = &mut list[i] else {
                return None;
            };
            m.peer = small(rng, m.peer, ranks as u32);
            format!("rank {r} instruction {i}: `{before}` -> `{}`", list[i])
        }
        Mutation::Stage | Mutation::Microbatch => {
            let change = |w: &mut Work, rng: &mut Rng| {
                if kind == Mutation::Stage {
                    w.stage = small(rng, w.stage, num_stages);
                } else {
                    w.mb = small(rng, w.mb, num_mbs);
                }
            };
            match &mut list[i] {
                Instruction::Forward(w) | Instruction::Weight(w) => change(w, rng),
                Instruction::Backward { work, .. } => change(work, rng),
                Instruction::ForwardBackward { f, b } => {
                    if rng.below(2) == 0 {
                        change(f, rng)
                    } else {
                        change(b, rng)
                    }
                }
                Instruction::Send(m) | Instruction::Recv(m) => {
                    let mut w = m.work();
                    change(&mut w, rng);
                    *m = Message {
                        stage: w.stage,
                        mb: w.mb,
                        ..*m
                    };
                }
                Instruction::Commit => return None,
            }
            if list[i] == before {
                return None;
            }
            format!("rank {r} instruction {i}: `{before}` -> `{}`", list[i])
        }
        Mutation::MoveCommit => {
            let commits: Vec<usize> = list
                .iter()
                .enumerate()
                .filter(|(_, x)| matches!(x, Instruction::Commit))
                .map(|(k, _)| k)
                .collect();
            if commits.is_empty() {
                return None;
            }
            let from = commits[rng.below(commits.len())];
            list.remove(from);
            let to = if rng.below(2) == 0 {
                (from + 1).min(list.len())
            } else {
                rng.below(list.len() + 1)
            };
            list.insert(to, Instruction::Commit);
            if from == to {
                return None;
            }
            format!("move rank {r} commit {from} to {to}")
        }
        Mutation::Flip => {
            match &mut list[i] {
                Instruction::Backward { defer_w, .. } => *defer_w = !*defer_w,
                Instruction::Send(m) | Instruction::Recv(m) => {
                    m.kind = match m.kind {
                        Kind::Act => Kind::Grad,
                        Kind::Grad => Kind::Act,
                    }
                }
                _ => return None,
            }
            format!("rank {r} instruction {i}: `{before}` -> `{}`", list[i])
        }
        Mutation::MoveRank => {
            if ranks < 2 {
                return None;
            }
            let instruction = list.remove(i);
            let to = (r + 1 + rng.below(ranks - 1)) % ranks;
            let at = rng.below(schedule.ranks[to].len() + 1);
            schedule.ranks[to].insert(at, instruction);
            format!("move rank {r} instruction {i} `{before}` to rank {to} at {at}")
        }
    };
    Some(description)
}
