//! The summary of a measured GPU step: the bubble, and how much of the communication time
//! was hidden behind computation. Pure arithmetic over a [`Profile`], so it is tested here on
//! made-up timelines.

use dualpipe_executor::Profile;
use dualpipe_schedule::Schedule;

/// The summary of one measured step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overlap {
    /// Share of rank-time not spent computing (the simulator's definition).
    pub bubble: f64,
    /// Time the comm streams were busy with batches, summed over ranks, microseconds.
    pub comm_us: f64,
    /// Of that, the time during which the same rank's main stream was computing.
    pub hidden_us: f64,
}

impl Overlap {
    /// `hidden / comm`, or 1 when there was no communication.
    pub fn hidden_share(&self) -> f64 {
        if self.comm_us > 0.0 {
            self.hidden_us / self.comm_us
        } else {
            1.0
        }
    }
}

/// Merges overlapping intervals.
fn union(mut spans: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    spans.retain(|(a, b)| b > a);
    spans.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

fn length(spans: &[(f64, f64)]) -> f64 {
    spans.iter().map(|(a, b)| b - a).sum()
}

fn intersection(x: &[(f64, f64)], y: &[(f64, f64)]) -> f64 {
    let (mut i, mut j, mut total) = (0, 0, 0.0);
    while i < x.len() && j < y.len() {
        let lo = x[i].0.max(y[j].0);
        let hi = x[i].1.min(y[j].1);
        if hi > lo {
            total += hi - lo;
        }
        if x[i].1 < y[j].1 { i += 1 } else { j += 1 }
    }
    total
}

/// The bubble and the hidden share of communication of `profile`, a step of `schedule`
/// measured with CUDA events (computes on main, commit batches on comm).
pub fn overlap(profile: &Profile, schedule: &Schedule) -> Overlap {
    let (mut comm_us, mut hidden_us) = (0.0, 0.0);
    for (rank, timings) in profile.ranks.iter().enumerate() {
        let list = &schedule.ranks[rank];
        let compute = union(
            timings
                .iter()
                .filter(|t| list[t.index].is_compute())
                .map(|t| (t.ready_us, t.end_us))
                .collect(),
        );
        let comm = union(
            timings
                .iter()
                .filter(|t| !list[t.index].is_compute())
                .map(|t| (t.start_us, t.end_us))
                .collect(),
        );
        comm_us += length(&comm);
        hidden_us += intersection(&compute, &comm);
    }
    Overlap {
        bubble: profile.bubble(schedule),
        comm_us,
        hidden_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualpipe_executor::Timing;
    use dualpipe_schedule::{ValidSchedule, parse_program};

    fn t(index: usize, start: f64, end: f64) -> Timing {
        Timing {
            index,
            start_us: start,
            ready_us: start,
            end_us: end,
            waited_on: None,
        }
    }

    #[test]
    fn hidden_communication_is_the_part_under_computation() {
        assert_eq!(
            union(vec![(3.0, 4.0), (0.0, 2.0), (1.0, 2.5)]),
            vec![(0.0, 2.5), (3.0, 4.0)]
        );
        assert_eq!(intersection(&[(0.0, 2.5), (3.0, 4.0)], &[(2.0, 3.5)]), 1.0);
        // One rank of 1F1B on 2 ranks: F, send, commit, ...: build its list from the planner.
        let schedule = ValidSchedule::new(
            dualpipe_planner::plan(&dualpipe_planner::PlanRequest::new(
                dualpipe_planner::Family::OneFOneB,
                2,
                1,
            ))
            .unwrap(),
        )
        .unwrap();
        let doc = schedule.schedule();
        let kinds = |rank: usize| -> (Vec<usize>, Vec<usize>) {
            let list = &doc.ranks[rank];
            let computes = (0..list.len()).filter(|&i| list[i].is_compute()).collect();
            let commits = (0..list.len())
                .filter(|&i| !list[i].is_compute() && list[i].to_string() == "commit")
                .collect();
            (computes, commits)
        };
        let (c0, k0) = kinds(0);
        let (c1, k1) = kinds(1);
        // Rank 0: F 0..10, its send's batch 8..12 (2 of 4 hidden), B 20..30, recv batch 15..20.
        // Rank 1: F 12..22, B 22..32, its batches 10..12 and 30..34 (none hidden).
        let profile = Profile {
            ranks: vec![
                vec![
                    t(c0[0], 0.0, 10.0),
                    t(k0[0], 8.0, 12.0),
                    t(k0[1], 15.0, 20.0),
                    t(c0[1], 20.0, 30.0),
                ],
                vec![
                    t(k1[0], 10.0, 12.0),
                    t(c1[0], 12.0, 22.0),
                    t(c1[1], 22.0, 32.0),
                    t(k1[1], 30.0, 34.0),
                ],
            ],
        };
        let o = overlap(&profile, doc);
        assert_eq!(o.comm_us, 4.0 + 5.0 + 2.0 + 4.0);
        assert_eq!(o.hidden_us, 2.0 + 0.0 + 0.0 + 2.0);
        assert!((o.hidden_share() - 4.0 / 15.0).abs() < 1e-12);
        // Makespan 34, busy 20 per rank.
        assert!((o.bubble - 14.0 / 34.0).abs() < 1e-12, "{}", o.bubble);
        let _ = parse_program;
        assert_eq!(
            Overlap {
                bubble: 0.0,
                comm_us: 0.0,
                hidden_us: 0.0
            }
            .hidden_share(),
            1.0
        );
    }
}
