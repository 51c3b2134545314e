//! The types of schedule format v1 and their compact text form.
//!
//! The JSON shape is owned by this module: [`Schedule`] and [`Instruction`] serialize to and
//! deserialize from exactly the documents described in `docs/format.md`, and unknown fields are
//! rejected everywhere. The compact form (`F s3 m12`, `send act s3 m12 -> r4`, `commit`) is what
//! errors, `inspect` and tests print; [`Instruction`] implements both `Display` and `FromStr`
//! for it.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The value of the `format` field of every v1 document.
pub const FORMAT_V1: &str = "dualpipe-schedule/v1";

/// The format tag of a document. Only v1 exists; any other value is rejected when parsing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Format {
    /// `"dualpipe-schedule/v1"`.
    #[default]
    #[serde(rename = "dualpipe-schedule/v1")]
    V1,
}

/// A whole schedule: the model split, the routes of the micro-batches and every rank's
/// instruction list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Always [`Format::V1`].
    pub format: Format,
    /// The family that produced the schedule (`dualpipe`, `1f1b`, ...), or any label.
    pub schedule: String,
    /// Number of ranks (processes or virtual ranks); `ranks` has this many lists.
    pub num_ranks: u32,
    /// Number of consecutive layer groups the model is cut into, numbered from the input.
    pub num_stages: u32,
    /// Number of micro-batches in one step.
    pub num_microbatches: u32,
    /// Inference: only forwards, no backward, no weight gradient.
    #[serde(default)]
    pub forward_only: bool,
    /// How micro-batches travel: each micro-batch belongs to exactly one pipeline.
    pub pipelines: Vec<Pipeline>,
    /// `ranks[r]` is rank r's instruction list, executed in order.
    pub ranks: Vec<Vec<Instruction>>,
}

/// One route through the stages and the micro-batches that take it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// `route[s]` is the rank that runs stage `s` for this pipeline's micro-batches.
    pub route: Vec<u32>,
    /// The micro-batches that travel this route.
    pub microbatches: Vec<u32>,
}

/// One unit of compute: a stage applied to a micro-batch.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Work {
    /// Stage index, from the model input.
    pub stage: u32,
    /// Micro-batch index.
    pub mb: u32,
}

impl Work {
    /// The work item for `stage` and `mb`.
    pub const fn new(stage: u32, mb: u32) -> Self {
        Work { stage, mb }
    }
}

/// What a message carries.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The output activation of a stage, travelling towards the loss.
    Act,
    /// The gradient with respect to a stage input, travelling back towards the model input.
    Grad,
}

/// A queued send or receive. A `send` names the sending stage, a `recv` the receiving stage
/// (the torch convention), so `send act (s, m)` pairs with `recv act (s+1, m)` and
/// `send grad (s, m)` with `recv grad (s-1, m)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Message {
    /// Activation or gradient.
    pub kind: Kind,
    /// The stage on this rank that produces (send) or consumes (recv) the buffer.
    pub stage: u32,
    /// Micro-batch index.
    pub mb: u32,
    /// The other rank.
    pub peer: u32,
}

impl Message {
    /// The work item this message belongs to on this rank.
    pub const fn work(&self) -> Work {
        Work::new(self.stage, self.mb)
    }
}

/// One instruction of a rank's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Wire", into = "Wire")]
pub enum Instruction {
    /// `F`: forward of a micro-batch through a stage.
    Forward(Work),
    /// `B`: backward through a stage; the weight gradient is deferred to a later `W` when
    /// `defer_w` is set.
    Backward {
        /// The stage and micro-batch.
        work: Work,
        /// Compute only the input gradient now; a later `W` computes the weight gradient.
        defer_w: bool,
    },
    /// `W`: the weight gradient of an earlier deferred backward of the same work.
    Weight(Work),
    /// `FB`: a forward and a full backward of two different micro-batches, run overlapped.
    ForwardBackward {
        /// The forward half.
        f: Work,
        /// The backward half (never deferred).
        b: Work,
    },
    /// `send`: queue a send, posted at the next commit.
    Send(Message),
    /// `recv`: queue a receive, posted at the next commit.
    Recv(Message),
    /// `commit`: post every queued send and receive as one batch.
    Commit,
}

impl Instruction {
    /// Forward of `(stage, mb)`.
    pub const fn f(stage: u32, mb: u32) -> Self {
        Instruction::Forward(Work::new(stage, mb))
    }

    /// Full backward of `(stage, mb)`.
    pub const fn b(stage: u32, mb: u32) -> Self {
        Instruction::Backward {
            work: Work::new(stage, mb),
            defer_w: false,
        }
    }

    /// Backward of `(stage, mb)` whose weight gradient is deferred.
    pub const fn b_defer(stage: u32, mb: u32) -> Self {
        Instruction::Backward {
            work: Work::new(stage, mb),
            defer_w: true,
        }
    }

    /// Weight gradient of `(stage, mb)`.
    pub const fn w(stage: u32, mb: u32) -> Self {
        Instruction::Weight(Work::new(stage, mb))
    }

    /// Overlapped forward `f` and backward `b`.
    pub const fn fb(f: Work, b: Work) -> Self {
        Instruction::ForwardBackward { f, b }
    }

    /// Queue a send of `kind` for `(stage, mb)` to `peer`.
    pub const fn send(kind: Kind, stage: u32, mb: u32, peer: u32) -> Self {
        Instruction::Send(Message {
            kind,
            stage,
            mb,
            peer,
        })
    }

    /// Queue a receive of `kind` for `(stage, mb)` from `peer`.
    pub const fn recv(kind: Kind, stage: u32, mb: u32, peer: u32) -> Self {
        Instruction::Recv(Message {
            kind,
            stage,
            mb,
            peer,
        })
    }

    /// Whether the instruction runs a stage (F, B, W or FB).
    pub const fn is_compute(&self) -> bool {
        matches!(
            self,
            Instruction::Forward(_)
                | Instruction::Backward { .. }
                | Instruction::Weight(_)
                | Instruction::ForwardBackward { .. }
        )
    }

    /// The `op` name used in JSON.
    pub const fn op(&self) -> &'static str {
        match self {
            Instruction::Forward(_) => "F",
            Instruction::Backward { .. } => "B",
            Instruction::Weight(_) => "W",
            Instruction::ForwardBackward { .. } => "FB",
            Instruction::Send(_) => "send",
            Instruction::Recv(_) => "recv",
            Instruction::Commit => "commit",
        }
    }
}

impl fmt::Display for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{} m{}", self.stage, self.mb)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Act => "act",
            Kind::Grad => "grad",
        })
    }
}

impl fmt::Display for Instruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instruction::Forward(w) => write!(f, "F {w}"),
            Instruction::Backward { work, defer_w } => {
                write!(f, "B {work}")?;
                if *defer_w {
                    f.write_str(" defer_w")?;
                }
                Ok(())
            }
            Instruction::Weight(w) => write!(f, "W {w}"),
            Instruction::ForwardBackward { f: fw, b } => write!(f, "FB F {fw} + B {b}"),
            Instruction::Send(m) => write!(f, "send {} {} -> r{}", m.kind, m.work(), m.peer),
            Instruction::Recv(m) => write!(f, "recv {} {} <- r{}", m.kind, m.work(), m.peer),
            Instruction::Commit => f.write_str("commit"),
        }
    }
}

/// The compact text of an instruction could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot read instruction `{text}`: {reason}")]
pub struct ParseInstructionError {
    text: String,
    reason: &'static str,
}

impl FromStr for Instruction {
    type Err = ParseInstructionError;

    /// Reads the compact form printed by `Display`, e.g. `F s0 m1`, `B s3 m2 defer_w`,
    /// `FB F s0 m7 + B s7 m3`, `send act s0 m1 -> r1`, `recv grad s2 m5 <- r3`, `commit`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseInstructionError {
            text: text.to_string(),
            reason,
        };
        let tokens: Vec<&str> = text.split_whitespace().collect();
        let number = |token: &str, prefix: char| -> Result<u32, ParseInstructionError> {
            token
                .strip_prefix(prefix)
                .and_then(|digits| digits.parse().ok())
                .ok_or_else(|| fail("expected a stage `sN`, a micro-batch `mN` or a peer `rN`"))
        };
        let work = |s: &str, m: &str| -> Result<Work, ParseInstructionError> {
            Ok(Work::new(number(s, 's')?, number(m, 'm')?))
        };
        let kind = |token: &str| match token {
            "act" => Ok(Kind::Act),
            "grad" => Ok(Kind::Grad),
            _ => Err(fail("expected `act` or `grad`")),
        };
        match tokens.as_slice() {
            ["F", s, m] => Ok(Instruction::Forward(work(s, m)?)),
            ["B", s, m] => Ok(Instruction::Backward {
                work: work(s, m)?,
                defer_w: false,
            }),
            ["B", s, m, "defer_w"] => Ok(Instruction::Backward {
                work: work(s, m)?,
                defer_w: true,
            }),
            ["W", s, m] => Ok(Instruction::Weight(work(s, m)?)),
            ["FB", "F", fs, fm, "+", "B", bs, bm] => Ok(Instruction::ForwardBackward {
                f: work(fs, fm)?,
                b: work(bs, bm)?,
            }),
            ["send", k, s, m, "->", p] => Ok(Instruction::Send(Message {
                kind: kind(k)?,
                stage: number(s, 's')?,
                mb: number(m, 'm')?,
                peer: number(p, 'r')?,
            })),
            ["recv", k, s, m, "<-", p] => Ok(Instruction::Recv(Message {
                kind: kind(k)?,
                stage: number(s, 's')?,
                mb: number(m, 'm')?,
                peer: number(p, 'r')?,
            })),
            ["commit"] => Ok(Instruction::Commit),
            _ => Err(fail("unknown shape")),
        }
    }
}

/// Reads a rank's instruction list written in compact form, one instruction per line or
/// separated by `;` or `|`. Blank pieces are skipped.
///
/// ```
/// use dualpipe_schedule::{parse_program, Instruction};
/// let list = parse_program("F s0 m0 | send act s0 m0 -> r1 | commit").unwrap();
/// assert_eq!(list[2], Instruction::Commit);
/// ```
pub fn parse_program(text: &str) -> Result<Vec<Instruction>, ParseInstructionError> {
    text.split(['\n', ';', '|'])
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .map(str::parse)
        .collect()
}

/// The JSON shape of an instruction, one variant per `op`. Kept private so that the public
/// enum can use descriptive names while the wire keeps the short ones.
#[derive(Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", deny_unknown_fields)]
#[schemars(rename = "Instruction")]
enum Wire {
    /// Forward of `mb` through `stage`.
    F { stage: u32, mb: u32 },
    /// Backward through `stage`; the weight gradient waits for a later `W` when `defer_w`.
    B {
        stage: u32,
        mb: u32,
        #[serde(default, skip_serializing_if = "is_false")]
        defer_w: bool,
    },
    /// Weight gradient of an earlier deferred `B` of the same stage and micro-batch.
    W { stage: u32, mb: u32 },
    /// A forward and a full backward of two different micro-batches, run overlapped.
    FB { f: Work, b: Work },
    /// Queue a send (`act` to the rank of stage+1, `grad` to the rank of stage-1).
    #[serde(rename = "send")]
    Send {
        kind: Kind,
        stage: u32,
        mb: u32,
        peer: u32,
    },
    /// Queue a receive (`act` from the rank of stage-1, `grad` from the rank of stage+1).
    #[serde(rename = "recv")]
    Recv {
        kind: Kind,
        stage: u32,
        mb: u32,
        peer: u32,
    },
    /// Post every queued send and receive as one batch.
    #[serde(rename = "commit")]
    Commit {},
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl From<Wire> for Instruction {
    fn from(wire: Wire) -> Self {
        match wire {
            Wire::F { stage, mb } => Instruction::f(stage, mb),
            Wire::B { stage, mb, defer_w } => Instruction::Backward {
                work: Work::new(stage, mb),
                defer_w,
            },
            Wire::W { stage, mb } => Instruction::w(stage, mb),
            Wire::FB { f, b } => Instruction::ForwardBackward { f, b },
            Wire::Send {
                kind,
                stage,
                mb,
                peer,
            } => Instruction::send(kind, stage, mb, peer),
            Wire::Recv {
                kind,
                stage,
                mb,
                peer,
            } => Instruction::recv(kind, stage, mb, peer),
            Wire::Commit {} => Instruction::Commit,
        }
    }
}

impl From<Instruction> for Wire {
    fn from(instruction: Instruction) -> Self {
        match instruction {
            Instruction::Forward(w) => Wire::F {
                stage: w.stage,
                mb: w.mb,
            },
            Instruction::Backward { work, defer_w } => Wire::B {
                stage: work.stage,
                mb: work.mb,
                defer_w,
            },
            Instruction::Weight(w) => Wire::W {
                stage: w.stage,
                mb: w.mb,
            },
            Instruction::ForwardBackward { f, b } => Wire::FB { f, b },
            Instruction::Send(m) => Wire::Send {
                kind: m.kind,
                stage: m.stage,
                mb: m.mb,
                peer: m.peer,
            },
            Instruction::Recv(m) => Wire::Recv {
                kind: m.kind,
                stage: m.stage,
                mb: m.mb,
                peer: m.peer,
            },
            Instruction::Commit => Wire::Commit {},
        }
    }
}

impl JsonSchema for Instruction {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Instruction".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        Wire::json_schema(generator)
    }
}

/// A two-stage, one-micro-batch schedule on two ranks with the given programs, for tests.
#[cfg(test)]
pub(crate) fn two_rank_schedule(forward_only: bool, programs: [&str; 2]) -> Schedule {
    Schedule {
        format: Format::V1,
        schedule: "demo".into(),
        num_ranks: 2,
        num_stages: 2,
        num_microbatches: 1,
        forward_only,
        pipelines: vec![Pipeline {
            route: vec![0, 1],
            microbatches: vec![0],
        }],
        ranks: programs.map(|p| parse_program(p).unwrap()).to_vec(),
    }
}

/// [`two_rank_schedule`]'s forward-only hand-over: rank 0 runs stage 0 and sends to rank 1.
#[cfg(test)]
pub(crate) const HAND_OVER: [&str; 2] = [
    "F s0 m0 | send act s0 m0 -> r1 | commit",
    "recv act s1 m0 <- r0 | commit | F s1 m0",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_form_round_trips() {
        let samples = [
            "F s3 m12",
            "B s3 m12",
            "B s0 m1 defer_w",
            "W s7 m0",
            "FB F s0 m7 + B s7 m3",
            "send act s3 m12 -> r4",
            "recv grad s2 m1 <- r3",
            "commit",
        ];
        for text in samples {
            let parsed: Instruction = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn compact_form_rejects_nonsense() {
        for text in [
            "",
            "F s3",
            "F 3 12",
            "send foo s1 m1 -> r2",
            "FB F s0 m1",
            "X",
        ] {
            assert!(text.parse::<Instruction>().is_err(), "{text}");
        }
    }

    #[test]
    fn json_uses_short_ops_and_rejects_unknown_fields() {
        let json = serde_json::to_string(&Instruction::b(2, 5)).unwrap();
        assert_eq!(json, r#"{"op":"B","stage":2,"mb":5}"#);
        let json = serde_json::to_string(&Instruction::b_defer(2, 5)).unwrap();
        assert_eq!(json, r#"{"op":"B","stage":2,"mb":5,"defer_w":true}"#);
        let json = serde_json::to_string(&Instruction::Commit).unwrap();
        assert_eq!(json, r#"{"op":"commit"}"#);
        for bad in [
            r#"{"op":"commit","x":1}"#,
            r#"{"op":"F","stage":1,"mb":2,"peer":0}"#,
            r#"{"op":"FB","f":{"stage":1,"mb":2,"z":1},"b":{"stage":0,"mb":1}}"#,
            r#"{"op":"send","kind":"weights","stage":1,"mb":2,"peer":0}"#,
        ] {
            assert!(serde_json::from_str::<Instruction>(bad).is_err(), "{bad}");
        }
    }
}
