//! Chrome trace output (the JSON that chrome://tracing and Perfetto open), shared by the
//! simulator's `render --format chrome` and the executor's measured timelines so that both look
//! the same: one process per rank, one thread for compute and one for communication, and a flow
//! arrow from the batch that sends each message to the batch that receives it.

use std::collections::HashMap;

use crate::format::{Instruction, Schedule};
use crate::timeline::{Lane, Span, Timeline};
use crate::validate::{Links, ValidSchedule};

/// Writes `timeline` of `valid` as a Chrome trace (JSON object format), in microseconds
/// ([`Timeline::unit_us`] per time unit). Flow arrows join the sending and the receiving commit
/// of every message whose two commits both have spans.
pub fn chrome_trace(valid: &ValidSchedule, timeline: &Timeline) -> String {
    let unit_us = timeline.unit_us();
    let spans: Vec<Span> = timeline
        .spans
        .iter()
        .map(|s| Span {
            start: s.start * unit_us,
            end: s.end * unit_us,
            ..*s
        })
        .collect();
    spans_trace(valid.schedule(), valid.links(), &spans)
}

/// [`chrome_trace`] of spans already in microseconds.
fn spans_trace(schedule: &Schedule, links: &Links, spans: &[Span]) -> String {
    let mut out = String::with_capacity(128 + spans.len() * 160);
    out.push_str("{\"displayTimeUnit\": \"ms\", \"traceEvents\": [\n");
    let mut first = true;
    let mut event = |out: &mut String, text: String| {
        if !first {
            out.push_str(",\n");
        }
        first = false;
        out.push_str(&text);
    };
    for rank in 0..schedule.ranks.len() {
        event(
            &mut out,
            format!(
                r#"{{"name": "process_name", "ph": "M", "pid": {rank}, "args": {{"name": "rank {rank}"}}}}"#
            ),
        );
        event(
            &mut out,
            format!(
                r#"{{"name": "process_sort_index", "ph": "M", "pid": {rank}, "args": {{"sort_index": {rank}}}}}"#
            ),
        );
        for (lane, name) in [(Lane::Compute, "compute"), (Lane::Comm, "communication")] {
            event(
                &mut out,
                format!(
                    r#"{{"name": "thread_name", "ph": "M", "pid": {rank}, "tid": {}, "args": {{"name": "{name}"}}}}"#,
                    lane.tid()
                ),
            );
        }
    }
    let mut commit_span: HashMap<(u32, usize), Span> = HashMap::new();
    for span in spans {
        let list = &schedule.ranks[span.rank as usize];
        let instruction = list[span.index];
        let (name, category) = match instruction {
            Instruction::Commit => (batch_name(list, span.index), "comm"),
            other => (other.to_string(), category(other)),
        };
        if matches!(instruction, Instruction::Commit) {
            commit_span.insert((span.rank, span.index), *span);
        }
        event(
            &mut out,
            format!(
                r#"{{"name": {}, "cat": "{category}", "ph": "X", "pid": {}, "tid": {}, "ts": {:.3}, "dur": {:.3}, "args": {{"index": {}}}}}"#,
                json_string(&name),
                span.rank,
                span.lane.tid(),
                span.start,
                (span.end - span.start).max(0.0),
                span.index
            ),
        );
    }
    let mut flow = 0u64;
    for (rank, list) in schedule.ranks.iter().enumerate() {
        for (index, instruction) in list.iter().enumerate() {
            let Instruction::Send(message) = instruction else {
                continue;
            };
            let (Some(partner), Some(commit)) =
                (links.partner(rank, index), links.commit_of(rank, index))
            else {
                continue;
            };
            let peer = message.peer as usize;
            let Some(their_commit) = links.commit_of(peer, partner) else {
                continue;
            };
            let (Some(from), Some(to)) = (
                commit_span.get(&(rank as u32, commit)),
                commit_span.get(&(message.peer, their_commit)),
            ) else {
                continue;
            };
            flow += 1;
            let (start, end) = flow_ends(from, to);
            let name = json_string(&instruction.to_string());
            event(
                &mut out,
                format!(
                    r#"{{"name": {name}, "cat": "message", "ph": "s", "id": {flow}, "pid": {rank}, "tid": 1, "ts": {start:.3}}}"#
                ),
            );
            event(
                &mut out,
                format!(
                    r#"{{"name": {name}, "cat": "message", "ph": "f", "bp": "e", "id": {flow}, "pid": {peer}, "tid": 1, "ts": {end:.3}}}"#
                ),
            );
        }
    }
    out.push_str("\n]}\n");
    out
}

/// Where a message's arrow starts (in the sending batch's span) and ends (in the receiving
/// batch's span), never back in time. When the two spans overlap, both ends go to the middle of
/// the overlap; otherwise each to the middle of its span, the end no earlier than the start.
fn flow_ends(from: &Span, to: &Span) -> (f64, f64) {
    let lo = from.start.max(to.start);
    let hi = from.end.min(to.end);
    if lo < hi {
        let both = (lo + hi) / 2.0;
        return (both, both);
    }
    let start = middle(from);
    (start, middle(to).max(start))
}

/// A flow end point strictly inside its span (Perfetto binds flow events to the slice open on
/// the thread at their timestamp, and a slice that ends, or the next that starts, exactly there
/// would be ambiguous).
fn middle(span: &Span) -> f64 {
    (span.start + span.end.max(span.start)) / 2.0
}

fn category(instruction: Instruction) -> &'static str {
    match instruction {
        Instruction::Forward(_) => "F",
        Instruction::Backward { defer_w: false, .. } => "B",
        Instruction::Backward { defer_w: true, .. } => "I",
        Instruction::Weight(_) => "W",
        Instruction::ForwardBackward { .. } => "FB",
        _ => "comm",
    }
}

/// The name of a commit's span: the ops it posts.
fn batch_name(list: &[Instruction], commit: usize) -> String {
    let start = list[..commit]
        .iter()
        .rposition(|i| matches!(i, Instruction::Commit))
        .map_or(0, |p| p + 1);
    let ops: Vec<String> = list[start..commit]
        .iter()
        .filter(|i| matches!(i, Instruction::Send(_) | Instruction::Recv(_)))
        .map(ToString::to_string)
        .collect();
    if ops.is_empty() {
        "commit".into()
    } else {
        format!("commit: {}", ops.join(", "))
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{HAND_OVER, two_rank_schedule};
    use crate::validate::validate;

    #[test]
    fn trace_has_spans_threads_and_flows() {
        let schedule = two_rank_schedule(true, HAND_OVER);
        let report = validate(&schedule).unwrap();
        let span = |rank, index, lane, start, end| Span {
            rank,
            index,
            lane,
            start,
            end,
        };
        let spans = [
            span(0, 0, Lane::Compute, 0.0, 10.0),
            span(0, 2, Lane::Comm, 10.0, 12.0),
            span(1, 1, Lane::Comm, 0.0, 12.0),
            span(1, 2, Lane::Compute, 12.0, 20.0),
        ];
        let text = spans_trace(&schedule, &report.links, &spans);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let events = json["traceEvents"].as_array().unwrap();
        let phase = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
        assert_eq!(phase("X"), 4);
        assert_eq!(phase("s"), 1);
        assert_eq!(phase("f"), 1);
        assert_eq!(phase("M"), 2 * (2 + 2));
        let commit = events
            .iter()
            .find(|e| e["ph"] == "X" && e["pid"] == 0 && e["tid"] == 1)
            .unwrap();
        assert_eq!(commit["name"], "commit: send act s0 m0 -> r1");
        let ts = |ph: &str| events.iter().find(|e| e["ph"] == ph).unwrap()["ts"].as_f64();
        assert!(ts("f") >= ts("s"), "the arrow goes back in time");
    }

    #[test]
    fn flows_never_go_back_in_time() {
        let span = |start, end| Span {
            rank: 0,
            index: 0,
            lane: Lane::Comm,
            start,
            end,
        };
        // The receiver posted long before the sender and finished with it: the middle of the
        // receiving span (6) lies before the middle of the sending one (11).
        assert_eq!(flow_ends(&span(10.0, 12.0), &span(0.0, 12.0)), (11.0, 11.0));
        assert_eq!(flow_ends(&span(0.0, 2.0), &span(4.0, 6.0)), (1.0, 5.0));
        assert_eq!(flow_ends(&span(4.0, 6.0), &span(0.0, 2.0)), (5.0, 5.0));
        assert_eq!(flow_ends(&span(3.0, 3.0), &span(3.0, 3.0)), (3.0, 3.0));
    }
}
