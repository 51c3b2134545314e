//! torch.distributed.pipelining's CSV schedules, both ways.
//!
//! torch writes a schedule as one CSV row per rank, one action per cell: `0F3` (stage 0 forward
//! of micro-batch 3), `7I0` (backward of the input only), `7W0` (weight gradient), `7B3` (full
//! backward), `(0F7;7B3)OVERLAP_F_B` (an overlapped pair). Its "compute_comms" form adds
//! `0SEND_F0`, `1RECV_F0`, `3SEND_B2`, `2RECV_B2`; a send names the sending stage and a
//! receive the receiving stage, as in format v1. The format names stages, never ranks: torch
//! infers which rank runs a stage from the row it appears in, so a stage must live on one rank.
//!
//! - [`to_torch_csv`] writes a valid schedule (compute only, or with its messages).
//! - [`read_torch_csv`] reads a compute-only CSV into compute orders and the header they imply,
//!   ready for the planner's lowering pass.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::compute_order::{ComputeOrder, Header};
use crate::format::{Instruction, Kind, Message, Pipeline, Work};
use crate::validate::ValidSchedule;

/// A schedule that torch's CSV cannot express, or a CSV that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TorchCsvError(pub String);

/// The torch action of a compute instruction.
fn action(instruction: Instruction) -> Option<String> {
    Some(match instruction {
        Instruction::Forward(w) => format!("{}F{}", w.stage, w.mb),
        Instruction::Backward {
            work,
            defer_w: true,
        } => format!("{}I{}", work.stage, work.mb),
        Instruction::Backward {
            work,
            defer_w: false,
        } => format!("{}B{}", work.stage, work.mb),
        Instruction::Weight(w) => format!("{}W{}", w.stage, w.mb),
        Instruction::ForwardBackward { f, b } => {
            format!("({}F{};{}B{})OVERLAP_F_B", f.stage, f.mb, b.stage, b.mb)
        }
        _ => return None,
    })
}

/// The torch action of a send or receive.
fn message_action(message: Message, is_send: bool) -> String {
    let what = match (message.kind, is_send) {
        (Kind::Act, true) => "SEND_F",
        (Kind::Act, false) => "RECV_F",
        (Kind::Grad, true) => "SEND_B",
        (Kind::Grad, false) => "RECV_B",
    };
    format!("{}{what}{}", message.stage, message.mb)
}

/// Writes `valid` as torch CSV: one line per rank, `\n` line ends, no header.
///
/// Compute only, the rows list F, B, I, W and OVERLAP_F_B in each rank's order. With
/// `with_comms`, each commit is replaced by the sends and then the receives of its batch, in
/// their order (torch posts each op where it stands; sends first keeps every receive behind the
/// send it waits for). Refused when a stage runs on more than one rank (DualPipe's two copies of
/// every stage), since torch places a stage on exactly one rank.
///
/// ```
/// use dualpipe_schedule::{parse_program, to_torch_csv, Format, Pipeline, Schedule, ValidSchedule};
/// let schedule = Schedule {
///     format: Format::V1, schedule: "demo".into(), num_ranks: 1, num_stages: 1,
///     num_microbatches: 2, forward_only: false,
///     pipelines: vec![Pipeline { route: vec![0], microbatches: vec![0, 1] }],
///     ranks: vec![parse_program("F s0 m0 | FB F s0 m1 + B s0 m0 | B s0 m1 defer_w | W s0 m1").unwrap()],
/// };
/// let valid = ValidSchedule::new(schedule).unwrap();
/// assert_eq!(to_torch_csv(&valid, false).unwrap(), "0F0,(0F1;0B0)OVERLAP_F_B,0I1,0W1\n");
/// ```
pub fn to_torch_csv(valid: &ValidSchedule, with_comms: bool) -> Result<String, TorchCsvError> {
    let schedule = valid.schedule();
    single_placement(&schedule.pipelines, &schedule.schedule)?;
    let mut out = String::new();
    for list in &schedule.ranks {
        let mut cells: Vec<String> = Vec::with_capacity(list.len());
        let mut queued: Vec<(Message, bool)> = Vec::new();
        for &instruction in list {
            match instruction {
                Instruction::Send(m) => queued.push((m, true)),
                Instruction::Recv(m) => queued.push((m, false)),
                Instruction::Commit => {
                    if with_comms {
                        // Stable: sends first, each group in its own order.
                        queued.sort_by_key(|&(_, is_send)| !is_send);
                        cells.extend(queued.iter().map(|&(m, s)| message_action(m, s)));
                    }
                    queued.clear();
                }
                compute => cells.extend(action(compute)),
            }
        }
        let _ = writeln!(out, "{}", cells.join(","));
    }
    Ok(out)
}

/// Checks that every stage runs on one rank.
fn single_placement(pipelines: &[Pipeline], name: &str) -> Result<(), TorchCsvError> {
    let Some(first) = pipelines.first() else {
        return Ok(());
    };
    for (p, pipeline) in pipelines.iter().enumerate().skip(1) {
        for (stage, (&a, &b)) in first.route.iter().zip(&pipeline.route).enumerate() {
            if a != b {
                return Err(TorchCsvError(format!(
                    "cannot write {name} as torch CSV: stage {stage} runs on rank {a} (pipeline 0) and on rank {b} (pipeline {p}). \
                     torch's format names stages, not ranks, and places each stage on exactly one rank; a schedule that keeps \
                     two copies of a stage on two ranks, as DualPipe does, cannot be expressed. DualPipeV runs the same \
                     algorithm with one copy of each stage and converts."
                )));
            }
        }
    }
    Ok(())
}

/// One parsed cell.
enum Cell {
    Compute(Instruction),
    /// UNSHARD, RESHARD, REDUCE_GRAD: bookkeeping of torch's runtime, no pipeline meaning.
    Bookkeeping,
}

/// Reads a compute-only torch CSV (torch's `pipeline_order`) into a compute order named
/// `torch` ([`ComputeOrder::named`] renames it): one row per rank, one pipeline along the
/// stages' placement that every micro-batch takes. Empty cells (idle slots) and the runtime's
/// `UNSHARD`, `RESHARD` and `REDUCE_GRAD` are skipped; sends and receives are refused (the
/// lowering pass places them). Every error names the row (rank), the column and the cell.
///
/// ```
/// use dualpipe_schedule::read_torch_csv;
/// let order = read_torch_csv("0F0,0F1,0I0,0W0,0B1\n,1F0,(1F1;1B0)OVERLAP_F_B,1B1\n").unwrap();
/// let doc = order.document();
/// assert_eq!((doc.num_ranks, doc.num_stages, doc.num_microbatches), (2, 2, 2));
/// assert_eq!(doc.pipelines[0].route, vec![0, 1]);
/// assert_eq!(order.ranks()[1][1].to_string(), "FB F s1 m1 + B s1 m0");
/// ```
pub fn read_torch_csv(text: &str) -> Result<ComputeOrder, TorchCsvError> {
    let mut rows: Vec<&str> = text.split('\n').map(|l| l.trim_end_matches('\r')).collect();
    while rows.last().is_some_and(|l| l.trim().is_empty()) {
        rows.pop();
    }
    if rows.is_empty() {
        return Err(TorchCsvError(
            "the CSV is empty: torch writes one row per rank".into(),
        ));
    }
    let mut order = Vec::with_capacity(rows.len());
    // Stage -> (rank, column) of its first action.
    let mut owner: BTreeMap<u32, (u32, usize)> = BTreeMap::new();
    let mut microbatches = 0u32;
    let mut forwards = 0u64;
    let mut backward = false;
    for (rank, row) in rows.iter().enumerate() {
        let mut list = Vec::new();
        for (k, raw) in row.split(',').enumerate() {
            let column = k + 1;
            let cell = unquote(raw.trim());
            if cell.is_empty() {
                continue;
            }
            let at = |why: String| {
                TorchCsvError(format!(
                    "row {rank} (rank {rank}), column {column} `{cell}`: {why}"
                ))
            };
            let instruction = match parse_cell(cell).map_err(at)? {
                Cell::Compute(instruction) => instruction,
                Cell::Bookkeeping => continue,
            };
            for work in crate::order::works(instruction) {
                let stage = work.stage;
                let (other, other_column) = *owner.entry(stage).or_insert((rank as u32, column));
                if other != rank as u32 {
                    return Err(at(format!(
                        "stage {stage} also appears on rank {other} (column {other_column}); torch places a stage on one rank"
                    )));
                }
                microbatches = microbatches.max(work.mb.saturating_add(1));
            }
            forwards += u64::from(matches!(
                instruction,
                Instruction::Forward(_) | Instruction::ForwardBackward { .. }
            ));
            backward |= !matches!(instruction, Instruction::Forward(_));
            list.push(instruction);
        }
        order.push(list);
    }
    let Some((&last, _)) = owner.last_key_value() else {
        return Err(TorchCsvError("the CSV has no compute action".into()));
    };
    let stages = u64::from(last) + 1;
    if stages != owner.len() as u64 {
        let missing: Vec<String> = (0..=last)
            .filter(|s| !owner.contains_key(s))
            .take(8)
            .map(|s| s.to_string())
            .collect();
        return Err(TorchCsvError(format!(
            "stage(s) {} have no action, so no row says which rank runs them (stages are numbered from 0 to {last})",
            missing.join(", ")
        )));
    }
    // Each (stage, micro-batch) needs its forward; this also keeps stray huge ids from sizing
    // the document.
    let needed = stages * u64::from(microbatches);
    if needed > forwards {
        return Err(TorchCsvError(format!(
            "the ids run to stage {last} and micro-batch {}, so {needed} forwards are needed, but the CSV has {forwards}: \
             stages and micro-batches are numbered from 0 without gaps",
            microbatches - 1
        )));
    }
    let header = Header {
        schedule: "torch".into(),
        num_ranks: order.len() as u32,
        num_stages: owner.len() as u32,
        num_microbatches: microbatches,
        forward_only: !backward,
        pipelines: vec![Pipeline {
            route: owner.values().map(|&(rank, _)| rank).collect(),
            microbatches: (0..microbatches).collect(),
        }],
    };
    ComputeOrder::new(header, order).map_err(|e| TorchCsvError(e.to_string()))
}

fn unquote(cell: &str) -> &str {
    cell.strip_prefix('"')
        .and_then(|c| c.strip_suffix('"'))
        .unwrap_or(cell)
}

/// Reads `<stage><TYPE><mb>` or `(<a>;<b>)OVERLAP_F_B`.
fn parse_cell(cell: &str) -> Result<Cell, String> {
    if let Some(inner) = cell.strip_prefix('(') {
        let Some((parts, kind)) = inner.split_once(')') else {
            return Err("an overlapped pair is written `(<forward>;<backward>)OVERLAP_F_B`".into());
        };
        if kind != "OVERLAP_F_B" {
            return Err(format!(
                "`{kind}` after the parentheses: only OVERLAP_F_B groups actions"
            ));
        }
        let halves: Vec<&str> = parts.split(';').map(str::trim).collect();
        let [a, b] = halves.as_slice() else {
            return Err(format!(
                "an overlapped pair has two actions, this has {}",
                halves.len()
            ));
        };
        let (a, b) = (single(a)?, single(b)?);
        let pair = match (a, b) {
            (Instruction::Forward(f), Instruction::Backward { work, defer_w })
            | (Instruction::Backward { work, defer_w }, Instruction::Forward(f)) => {
                if defer_w {
                    return Err("the backward of an overlapped pair must be a full `B`; format v1 does not defer its weights".into());
                }
                Instruction::ForwardBackward { f, b: work }
            }
            _ => {
                return Err(
                    "an overlapped pair is one forward `F` and one full backward `B`".into(),
                );
            }
        };
        return Ok(Cell::Compute(pair));
    }
    for bookkeeping in ["UNSHARD", "RESHARD", "REDUCE_GRAD"] {
        if let Some(stage) = cell.strip_suffix(bookkeeping)
            && !stage.is_empty()
            && stage.bytes().all(|b| b.is_ascii_digit())
        {
            return Ok(Cell::Bookkeeping);
        }
    }
    single(cell).map(Cell::Compute)
}

/// Reads one `<stage><F|I|B|W><mb>`.
fn single(cell: &str) -> Result<Instruction, String> {
    let digits = cell.bytes().take_while(u8::is_ascii_digit).count();
    let rest = &cell[digits..];
    let stage: u32 = cell[..digits]
        .parse()
        .map_err(|_| "an action starts with its stage number, e.g. `0F3`".to_string())?;
    for comm in ["SEND_F", "RECV_F", "SEND_B", "RECV_B"] {
        if rest.starts_with(comm) {
            return Err(format!(
                "{comm} is a communication action: give the compute-only CSV (torch's pipeline_order); the lowering pass places sends and receives"
            ));
        }
    }
    let mut chars = rest.chars();
    let kind = chars.next();
    let mb_text = chars.as_str();
    let mb: u32 = mb_text.parse().map_err(|_| {
        format!("expected a micro-batch number after the action type, found `{mb_text}`")
    })?;
    let work = Work::new(stage, mb);
    Ok(match kind {
        Some('F') => Instruction::Forward(work),
        Some('B') => Instruction::Backward {
            work,
            defer_w: false,
        },
        Some('I') => Instruction::Backward {
            work,
            defer_w: true,
        },
        Some('W') => Instruction::Weight(work),
        _ => {
            return Err(
                "unknown action type; expected F, B, I, W, OVERLAP_F_B, or torch's UNSHARD, RESHARD, REDUCE_GRAD".into(),
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `csv` and expects an error containing `expected`.
    fn refused(csv: &str, expected: &str) {
        let error = read_torch_csv(csv).unwrap_err();
        assert!(error.0.contains(expected), "{csv:?}: {error}");
    }

    #[test]
    fn reads_every_compute_action() {
        let order = read_torch_csv(
            "0UNSHARD,0F0,0F1,0I0,,0W0,(0F2;0B1)OVERLAP_F_B,0B2,0REDUCE_GRAD,0RESHARD\r\n",
        )
        .unwrap();
        let text: Vec<String> = order.ranks()[0].iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "F s0 m0",
                "F s0 m1",
                "B s0 m0 defer_w",
                "W s0 m0",
                "FB F s0 m2 + B s0 m1",
                "B s0 m2"
            ]
        );
        let doc = order.document();
        assert_eq!((doc.num_stages, doc.num_microbatches), (1, 3));
        assert!(!doc.forward_only);
        assert!(read_torch_csv("0F0,0F1\n").unwrap().document().forward_only);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        refused("", "empty");
        refused(
            "0F0,0X1\n",
            "row 0 (rank 0), column 2 `0X1`: unknown action type",
        );
        refused(
            "0F0\n1F0,0B0\n",
            "row 1 (rank 1), column 2 `0B0`: stage 0 also appears on rank 0 (column 1)",
        );
        refused("0F0,0SEND_F0\n", "SEND_F is a communication action");
        refused("F0\n", "starts with its stage number");
        refused("0F\n", "expected a micro-batch number");
        refused("(0F1;0I0)OVERLAP_F_B\n", "must be a full `B`");
        refused(
            "(0F1;0F0)OVERLAP_F_B\n",
            "one forward `F` and one full backward",
        );
        refused("(0F1;0B0)FUSED\n", "only OVERLAP_F_B groups actions");
        refused("0F0\n2F0\n", "stage(s) 1 have no action");
        refused("0UNSHARD\n", "no compute action");
        refused(
            "0F0,0F4000000000\n",
            "4000000001 forwards are needed, but the CSV has 2",
        );
        refused(
            "0F0\n4000000000F0\n",
            "stage(s) 1, 2, 3, 4, 5, 6, 7, 8 have no action",
        );
    }
}
