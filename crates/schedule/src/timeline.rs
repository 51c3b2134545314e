//! One timed step of a schedule, simulated or measured: when each compute and each commit ran.
//!
//! The simulator ([`crate::Simulation::timeline`]) and the executor's profile both produce a
//! [`Timeline`]; the pictures ([`crate::timeline_text`], [`crate::timeline_svg`]) and the Chrome
//! trace ([`crate::chrome_trace`]) draw one. A Chrome trace this crate wrote (`dualpipe run
//! --trace`, `dualpipe render --format chrome`) reads back into a timeline with
//! [`Timeline::from_chrome_trace`].

use std::fmt;

use crate::diagnostics::ExecutionModel;
use crate::format::Instruction;
use crate::validate::ValidSchedule;

/// Microseconds per abstract time unit in Chrome traces: one unit reads as one millisecond.
pub const TRACE_UNIT_US: f64 = 1000.0;

/// Which stream of a rank an interval ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// F, B, W and FB.
    Compute,
    /// Commit batches (their sends and receives).
    Comm,
}

impl Lane {
    pub(crate) fn tid(self) -> u32 {
        match self {
            Lane::Compute => 0,
            Lane::Comm => 1,
        }
    }
}

/// One timed instruction: a compute on the compute lane, or a commit's batch on the
/// communication lane.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// The rank.
    pub rank: u32,
    /// Index of the instruction in the rank's list (a compute or a commit).
    pub index: usize,
    /// The stream it ran on.
    pub lane: Lane,
    /// Start, from the beginning of the step, in the unit of its [`Timeline`].
    pub start: f64,
    /// End, in the same unit.
    pub end: f64,
}

/// Where the times of a timeline come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The simulator, under this execution model.
    Simulated(ExecutionModel),
    /// A run's clock (a profile, or a Chrome trace read back).
    Measured,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Simulated(model) => write!(f, "{model} model"),
            Source::Measured => f.write_str("measured"),
        }
    }
}

/// A timed step: every compute on its rank's compute lane, every commit (and, measured, every
/// wait for received data, under the commit that posted the receive) on its communication lane.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// Simulated or measured.
    pub source: Source,
    /// The unit of every time here: one of [`crate::UNITS`] (`""` for abstract units).
    pub unit: String,
    /// From the start of the step to its end.
    pub makespan: f64,
    /// Per rank: time spent computing.
    pub busy: Vec<f64>,
    /// The timed instructions, rank by rank and in each rank's order; times in `unit`.
    pub spans: Vec<Span>,
}

/// The bubble of a step: the share of the ranks' time not spent computing,
/// `sum over ranks of (makespan - busy)` over `ranks x makespan`, from each rank's busy time
/// (0 for an empty or instant step). The one definition the simulator, timelines and measured
/// profiles share.
pub fn bubble_share(makespan: f64, busy: impl IntoIterator<Item = f64>) -> f64 {
    let (mut ranks, mut idle) = (0usize, 0.0);
    for b in busy {
        ranks += 1;
        idle += makespan - b;
    }
    let total = makespan * ranks as f64;
    if total > 0.0 { idle / total } else { 0.0 }
}

/// Why a Chrome trace does not read as a timeline of a schedule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TraceError(String);

impl Timeline {
    /// Share of the ranks' time not spent computing: `sum of (makespan - busy)` over
    /// `ranks x makespan`, the simulator's bubble.
    pub fn bubble_share(&self) -> f64 {
        bubble_share(self.makespan, self.busy.iter().copied())
    }

    /// Microseconds per time unit: the unit's, or [`crate::TRACE_UNIT_US`] for abstract units
    /// (one unit reads as one millisecond).
    pub fn unit_us(&self) -> f64 {
        crate::costs::unit_us(&self.unit).unwrap_or(TRACE_UNIT_US)
    }

    /// Per rank, per instruction: the span of each compute (`None` for other instructions and
    /// for computes the timeline does not hold).
    pub(crate) fn computes(&self, valid: &ValidSchedule) -> Vec<Vec<Option<(f64, f64)>>> {
        let mut times: Vec<Vec<Option<(f64, f64)>>> = valid
            .schedule()
            .ranks
            .iter()
            .map(|list| vec![None; list.len()])
            .collect();
        for span in self.spans.iter().filter(|s| s.lane == Lane::Compute) {
            if let Some(slot) = times
                .get_mut(span.rank as usize)
                .and_then(|list| list.get_mut(span.index))
            {
                *slot = Some((span.start, span.end));
            }
        }
        times
    }

    /// Reads a Chrome trace written for `valid` (by `dualpipe run --trace` or `render
    /// --format chrome`) back into a measured timeline, in microseconds (unit `"us"`). Every
    /// complete event (`"ph": "X"`) names its rank (`pid`), lane (`tid` 0 compute, 1
    /// communication) and instruction (`args.index`); an event that does not fit the schedule
    /// (a rank or index out of range, a compute whose name is not the instruction's) is an
    /// error, as is a compute without an event.
    ///
    /// ```
    /// use dualpipe_schedule::{parse_program, simulate, Costs, ExecutionModel, Format,
    ///     Pipeline, Schedule, Source, Timeline, ValidSchedule};
    /// let schedule = Schedule {
    ///     format: Format::V1, schedule: "demo".into(), num_ranks: 1, num_stages: 1,
    ///     num_microbatches: 1, forward_only: false,
    ///     pipelines: vec![Pipeline { route: vec![0], microbatches: vec![0] }],
    ///     ranks: vec![parse_program("F s0 m0 | B s0 m0").unwrap()],
    /// };
    /// let valid = ValidSchedule::new(schedule).unwrap();
    /// let sim = simulate(&valid, &Costs::default(), ExecutionModel::Blocking).unwrap();
    /// let trace = sim.chrome_trace(&valid);
    /// let read = Timeline::from_chrome_trace(&valid, &trace).unwrap();
    /// assert_eq!((read.source, read.makespan), (Source::Measured, 3000.0));
    /// ```
    pub fn from_chrome_trace(valid: &ValidSchedule, text: &str) -> Result<Timeline, TraceError> {
        let fail = |message: String| Err(TraceError(message));
        let json: serde_json::Value = match serde_json::from_str(text) {
            Ok(json) => json,
            Err(e) => return fail(format!("not a Chrome trace: {e}")),
        };
        let events = match json.get("traceEvents").and_then(|e| e.as_array()) {
            Some(events) => events,
            None => match json.as_array() {
                Some(events) => events,
                None => return fail("not a Chrome trace: no `traceEvents` array".into()),
            },
        };
        let schedule = valid.schedule();
        let mut spans = Vec::new();
        for (k, event) in events.iter().enumerate() {
            if event.get("ph").and_then(|p| p.as_str()) != Some("X") {
                continue;
            }
            let number = |field: &str| event.get(field).and_then(serde_json::Value::as_f64);
            let whole = |value: Option<&serde_json::Value>| value.and_then(|v| v.as_u64());
            let (Some(rank), Some(tid), Some(index), Some(ts), Some(dur)) = (
                whole(event.get("pid")),
                whole(event.get("tid")),
                whole(event.get("args").and_then(|a| a.get("index"))),
                number("ts"),
                number("dur"),
            ) else {
                return fail(format!(
                    "event {k}: a span needs `pid`, `tid`, `ts`, `dur` and `args.index`"
                ));
            };
            if !(ts.is_finite() && dur.is_finite() && dur >= 0.0) {
                return fail(format!(
                    "event {k}: `ts` and `dur` must be finite, `dur` >= 0"
                ));
            }
            let Some(list) = schedule.ranks.get(rank as usize) else {
                return fail(format!(
                    "event {k}: rank {rank}, but the schedule has {} ranks",
                    schedule.ranks.len()
                ));
            };
            let Some(&instruction) = list.get(index as usize) else {
                return fail(format!(
                    "event {k}: rank {rank} has no instruction {index} (it has {})",
                    list.len()
                ));
            };
            let lane = match tid {
                0 => Lane::Compute,
                1 => Lane::Comm,
                _ => return fail(format!("event {k}: `tid` {tid} is no lane (0 or 1)")),
            };
            let name = event.get("name").and_then(|n| n.as_str()).unwrap_or("");
            let fits = match lane {
                Lane::Compute => instruction.is_compute() && name == instruction.to_string(),
                Lane::Comm => matches!(instruction, Instruction::Commit),
            };
            if !fits {
                return fail(format!(
                    "event {k} (`{name}`) does not fit rank {rank}, instruction {index} \
                     `{instruction}`: is this the trace of another schedule?"
                ));
            }
            spans.push(Span {
                rank: rank as u32,
                index: index as usize,
                lane,
                start: ts,
                end: ts + dur,
            });
        }
        spans.sort_by_key(|s| (s.rank, s.index));
        Timeline::measured(valid, spans, "us".into())
    }

    /// A measured timeline from its spans (in `unit`): the makespan is the last end, busy the
    /// computes' time. Every span must name an instruction of `valid`, and every compute of
    /// `valid` must have a span.
    pub fn measured(
        valid: &ValidSchedule,
        spans: Vec<Span>,
        unit: String,
    ) -> Result<Timeline, TraceError> {
        let schedule = valid.schedule();
        let mut timed: Vec<Vec<bool>> = schedule
            .ranks
            .iter()
            .map(|list| vec![false; list.len()])
            .collect();
        let mut busy = vec![0.0; schedule.ranks.len()];
        for span in &spans {
            let Some(slot) = timed
                .get_mut(span.rank as usize)
                .and_then(|list| list.get_mut(span.index))
            else {
                return Err(TraceError(format!(
                    "rank {}, instruction {}: not in the schedule",
                    span.rank, span.index
                )));
            };
            if span.lane == Lane::Compute {
                *slot = true;
                busy[span.rank as usize] += span.end - span.start;
            }
        }
        for (rank, list) in schedule.ranks.iter().enumerate() {
            if let Some(index) = (0..list.len()).find(|&i| list[i].is_compute() && !timed[rank][i])
            {
                return Err(TraceError(format!(
                    "rank {rank}, instruction {index} `{}` has no span: is this the trace of another schedule?",
                    list[index]
                )));
            }
        }
        let makespan = spans.iter().map(|s| s.end).fold(0.0, f64::max);
        Ok(Timeline {
            source: Source::Measured,
            unit,
            makespan,
            busy,
            spans,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::costs::Costs;
    use crate::format::two_rank_schedule;
    use crate::simulate::simulate;

    fn two_ranks() -> ValidSchedule {
        ValidSchedule::new(two_rank_schedule(
            false,
            [
                "F s0 m0 | send act s0 m0 -> r1 | commit | recv grad s0 m0 <- r1 | commit | B s0 m0",
                "recv act s1 m0 <- r0 | commit | F s1 m0 | B s1 m0 | send grad s1 m0 -> r0 | commit",
            ],
        ))
        .unwrap()
    }

    #[test]
    fn a_simulated_trace_reads_back_in_microseconds() {
        let valid = two_ranks();
        let sim = simulate(&valid, &Costs::default(), ExecutionModel::Async).unwrap();
        let simulated = sim.timeline(valid.schedule());
        let read = Timeline::from_chrome_trace(&valid, &sim.chrome_trace(&valid)).unwrap();
        assert_eq!(read.unit, "us");
        assert_eq!(read.makespan, simulated.makespan * 1000.0);
        assert_eq!(read.spans.len(), simulated.spans.len());
        for (a, b) in read.spans.iter().zip(&simulated.spans) {
            assert_eq!((a.rank, a.index, a.lane), (b.rank, b.index, b.lane));
            assert_eq!((a.start, a.end), (b.start * 1000.0, b.end * 1000.0));
        }
        assert_eq!(read.bubble_share(), simulated.bubble_share());
    }

    #[test]
    fn traces_that_do_not_fit_are_refused() {
        let valid = two_ranks();
        let error = |text: &str| {
            Timeline::from_chrome_trace(&valid, text)
                .unwrap_err()
                .to_string()
        };
        assert!(error("nope").contains("not a Chrome trace"));
        assert!(error("{}").contains("no `traceEvents`"));
        let event = |pid: u32, tid: u32, index: u32, name: &str| {
            format!(
                r#"{{"name": "{name}", "ph": "X", "pid": {pid}, "tid": {tid}, "ts": 0, "dur": 1, "args": {{"index": {index}}}}}"#
            )
        };
        let trace = |events: &[String]| format!(r#"{{"traceEvents": [{}]}}"#, events.join(","));
        assert!(error(&trace(&[event(2, 0, 0, "F s0 m0")])).contains("rank 2"));
        assert!(error(&trace(&[event(0, 0, 9, "F s0 m0")])).contains("no instruction 9"));
        assert!(error(&trace(&[event(0, 0, 0, "F s0 m1")])).contains("another schedule"));
        assert!(error(&trace(&[event(0, 1, 0, "F s0 m0")])).contains("another schedule"));
        // Every compute needs a span.
        assert!(error(&trace(&[event(0, 0, 0, "F s0 m0")])).contains("has no span"));
    }
}
