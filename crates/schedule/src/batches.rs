//! The numbering of commit batches: each `commit` posts one batch (the sends and receives queued
//! on its rank since the previous commit), and batches get global ids rank by rank. Computed
//! once by the validator and kept in the [`crate::ValidSchedule`]; the progress check and the
//! simulator both read it.

use crate::format::{Instruction, Schedule};

/// Per rank, which batch posts each instruction, and where each batch's commit is.
///
/// Batch ids are global: rank 0's batches come first (`0..count(0)`), then rank 1's, and so
/// on, each rank's in program order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batches {
    /// Per rank, per instruction: the number of commits strictly before it.
    before: Vec<Vec<u32>>,
    /// Per rank: the instruction index of each commit.
    commits: Vec<Vec<u32>>,
    /// Per rank: the global id of its first batch; one more entry holds the total.
    first: Vec<u32>,
}

impl Batches {
    /// Numbers the batches of `schedule`.
    pub fn new(schedule: &Schedule) -> Self {
        let mut before = Vec::with_capacity(schedule.ranks.len());
        let mut commits = Vec::with_capacity(schedule.ranks.len());
        let mut first = Vec::with_capacity(schedule.ranks.len() + 1);
        let mut total = 0u32;
        for list in &schedule.ranks {
            let mut count = 0u32;
            let mut at = Vec::with_capacity(list.len());
            let mut indices = Vec::new();
            for (i, instruction) in list.iter().enumerate() {
                at.push(count);
                if matches!(instruction, Instruction::Commit) {
                    indices.push(i as u32);
                    count += 1;
                }
            }
            first.push(total);
            total += count;
            before.push(at);
            commits.push(indices);
        }
        first.push(total);
        Batches {
            before,
            commits,
            first,
        }
    }

    /// The number of batches of every rank together.
    pub fn total(&self) -> u32 {
        *self.first.last().expect("one entry past the ranks")
    }

    /// The global id of `rank`'s first batch.
    pub fn first(&self, rank: usize) -> u32 {
        self.first[rank]
    }

    /// How many batches `rank` posts (its number of commits).
    pub fn count(&self, rank: usize) -> u32 {
        self.commits[rank].len() as u32
    }

    /// The instruction indices of `rank`'s commits, in order.
    pub fn commits(&self, rank: usize) -> &[u32] {
        &self.commits[rank]
    }

    /// How many commits come before instruction `index` of `rank`: a send or receive there is
    /// posted by `rank`'s batch of that number.
    pub fn before(&self, rank: usize, index: usize) -> u32 {
        self.before[rank][index]
    }

    /// The global id of the batch that posts the send or receive at `(rank, index)`.
    pub fn of(&self, rank: usize, index: usize) -> u32 {
        self.first[rank] + self.before[rank][index]
    }

    /// Whether global batch `g` is the first of its rank.
    pub fn is_first_of_rank(&self, g: u32) -> bool {
        self.first[..self.first.len() - 1].binary_search(&g).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{HAND_OVER, two_rank_schedule};

    #[test]
    fn numbers_batches_rank_by_rank() {
        let schedule = two_rank_schedule(true, HAND_OVER);
        let batches = Batches::new(&schedule);
        assert_eq!(batches.total(), 2);
        assert_eq!((batches.first(0), batches.first(1)), (0, 1));
        assert_eq!(batches.of(0, 1), 0);
        assert_eq!(batches.of(1, 0), 1);
        assert_eq!(batches.before(1, 2), 1);
        assert_eq!(batches.commits(1), [1]);
        assert!(batches.is_first_of_rank(1));
    }
}
