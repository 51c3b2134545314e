//! Reading and writing v1 documents.
//!
//! Reading goes through a borrowed raw form so that an instruction that does not parse is
//! reported with its rank and index, not only a line and column. Writing uses one canonical
//! layout (one instruction per line) so that checked-in schedules diff well.

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::format::{Format, Instruction, Pipeline, Schedule};

/// A document that is not well-formed v1 JSON.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The JSON itself, or a header field, is wrong.
    #[error("not a dualpipe-schedule/v1 document: {}", describe(.0))]
    Document(#[source] serde_json::Error),
    /// One instruction is wrong.
    #[error("rank {rank}, instruction {index}: {reason} in {text}")]
    Instruction {
        /// The rank whose list holds the instruction.
        rank: usize,
        /// Index of the instruction in that list.
        index: usize,
        /// What is wrong.
        reason: String,
        /// The instruction's JSON text.
        text: String,
    },
}

/// A serde error in the user's words: the document is a JSON object, not a Rust type.
fn describe(error: &serde_json::Error) -> String {
    error
        .to_string()
        .replace("struct RawSchedule", "a JSON object")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule<'a> {
    format: Format,
    schedule: String,
    num_ranks: u32,
    num_stages: u32,
    num_microbatches: u32,
    #[serde(default)]
    forward_only: bool,
    pipelines: Vec<Pipeline>,
    #[serde(borrow)]
    ranks: Vec<Vec<&'a RawValue>>,
}

impl Schedule {
    /// Parses a v1 document. Structure only: call [`crate::validate`] to check the rules.
    ///
    /// ```
    /// use dualpipe_schedule::Schedule;
    /// let err = Schedule::from_json(r#"{"format": "dualpipe-schedule/v2"}"#).unwrap_err();
    /// assert!(err.to_string().contains("dualpipe-schedule/v1"));
    /// ```
    pub fn from_json(text: &str) -> Result<Schedule, ParseError> {
        let raw: RawSchedule<'_> = serde_json::from_str(text).map_err(ParseError::Document)?;
        let mut ranks = Vec::with_capacity(raw.ranks.len());
        for (rank, list) in raw.ranks.iter().enumerate() {
            let mut parsed = Vec::with_capacity(list.len());
            for (index, value) in list.iter().enumerate() {
                let instruction: Instruction =
                    serde_json::from_str(value.get()).map_err(|e| ParseError::Instruction {
                        rank,
                        index,
                        reason: strip_position(&e),
                        text: value.get().to_string(),
                    })?;
                parsed.push(instruction);
            }
            ranks.push(parsed);
        }
        Ok(Schedule {
            format: raw.format,
            schedule: raw.schedule,
            num_ranks: raw.num_ranks,
            num_stages: raw.num_stages,
            num_microbatches: raw.num_microbatches,
            forward_only: raw.forward_only,
            pipelines: raw.pipelines,
            ranks,
        })
    }

    /// Writes the canonical layout: header fields one per line, pipelines on one line, one
    /// instruction per line, `", "` and `": "` separators, a final newline.
    pub fn to_json(&self) -> String {
        let instructions: usize = self.ranks.iter().map(Vec::len).sum();
        let mut out = String::with_capacity(256 + instructions * 56);
        let _ = writeln!(out, "{{");
        let _ = writeln!(out, "  \"format\": {},", spaced(&self.format));
        let _ = writeln!(out, "  \"schedule\": {},", spaced(&self.schedule));
        let _ = writeln!(out, "  \"num_ranks\": {},", self.num_ranks);
        let _ = writeln!(out, "  \"num_stages\": {},", self.num_stages);
        let _ = writeln!(out, "  \"num_microbatches\": {},", self.num_microbatches);
        let _ = writeln!(out, "  \"forward_only\": {},", self.forward_only);
        let _ = writeln!(out, "  \"pipelines\": {},", spaced(&self.pipelines));
        out.push_str("  \"ranks\": [");
        for (r, list) in self.ranks.iter().enumerate() {
            out.push_str(if r == 0 { "\n    [" } else { ",\n    [" });
            for (i, instruction) in list.iter().enumerate() {
                out.push_str(if i == 0 { "\n      " } else { ",\n      " });
                write_instruction(&mut out, instruction);
            }
            out.push_str(if list.is_empty() { "]" } else { "\n    ]" });
        }
        out.push_str(if self.ranks.is_empty() {
            "]\n}\n"
        } else {
            "\n  ]\n}\n"
        });
        out
    }
}

/// serde_json appends "at line L column C" to messages; inside one instruction that position
/// means nothing to a user, so it is dropped.
fn strip_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Writes one instruction as `{"op": "F", "stage": 0, "mb": 0}` without going through serde:
/// this is the hot path when writing large schedules.
fn write_instruction(out: &mut String, instruction: &Instruction) {
    let _ = match instruction {
        Instruction::Forward(w) => write!(
            out,
            r#"{{"op": "F", "stage": {}, "mb": {}}}"#,
            w.stage, w.mb
        ),
        Instruction::Backward { work, defer_w } => {
            let _ = write!(
                out,
                r#"{{"op": "B", "stage": {}, "mb": {}"#,
                work.stage, work.mb
            );
            out.push_str(if *defer_w {
                r#", "defer_w": true}"#
            } else {
                "}"
            });
            Ok(())
        }
        Instruction::Weight(w) => write!(
            out,
            r#"{{"op": "W", "stage": {}, "mb": {}}}"#,
            w.stage, w.mb
        ),
        Instruction::ForwardBackward { f, b } => write!(
            out,
            r#"{{"op": "FB", "f": {{"stage": {}, "mb": {}}}, "b": {{"stage": {}, "mb": {}}}}}"#,
            f.stage, f.mb, b.stage, b.mb
        ),
        Instruction::Send(m) | Instruction::Recv(m) => write!(
            out,
            r#"{{"op": "{}", "kind": "{}", "stage": {}, "mb": {}, "peer": {}}}"#,
            instruction.op(),
            m.kind,
            m.stage,
            m.mb,
            m.peer
        ),
        Instruction::Commit => {
            out.push_str(r#"{"op": "commit"}"#);
            Ok(())
        }
    };
}

/// Serializes a value on one line with `", "` and `": "` separators.
fn spaced<T: serde::Serialize>(value: &T) -> String {
    let mut buffer = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut buffer, SpacedFormatter);
    value
        .serialize(&mut serializer)
        .expect("header values always serialize");
    String::from_utf8(buffer).expect("serde_json writes UTF-8")
}

/// A one-line JSON formatter with a space after each comma and colon.
struct SpacedFormatter;

impl serde_json::ser::Formatter for SpacedFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{HAND_OVER, two_rank_schedule};

    fn tiny() -> Schedule {
        two_rank_schedule(true, HAND_OVER)
    }

    #[test]
    fn writes_and_reads_back() {
        let schedule = tiny();
        let text = schedule.to_json();
        assert!(text.contains(r#"{"op": "send", "kind": "act", "stage": 0, "mb": 0, "peer": 1}"#));
        assert!(text.contains(r#""pipelines": [{"route": [0, 1], "microbatches": [0]}],"#));
        assert_eq!(Schedule::from_json(&text).unwrap(), schedule);
        let compact = serde_json::to_string(&schedule).unwrap();
        assert_eq!(Schedule::from_json(&compact).unwrap(), schedule);
    }

    #[test]
    fn instruction_errors_name_rank_and_index() {
        let text = tiny()
            .to_json()
            .replace(r#""peer": 1}"#, r#""peer": 1, "tag": 7}"#);
        let err = Schedule::from_json(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("rank 0, instruction 1: unknown field `tag`"),
            "{err}"
        );
    }

    #[test]
    fn header_errors_are_reported() {
        let text = tiny().to_json().replace("\"num_stages\"", "\"num_stage\"");
        let err = Schedule::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `num_stage`"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }
}
