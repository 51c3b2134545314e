//! Measured timelines: the start and end of every compute and commit on every rank, a
//! summary per rank (busy, waiting for communication, idle), the measured bubble, and the
//! Chrome trace (the same layout as the simulator's).

use dualpipe_schedule::{
    Costs, Instruction, Lane, Schedule, Span, StageCosts, StageOverride, Timeline, ValidSchedule,
    chrome_trace,
};

/// A backend's clock. The interpreter takes a mark before and after every compute and commit
/// and turns them into microseconds when the rank's list has run, so a GPU backend can use
/// events recorded on its streams and resolve them after synchronizing.
pub trait Clock {
    /// A point in time, possibly not yet resolved.
    type Mark;

    /// A mark now, on the compute or the communication stream.
    fn mark(&mut self, lane: Lane) -> Self::Mark;

    /// Microseconds from the common origin of the step (the same on every rank) to `mark`.
    /// The step driver asks only after its host has waited for every rank (`Host::settle`).
    fn micros(&mut self, mark: &Self::Mark) -> f64;
}

/// When one compute or commit ran, in microseconds from the start of the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Index of the instruction in its rank's list.
    pub index: usize,
    /// When the instruction began.
    pub start_us: f64,
    /// When its inputs were in hand: for a compute, the time from `start_us` to here was
    /// spent waiting for received data (async model); for a commit, equal to `start_us`.
    pub ready_us: f64,
    /// When it ended.
    pub end_us: f64,
    /// For a compute that took a received buffer: the commit that posted its receive.
    pub waited_on: Option<usize>,
}

/// One rank's time in a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankSummary {
    /// The rank.
    pub rank: u32,
    /// Time spent computing (F, B, W, FB).
    pub busy_us: f64,
    /// Time spent waiting for communication: inside commits, and in computes waiting for
    /// received data.
    pub comm_wait_us: f64,
    /// The rest of the step: before the first and after the last instruction, and between
    /// instructions.
    pub idle_us: f64,
}

/// Mean measured duration of each kind of compute, in microseconds; `None` for a kind the
/// schedule does not use. The simulator's cost model takes these.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MeasuredCosts {
    /// F.
    pub forward: Option<f64>,
    /// B with its weight gradient.
    pub backward: Option<f64>,
    /// B with `defer_w` (input gradient only).
    pub backward_input: Option<f64>,
    /// W.
    pub weight: Option<f64>,
    /// FB.
    pub forward_backward: Option<f64>,
}

impl MeasuredCosts {
    /// Forward, full backward, weight gradient and FB, each where it was measured or can be
    /// derived from the others (a full backward as its input part plus its weight part, and
    /// back; the weight part at most the full backward).
    fn resolved(&self) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
        let b = self
            .backward
            .or_else(|| Some(self.backward_input? + self.weight?));
        let w = self
            .weight
            .or_else(|| Some(b? - self.backward_input?))
            .map(|w| w.clamp(0.0, b.unwrap_or(f64::INFINITY).max(0.0)));
        (self.forward, b, w, self.forward_backward)
    }

    /// The simulator's cost model with these costs, in microseconds, uniform over stages and
    /// with free messages: what the schedule alone would cost at the measured compute speed.
    /// A kind the schedule does not use is derived from the others where it can be (a full
    /// backward as its input part plus its weight part, and back), else 0.
    pub fn to_costs(&self) -> Costs {
        let (f, b, w, fb) = self.resolved();
        let b = b.unwrap_or(0.0);
        Costs {
            uniform: StageCosts {
                f: f.unwrap_or(0.0),
                b,
                w: w.unwrap_or(0.0).min(b),
                fb,
                bytes: 0.0,
                param_bytes: 0.0,
                activation_bytes: 0.0,
            },
            ..Costs::default()
        }
    }
}

/// The measured timeline of one step on every rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    /// Per rank, its timed computes and commits in order.
    pub ranks: Vec<Vec<Timing>>,
}

impl Profile {
    /// From the start of the step to the end of the last instruction on any rank.
    pub fn makespan_us(&self) -> f64 {
        self.ranks
            .iter()
            .flatten()
            .map(|t| t.end_us)
            .fold(0.0, f64::max)
    }

    /// Busy, communication-wait and idle time of every rank.
    pub fn summary(&self, schedule: &Schedule) -> Vec<RankSummary> {
        let makespan = self.makespan_us();
        self.ranks
            .iter()
            .enumerate()
            .map(|(rank, timings)| {
                let list = &schedule.ranks[rank];
                let (mut busy, mut wait) = (0.0, 0.0);
                for t in timings {
                    if list[t.index].is_compute() {
                        busy += t.end_us - t.ready_us;
                        wait += t.ready_us - t.start_us;
                    } else {
                        wait += t.end_us - t.start_us;
                    }
                }
                RankSummary {
                    rank: rank as u32,
                    busy_us: busy,
                    comm_wait_us: wait,
                    idle_us: (makespan - busy - wait).max(0.0),
                }
            })
            .collect()
    }

    /// The measured bubble: the share of rank-time not spent computing,
    /// `sum over ranks of (makespan - busy) / (ranks x makespan)`, the same definition as the
    /// simulator's bubble share.
    pub fn bubble(&self, schedule: &Schedule) -> f64 {
        let summary = self.summary(schedule);
        dualpipe_schedule::bubble_share(self.makespan_us(), summary.iter().map(|s| s.busy_us))
    }

    /// The bubble ([`Profile::bubble`]) and the share of communication hidden behind
    /// computation: per rank, the union of the commit spans against the union of the compute
    /// spans (from `ready_us`, so a compute waiting for data does not count), summed over ranks.
    /// On a GPU the commits are the batches on the comm stream, timed by events.
    pub fn overlap(&self, schedule: &Schedule) -> Overlap {
        let (mut comm_us, mut hidden_us) = (0.0, 0.0);
        for (rank, timings) in self.ranks.iter().enumerate() {
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
            bubble: self.bubble(schedule),
            comm_us,
            hidden_us,
        }
    }

    /// Mean duration of each kind of compute.
    pub fn mean_costs(&self, schedule: &Schedule) -> MeasuredCosts {
        self.means(schedule, None)
    }

    /// Mean duration of each kind of compute on every stage, indexed by stage; an FB counts
    /// for the stage of its forward half (as the cost file's `fb`).
    pub fn mean_stage_costs(&self, schedule: &Schedule) -> Vec<MeasuredCosts> {
        (0..schedule.num_stages)
            .map(|stage| self.means(schedule, Some(stage)))
            .collect()
    }

    /// The measured costs as a cost model in milliseconds (unit `"ms"`, rounded to the
    /// nanosecond): the means over all stages as the uniform costs, and each stage's own means
    /// as its override (a kind a stage did not run keeps the uniform value). Messages are free
    /// and no sizes are set: the caller knows its model's bytes.
    pub fn measured_costs_ms(&self, schedule: &Schedule) -> Costs {
        let to_ms = |us: f64| (us * 1e3).round() / 1e6;
        let ms = |v: Option<f64>| v.map(to_ms);
        let mut costs = self.mean_costs(schedule).to_costs();
        let u = &mut costs.uniform;
        (u.f, u.b, u.w, u.fb) = (to_ms(u.f), to_ms(u.b), to_ms(u.w), ms(u.fb));
        costs.unit = "ms".into();
        for (stage, measured) in self.mean_stage_costs(schedule).iter().enumerate() {
            let (f, b, w, fb) = measured.resolved();
            let changes = StageOverride {
                f: ms(f),
                b: ms(b),
                w: ms(w),
                fb: ms(fb),
                ..StageOverride::default()
            };
            if changes != StageOverride::default() {
                costs.stages.insert(stage as u32, changes);
            }
        }
        // A stage's own W (or B) next to the other's uniform value could break w <= b.
        for stage in 0..schedule.num_stages {
            let c = costs.stage(stage);
            if c.w > c.b
                && let Some(o) = costs.stages.get_mut(&stage)
            {
                o.w = Some(c.b);
            }
        }
        costs
    }

    fn means(&self, schedule: &Schedule, stage: Option<u32>) -> MeasuredCosts {
        let mut sums = [(0.0f64, 0u32); 5];
        for (rank, timings) in self.ranks.iter().enumerate() {
            for t in timings {
                let (kind, at) = match schedule.ranks[rank][t.index] {
                    Instruction::Forward(work) => (0, work.stage),
                    Instruction::Backward {
                        work,
                        defer_w: false,
                    } => (1, work.stage),
                    Instruction::Backward {
                        work,
                        defer_w: true,
                    } => (2, work.stage),
                    Instruction::Weight(work) => (3, work.stage),
                    Instruction::ForwardBackward { f, .. } => (4, f.stage),
                    _ => continue,
                };
                if stage.is_some_and(|s| s != at) {
                    continue;
                }
                sums[kind].0 += t.end_us - t.ready_us;
                sums[kind].1 += 1;
            }
        }
        let mean = |k: usize| (sums[k].1 > 0).then(|| sums[k].0 / f64::from(sums[k].1));
        MeasuredCosts {
            forward: mean(0),
            backward: mean(1),
            backward_input: mean(2),
            weight: mean(3),
            forward_backward: mean(4),
        }
    }

    /// The timeline as spans, in microseconds: computes on the compute lane, commits on the communication
    /// lane, and, where a compute waited for received data, that wait on the communication
    /// lane under the commit that posted the receive.
    pub fn spans(&self, schedule: &Schedule) -> Vec<Span> {
        let mut spans = Vec::new();
        for (rank, timings) in self.ranks.iter().enumerate() {
            let rank = rank as u32;
            for t in timings {
                if schedule.ranks[rank as usize][t.index].is_compute() {
                    if let (Some(commit), true) = (t.waited_on, t.ready_us > t.start_us) {
                        spans.push(Span {
                            rank,
                            index: commit,
                            lane: Lane::Comm,
                            start: t.start_us,
                            end: t.ready_us,
                        });
                    }
                    spans.push(Span {
                        rank,
                        index: t.index,
                        lane: Lane::Compute,
                        start: t.ready_us,
                        end: t.end_us,
                    });
                } else {
                    spans.push(Span {
                        rank,
                        index: t.index,
                        lane: Lane::Comm,
                        start: t.start_us,
                        end: t.end_us,
                    });
                }
            }
        }
        spans
    }

    /// The measured timeline of `schedule` (the schedule run), in microseconds (unit `"us"`):
    /// the type the simulator produces too, which `render` draws. The makespan is
    /// [`Profile::makespan_us`] and each rank's busy time its summary's.
    pub fn timeline(&self, schedule: &ValidSchedule) -> Timeline {
        let doc = schedule.schedule();
        Timeline {
            source: dualpipe_schedule::Source::Measured,
            unit: "us".into(),
            makespan: self.makespan_us(),
            busy: self.summary(doc).iter().map(|s| s.busy_us).collect(),
            spans: self.spans(doc),
        }
    }

    /// The timeline as a Chrome trace (chrome://tracing, Perfetto), laid out as the
    /// simulator's `render --format chrome`.
    pub fn chrome_trace(&self, schedule: &ValidSchedule) -> String {
        chrome_trace(schedule, &self.timeline(schedule))
    }
}

/// How a measured step used its ranks: the bubble, and how much of the communication time
/// was hidden behind computation ([`Profile::overlap`]).
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn measured_costs_fill_in_what_the_schedule_did_not_run() {
        let all = MeasuredCosts {
            forward: Some(1.0),
            backward: Some(2.5),
            backward_input: Some(1.5),
            weight: Some(0.9),
            forward_backward: Some(3.0),
        };
        let c = all.to_costs().uniform;
        assert_eq!((c.f, c.b, c.w, c.fb), (1.0, 2.5, 0.9, Some(3.0)));

        // Only split backwards (ZB-H1 at the edges): B is their sum.
        let split = MeasuredCosts {
            backward: None,
            forward_backward: None,
            ..all
        };
        let c = split.to_costs().uniform;
        assert_eq!((c.b, c.w, c.fb), (2.4, 0.9, None));

        // Only full backwards: nothing is deferred, W stays within B.
        let full = MeasuredCosts {
            backward_input: None,
            weight: None,
            ..all
        };
        let c = full.to_costs().uniform;
        assert_eq!((c.b, c.w), (2.5, 0.0));
        full.to_costs().check().unwrap();
        split.to_costs().check().unwrap();
    }

    #[test]
    fn measured_costs_per_stage_in_milliseconds() {
        use dualpipe_planner::{Family, PlanRequest, plan};
        // ZB-H1 on 2 ranks: F, deferred B and W on both stages. Stage s takes
        // (s + 1) ms per F, 2 (s + 1) ms per deferred B and (s + 1) ms per W.
        let schedule = plan(&PlanRequest::new(Family::Zb1p, 2, 2))
            .unwrap()
            .into_inner();
        let mut profile = Profile::default();
        for list in &schedule.ranks {
            let mut clock = 0.0;
            let mut timings = Vec::new();
            for (index, instruction) in list.iter().enumerate() {
                let (scale, stage) = match instruction {
                    Instruction::Forward(w) => (1.0, w.stage),
                    Instruction::Backward { work, .. } => (2.0, work.stage),
                    Instruction::Weight(w) => (1.0, w.stage),
                    _ => continue,
                };
                let end = clock + scale * 1e3 * f64::from(stage + 1);
                timings.push(Timing {
                    index,
                    start_us: clock,
                    ready_us: clock,
                    end_us: end,
                    waited_on: None,
                });
                clock = end;
            }
            profile.ranks.push(timings);
        }
        let costs = profile.measured_costs_ms(&schedule);
        assert_eq!(costs.unit, "ms");
        let u = costs.uniform;
        assert_eq!((u.f, u.b, u.w), (1.5, 4.5, 1.5));
        for stage in 0..2 {
            let c = costs.stage(stage);
            let k = f64::from(stage + 1);
            assert_eq!((c.f, c.b, c.w, c.fb), (k, 3.0 * k, k, None));
        }
        costs.check().unwrap();
        assert_eq!(
            dualpipe_schedule::Costs::from_json(&costs.to_json()).unwrap(),
            costs
        );
    }

    #[test]
    fn hidden_communication_is_the_part_under_computation() {
        assert_eq!(
            union(vec![(3.0, 4.0), (0.0, 2.0), (1.0, 2.5)]),
            vec![(0.0, 2.5), (3.0, 4.0)]
        );
        assert_eq!(intersection(&[(0.0, 2.5), (3.0, 4.0)], &[(2.0, 3.5)]), 1.0);
        // One rank of 1F1B on 2 ranks: F, send, commit, ...: build its list from the planner.
        let schedule = dualpipe_planner::plan(&dualpipe_planner::PlanRequest::new(
            dualpipe_planner::Family::OneFOneB,
            2,
            1,
        ))
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
        let o = profile.overlap(doc);
        assert_eq!(o.comm_us, 4.0 + 5.0 + 2.0 + 4.0);
        assert_eq!(o.hidden_us, 2.0 + 0.0 + 0.0 + 2.0);
        assert!((o.hidden_share() - 4.0 / 15.0).abs() < 1e-12);
        // Makespan 34, busy 20 per rank.
        assert!((o.bubble - 14.0 / 34.0).abs() < 1e-12, "{}", o.bubble);
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
