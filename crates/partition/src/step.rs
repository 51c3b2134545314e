//! The simulated step time of a cut without re-running the simulator's setup: the schedule is
//! lowered once into the order in which the blocking simulation posts and completes its
//! batches, and a cut only changes the per-stage compute costs.
//!
//! Under the blocking model with free messages ([`dualpipe_schedule::simulate`], the model the
//! partitioner refines under), a rank runs its list on one clock: a compute adds its cost, a
//! commit posts its batch at the rank's clock and returns at the latest post among the batch
//! and its partners' batches. The order of those events does not depend on the costs, so it is
//! read once (by an event-driven pass over the batches); replaying it adds the same costs in
//! the same order as the simulator, so the makespan is the simulator's, bit for bit (checked
//! in the tests).

use dualpipe_schedule::{Instruction, ValidSchedule};

/// Per stage, the compute costs a cut gives it: `f`, `b`, `w` and the cost of an FB whose
/// forward half is the stage (`None`: the sum of its halves).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct StageTimes {
    pub f: Vec<f64>,
    pub b: Vec<f64>,
    pub w: Vec<f64>,
    pub fb: Vec<Option<f64>>,
}

/// Scratch space for [`StepModel::makespan`], reused between calls.
#[derive(Default)]
pub(crate) struct Replay {
    /// The cost of every kind of compute: per stage `f`, `b`, `b - w`, `w` (at `4 * stage`),
    /// then one entry per FB pair of the schedule.
    table: Vec<f64>,
    clock: Vec<f64>,
    posted: Vec<f64>,
}

/// One event of the replay.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// Rank `rank` runs its computes up to batch `batch` (global id) and posts it.
    Post { rank: u32, batch: u32 },
    /// Batch `batch` of rank `rank` completes: the rank's clock becomes the latest post of it
    /// and its partners.
    Finish { rank: u32, batch: u32 },
}

/// A schedule lowered for repeated blocking simulations under free messages.
pub(crate) struct StepModel {
    /// Per global batch: the range of its computes in `costs` (those before its commit).
    computes: Vec<(u32, u32)>,
    /// Per rank: the range in `costs` of the computes after its last commit.
    tails: Vec<(u32, u32)>,
    /// Per compute, in list order: the index of its cost in [`Replay::table`].
    costs: Vec<u32>,
    /// The FB pairs (forward stage, backward stage), in table order after the stages.
    fb_pairs: Vec<(u32, u32)>,
    /// Per global batch: the range of its partner batches in `partners`.
    partner_range: Vec<(u32, u32)>,
    partners: Vec<u32>,
    events: Vec<Event>,
    /// Whether `events` posts and completes every batch (always, for a valid schedule); if
    /// not, [`StepModel::makespan`] gives `None` and the caller runs the simulator.
    complete: bool,
    stages: usize,
}

impl StepModel {
    /// Lowers `valid`.
    pub fn new(valid: &ValidSchedule) -> StepModel {
        let schedule = valid.schedule();
        let links = valid.links();
        let stages = schedule.num_stages as usize;
        let ranks = schedule.ranks.len();
        // Global batch ids: per rank, its commits in order.
        let mut first = Vec::with_capacity(ranks);
        let mut total = 0u32;
        for list in &schedule.ranks {
            first.push(total);
            total += list
                .iter()
                .filter(|i| matches!(i, Instruction::Commit))
                .count() as u32;
        }
        let mut computes = Vec::with_capacity(total as usize);
        let mut tails = Vec::with_capacity(ranks);
        let mut costs = Vec::new();
        let mut fb_pairs: Vec<(u32, u32)> = Vec::new();
        let mut partner_sets: Vec<Vec<u32>> = vec![Vec::new(); total as usize];
        // Per rank, per instruction: the global batch of the commit at or after it.
        let batch_of: Vec<Vec<u32>> = schedule
            .ranks
            .iter()
            .zip(&first)
            .map(|(list, &g0)| {
                let mut g = g0;
                list.iter()
                    .map(|i| {
                        let at = g;
                        g += u32::from(matches!(i, Instruction::Commit));
                        at
                    })
                    .collect()
            })
            .collect();
        for (rank, list) in schedule.ranks.iter().enumerate() {
            let mut start = costs.len() as u32;
            for (index, instruction) in list.iter().enumerate() {
                match *instruction {
                    Instruction::Forward(w) => costs.push(4 * w.stage),
                    Instruction::Backward { work, defer_w } => {
                        costs.push(4 * work.stage + if defer_w { 2 } else { 1 });
                    }
                    Instruction::Weight(w) => costs.push(4 * w.stage + 3),
                    Instruction::ForwardBackward { f, b } => {
                        let pair = (f.stage, b.stage);
                        let p = match fb_pairs.iter().position(|&q| q == pair) {
                            Some(p) => p,
                            None => {
                                fb_pairs.push(pair);
                                fb_pairs.len() - 1
                            }
                        };
                        costs.push((4 * stages + p) as u32);
                    }
                    Instruction::Send(m) | Instruction::Recv(m) => {
                        if let Some(p) = links.partner(rank, index) {
                            let theirs = batch_of[m.peer as usize][p];
                            partner_sets[batch_of[rank][index] as usize].push(theirs);
                        }
                    }
                    Instruction::Commit => {
                        let end = costs.len() as u32;
                        computes.push((start, end));
                        start = end;
                    }
                }
            }
            tails.push((start, costs.len() as u32));
        }
        let mut partner_range = Vec::with_capacity(total as usize);
        let mut partners = Vec::new();
        for set in &mut partner_sets {
            set.sort_unstable();
            set.dedup();
            let at = partners.len() as u32;
            partners.extend_from_slice(set);
            partner_range.push((at, partners.len() as u32));
        }
        let events = order(&first, total, &partner_range, &partners);
        let complete = events.len() == 2 * total as usize;
        StepModel {
            computes,
            tails,
            costs,
            fb_pairs,
            partner_range,
            partners,
            events,
            complete,
            stages,
        }
    }

    /// The makespan of one blocking step under `times`, with scratch space `replay`; `None`
    /// when it is not finite (or the replay is incomplete).
    pub fn makespan(&self, times: &StageTimes, replay: &mut Replay) -> Option<f64> {
        debug_assert_eq!(times.f.len(), self.stages);
        if !self.complete {
            return None;
        }
        let Replay {
            table,
            clock,
            posted,
        } = replay;
        table.clear();
        for s in 0..self.stages {
            // The simulator's expressions: a deferred backward costs `b - w`, an FB `fb` or
            // `f + b`.
            table.extend([times.f[s], times.b[s], times.b[s] - times.w[s], times.w[s]]);
        }
        for &(f, b) in &self.fb_pairs {
            let (f, b) = (f as usize, b as usize);
            table.push(times.fb[f].unwrap_or(times.f[f] + times.b[b]));
        }
        clock.clear();
        clock.resize(self.tails.len(), 0.0);
        // Every batch is posted before it is read (the events are in a valid order).
        posted.resize(self.computes.len(), 0.0);
        for &event in &self.events {
            match event {
                Event::Post { rank, batch } => {
                    let (lo, hi) = self.computes[batch as usize];
                    let mut c = clock[rank as usize];
                    for &k in &self.costs[lo as usize..hi as usize] {
                        c += table[k as usize];
                    }
                    clock[rank as usize] = c;
                    posted[batch as usize] = c;
                }
                Event::Finish { rank, batch } => {
                    let own = posted[batch as usize];
                    let (lo, hi) = self.partner_range[batch as usize];
                    let mut end = own;
                    for &p in &self.partners[lo as usize..hi as usize] {
                        end = end.max(own.max(posted[p as usize]));
                    }
                    clock[rank as usize] = end;
                }
            }
        }
        let mut makespan = 0.0f64;
        for (rank, &(lo, hi)) in self.tails.iter().enumerate() {
            let mut c = clock[rank];
            for &k in &self.costs[lo as usize..hi as usize] {
                c += table[k as usize];
            }
            makespan = makespan.max(c);
        }
        makespan.is_finite().then_some(makespan)
    }
}

/// The order of posts and completions of the blocking simulation: a rank posts its next batch
/// once its previous one has completed, and a batch completes once every partner batch has
/// been posted.
fn order(first: &[u32], total: u32, partner_range: &[(u32, u32)], partners: &[u32]) -> Vec<Event> {
    let ranks = first.len();
    let end = |r: usize| first.get(r + 1).copied().unwrap_or(total);
    let mut posted = vec![false; total as usize];
    // Per rank: its next batch, and whether it has posted it and waits for its completion.
    let mut next: Vec<u32> = first.to_vec();
    let mut waiting = vec![false; ranks];
    let mut events = Vec::with_capacity(2 * total as usize);
    let mut progress = true;
    while progress {
        progress = false;
        for r in 0..ranks {
            loop {
                let g = next[r];
                if g >= end(r) {
                    break;
                }
                if !waiting[r] {
                    posted[g as usize] = true;
                    waiting[r] = true;
                    events.push(Event::Post {
                        rank: r as u32,
                        batch: g,
                    });
                    progress = true;
                }
                let (lo, hi) = partner_range[g as usize];
                if partners[lo as usize..hi as usize]
                    .iter()
                    .all(|&p| posted[p as usize])
                {
                    events.push(Event::Finish {
                        rank: r as u32,
                        batch: g,
                    });
                    waiting[r] = false;
                    next[r] += 1;
                    progress = true;
                } else {
                    break;
                }
            }
        }
    }
    events
}
