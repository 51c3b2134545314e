//! Schedule generators: one pure function per schedule family, from (family, ranks,
//! micro-batches) to a format-v1 [`Schedule`].
//!
//! - `dualpipe` and `dualpipev` reproduce the reference implementation instruction for
//!   instruction (compute, send, recv and commit, in order).
//! - `1f1b`, `gpipe`, `zb1p`, `zbv` and `interleaved-1f1b` are generated as compute orders and
//!   lowered by [`lower`], which inserts the sends, receives and commits.
//!
//! The planner does no I/O and never prints; it validates every schedule it plans and returns
//! a [`ValidSchedule`]. The families, their constraints and their stage counts are one table,
//! [`FAMILIES`], which `--help`, the errors, the Python binding and the README read.
//!
//! ```
//! use dualpipe_planner::{plan, Family, PlanRequest};
//! let valid = plan(&PlanRequest::new(Family::DualPipeV, 4, 10)).unwrap();
//! assert_eq!(valid.schedule().num_stages, 8);
//! ```

mod classic;
mod dualpipe;
pub mod lower;

use std::fmt;
use std::str::FromStr;

use dualpipe_schedule::{Costs, Header, Pipeline, Schedule, ValidSchedule, ValidationErrors};

/// A schedule family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// DeepSeek's DualPipe: two pipelines in opposite directions over N stages on N ranks.
    DualPipe,
    /// DualPipeV, DualPipe cut in half: one pipeline folded into a V, 2N stages on N ranks.
    DualPipeV,
    /// One forward, one backward (PipeDream-flush).
    OneFOneB,
    /// All forwards, then all backwards.
    GPipe,
    /// ZB-H1 from the zero-bubble paper: 1F1B with the weight gradient split off and moved
    /// into the cool-down bubble, at 1F1B's activation memory.
    Zb1p,
    /// ZB-V from the zero-bubble paper: two stages per rank in a V, split backward.
    Zbv,
    /// Interleaved 1F1B (Megatron-LM): V stages per rank in a loop.
    Interleaved1F1B,
}

/// The chunks per rank (stages per rank, V) of `interleaved-1f1b` when a request names none.
pub const DEFAULT_CHUNKS_PER_RANK: u32 = 2;

/// One row of the family table: what `plan --help`, the planner's errors, the Python
/// binding's `families()` and the README say about a family. [`FAMILIES`] holds every row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyInfo {
    /// The family.
    pub family: Family,
    /// The name used on the command line and in the `schedule` field.
    pub name: &'static str,
    /// What the ranks N must be, in short (`"even, >= 2"`).
    pub ranks: &'static str,
    /// What the micro-batches C must be, in short (`"even, >= 2N"`).
    pub microbatches: &'static str,
    /// The number of stages as a formula of N and the chunks per rank V.
    pub stages: &'static str,
    /// The whole constraint in words, as errors state it.
    pub constraint: &'static str,
    /// Whether the family takes `--chunks-per-rank` (default [`DEFAULT_CHUNKS_PER_RANK`]).
    pub takes_chunks: bool,
    /// A remark for the README's table (may be empty).
    pub notes: &'static str,
}

/// Every family, in [`Family::ALL`]'s order; `FAMILIES[f as usize].family == f`.
pub const FAMILIES: [FamilyInfo; 7] = [
    FamilyInfo {
        family: Family::DualPipe,
        name: "dualpipe",
        ranks: "even, >= 2",
        microbatches: "even, >= 2N",
        stages: "N",
        constraint: "an even number of ranks N >= 2 and an even number of micro-batches C >= 2N",
        takes_chunks: false,
        notes: "two directions, each stage on two ranks",
    },
    FamilyInfo {
        family: Family::DualPipeV,
        name: "dualpipev",
        ranks: ">= 1",
        microbatches: ">= 2N",
        stages: "2N",
        constraint: "ranks N >= 1 and micro-batches C >= 2N",
        takes_chunks: false,
        notes: "one pipeline folded into a V",
    },
    FamilyInfo {
        family: Family::OneFOneB,
        name: "1f1b",
        ranks: ">= 1",
        microbatches: ">= 1",
        stages: "N",
        constraint: "ranks N >= 1 and micro-batches C >= 1",
        takes_chunks: false,
        notes: "",
    },
    FamilyInfo {
        family: Family::GPipe,
        name: "gpipe",
        ranks: ">= 1",
        microbatches: ">= 1",
        stages: "N",
        constraint: "ranks N >= 1 and micro-batches C >= 1",
        takes_chunks: false,
        notes: "",
    },
    FamilyInfo {
        family: Family::Zb1p,
        name: "zb1p",
        ranks: ">= 1",
        microbatches: ">= 1",
        stages: "N",
        constraint: "ranks N >= 1 and micro-batches C >= 1",
        takes_chunks: false,
        notes: "ZB-H1: split backward, 1F1B memory",
    },
    FamilyInfo {
        family: Family::Zbv,
        name: "zbv",
        ranks: ">= 1",
        microbatches: ">= 1",
        stages: "2N",
        constraint: "ranks N >= 1 and micro-batches C >= 1",
        takes_chunks: false,
        notes: "ZB-V: V-shaped, split backward",
    },
    FamilyInfo {
        family: Family::Interleaved1F1B,
        name: "interleaved-1f1b",
        ranks: ">= 1",
        microbatches: "<= N, or a multiple of C div N (rounds of equal size)",
        stages: "N x V",
        constraint: "ranks N >= 1, chunks per rank V >= 1, and micro-batches C >= 1 that split into rounds of equal size: C up to N, or a multiple of C / N rounded down (with N = 4: 8 and 12, not 9)",
        takes_chunks: true,
        notes: "",
    },
];

impl Family {
    /// Every family, in the order `--help` lists them.
    pub const ALL: [Family; 7] = [
        Family::DualPipe,
        Family::DualPipeV,
        Family::OneFOneB,
        Family::GPipe,
        Family::Zb1p,
        Family::Zbv,
        Family::Interleaved1F1B,
    ];

    /// The family's row of [`FAMILIES`].
    pub const fn info(self) -> &'static FamilyInfo {
        &FAMILIES[self as usize]
    }

    /// The name used on the command line and in the `schedule` field.
    pub const fn name(self) -> &'static str {
        self.info().name
    }

    /// What the family requires of its parameters, in words.
    pub const fn constraint(self) -> &'static str {
        self.info().constraint
    }

    /// How many stages the family cuts the model into, as a formula of the ranks N and the
    /// chunks per rank V: `N`, `2N` or `N x V`.
    pub const fn stages_formula(self) -> &'static str {
        self.info().stages
    }
}

/// The families and their constraints as `plan --help` lists them, one line each.
pub fn families_help() -> String {
    let width = FAMILIES.iter().map(|f| f.name.len()).max().unwrap_or(0);
    let mut text =
        String::from("Schedules and what they need (N ranks, C micro-batches, V chunks per rank):");
    for f in &FAMILIES {
        let chunks = if f.takes_chunks {
            format!(
                "\n  {:width$}  --chunks-per-rank V >= 1 (default {DEFAULT_CHUNKS_PER_RANK})",
                ""
            )
        } else {
            String::new()
        };
        text.push_str(&format!(
            "\n  {:width$}  N {}; C {}; {} stages{chunks}",
            f.name, f.ranks, f.microbatches, f.stages
        ));
    }
    text
}

/// The families as the README's markdown table (one line per row, ending with a newline).
pub fn families_markdown() -> String {
    let mut text = String::from(
        "| schedule | ranks N | micro-batches C | stages | notes |\n|---|---|---|---|---|\n",
    );
    for f in &FAMILIES {
        let notes = if f.takes_chunks {
            format!("`--chunks-per-rank V` (default {DEFAULT_CHUNKS_PER_RANK})")
        } else {
            f.notes.to_string()
        };
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" {notes}")
        };
        text.push_str(&format!(
            "| `{}` | {} | {} | {} |{notes} |\n",
            f.name, f.ranks, f.microbatches, f.stages
        ));
    }
    text
}

/// The family names, comma separated, in [`Family::ALL`]'s order.
pub fn family_names() -> String {
    Family::ALL.map(Family::name).join(", ")
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Family {
    type Err = PlanError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Family::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| PlanError::UnknownFamily(name.to_string()))
    }
}

/// What to plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanRequest {
    /// The schedule family.
    pub family: Family,
    /// Number of ranks N.
    pub ranks: u32,
    /// Number of micro-batches C.
    pub microbatches: u32,
    /// Stages per rank for `interleaved-1f1b` (V); other families take none.
    pub chunks_per_rank: Option<u32>,
    /// Inference: forwards only.
    pub forward_only: bool,
}

impl PlanRequest {
    /// A training step of `family` on `ranks` ranks with `microbatches` micro-batches.
    pub const fn new(family: Family, ranks: u32, microbatches: u32) -> Self {
        PlanRequest {
            family,
            ranks,
            microbatches,
            chunks_per_rank: None,
            forward_only: false,
        }
    }

    /// The same request, forward only.
    pub const fn forward_only(mut self) -> Self {
        self.forward_only = true;
        self
    }

    /// The same request with `v` stages per rank (`interleaved-1f1b`).
    pub const fn chunks_per_rank(mut self, v: u32) -> Self {
        self.chunks_per_rank = Some(v);
        self
    }

    /// The chunks per rank V the plan uses: the request's for `interleaved-1f1b`, else
    /// [`DEFAULT_CHUNKS_PER_RANK`]; 1 for every other family.
    pub const fn chunks(&self) -> u32 {
        match (self.family, self.chunks_per_rank) {
            (Family::Interleaved1F1B, Some(v)) => v,
            (Family::Interleaved1F1B, None) => DEFAULT_CHUNKS_PER_RANK,
            _ => 1,
        }
    }

    /// The number of stages the plan has: N, 2N or N x V, by family.
    pub const fn num_stages(&self) -> u32 {
        stages(self.family, self.ranks, self.chunks())
    }
}

/// Why a request cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The family name is not known.
    #[error("unknown schedule `{0}`; known schedules: {names}", names = family_names())]
    UnknownFamily(String),
    /// The parameters break the family's constraint.
    #[error("{family} needs {}; got {ranks} ranks and {microbatches} micro-batches{}", family.constraint(), chunks.map(|v| format!(" with {v} chunks per rank")).unwrap_or_default())]
    Constraint {
        /// The family.
        family: Family,
        /// Requested ranks.
        ranks: u32,
        /// Requested micro-batches.
        microbatches: u32,
        /// Requested chunks per rank.
        chunks: Option<u32>,
    },
    /// `--chunks-per-rank` given to a family that has a fixed number of stages per rank.
    #[error(
        "{family} has a fixed number of stages per rank; --chunks-per-rank applies to interleaved-1f1b only"
    )]
    ChunksNotAccepted {
        /// The family.
        family: Family,
    },
    /// A generator produced a compute order that does not lower: a bug in the planner.
    #[error("internal planner error, please report it: {0}")]
    Internal(String),
    /// The planned schedule failed validation: a bug in the planner.
    #[error("internal planner error, please report it: the planned schedule is invalid: {0}")]
    Invalid(ValidationErrors),
    /// The costs to place the messages for do not fit the family's stages or are invalid.
    #[error("costs to plan for: {0}")]
    Costs(String),
    /// The request has more (stage, micro-batch) pairs than [`MAX_STAGE_PASSES`].
    #[error("{0}")]
    TooLarge(String),
}

/// Plans one step, placing the messages of the lowered families for the default costs
/// ([`Costs::default`]), and validates it. Pure: no I/O. `.schedule()` of the result is the
/// document; `.into_inner()` gives it back.
pub fn plan(request: &PlanRequest) -> Result<ValidSchedule, PlanError> {
    plan_for(request, &Costs::default())
}

/// Plans one step, placing the messages of the lowered families (`1f1b`, `gpipe`, `zb1p`,
/// `zbv`, `interleaved-1f1b`) for `costs` ([`lower::lower_for`]): the compute order does not
/// depend on the costs, only where sends, receives and commits go. `dualpipe` and `dualpipev`
/// carry the reference's messages whatever the costs. Pure: no I/O.
///
/// ```
/// use dualpipe_planner::{plan_for, Family, PlanRequest};
/// use dualpipe_schedule::Costs;
/// let mut costs = Costs::default();
/// costs.apply_assignments("f=1,b=1,w=0.5").unwrap();
/// let valid = plan_for(&PlanRequest::new(Family::Zbv, 4, 8), &costs).unwrap();
/// assert_eq!(valid.schedule().num_stages, 8);
/// ```
///
/// Costs with per-stage overrides must name stages of the planned family; costs that do not
/// fit are an error ([`PlanError::Costs`]). The result is validated: a schedule that fails is a
/// planner bug, [`PlanError::Invalid`].
pub fn plan_for(request: &PlanRequest, costs: &Costs) -> Result<ValidSchedule, PlanError> {
    let schedule = plan_unchecked(request, costs)?;
    ValidSchedule::new(schedule).map_err(PlanError::Invalid)
}

/// [`plan_for`] without the final validation: the bare document.
fn plan_unchecked(request: &PlanRequest, costs: &Costs) -> Result<Schedule, PlanError> {
    check(request)?;
    costs
        .check()
        .and_then(|()| costs.check_stages(request.num_stages()))
        .map_err(|e| PlanError::Costs(e.to_string()))?;
    let PlanRequest {
        family,
        ranks: n,
        microbatches: c,
        forward_only,
        ..
    } = *request;
    let header = Header {
        schedule: family.name().to_string(),
        num_ranks: n,
        num_stages: request.num_stages(),
        num_microbatches: c,
        forward_only,
        pipelines: pipelines(family, n, c, request.chunks()),
    };
    let schedule = match family {
        Family::DualPipe | Family::DualPipeV => {
            let variant = if family == Family::DualPipe {
                dualpipe::Variant::DualPipe
            } else {
                dualpipe::Variant::DualPipeV
            };
            header.with_ranks(
                (0..n)
                    .map(|r| dualpipe::rank_program(variant, n, c, r, forward_only))
                    .collect(),
            )
        }
        _ => {
            let order = classic::compute_order(header, request)
                .map_err(|e| PlanError::Internal(e.to_string()))?;
            lower::lower_for(order, costs).map_err(|e| PlanError::Internal(e.to_string()))?
        }
    };
    Ok(schedule)
}

/// The most (stage, micro-batch) pairs a plan may have: 2^20. Each pair is a forward and a
/// backward with their messages, about eight instructions; planning the largest allowed
/// schedule takes seconds and about 1 GB, and anything much larger would exhaust memory.
pub const MAX_STAGE_PASSES: u64 = 1 << 20;

/// Checks `request` against its family's constraint and the size limit
/// ([`MAX_STAGE_PASSES`]).
pub fn check(request: &PlanRequest) -> Result<(), PlanError> {
    let PlanRequest {
        family,
        ranks: n,
        microbatches: c,
        chunks_per_rank,
        ..
    } = *request;
    if chunks_per_rank.is_some() && family != Family::Interleaved1F1B {
        return Err(PlanError::ChunksNotAccepted { family });
    }
    let v = request.chunks();
    let fits = match family {
        Family::DualPipe => n >= 2 && n % 2 == 0 && c % 2 == 0 && c >= 2 * n,
        Family::DualPipeV => n >= 1 && c >= 2 * n,
        Family::OneFOneB | Family::GPipe | Family::Zb1p | Family::Zbv => n >= 1 && c >= 1,
        Family::Interleaved1F1B => n >= 1 && v >= 1 && c >= 1 && c % (c / n).max(1) == 0,
    };
    if !fits {
        return Err(PlanError::Constraint {
            family,
            ranks: n,
            microbatches: c,
            chunks: chunks_per_rank,
        });
    }
    let passes = u64::from(stages(family, n, v)) * u64::from(c);
    if passes > MAX_STAGE_PASSES {
        return Err(PlanError::TooLarge(format!(
            "{family} on {n} ranks with {c} micro-batches runs {passes} (stage, micro-batch) pairs; \
             the planner takes at most {MAX_STAGE_PASSES} (about 8 million instructions and 1 GB of memory)"
        )));
    }
    Ok(())
}

/// Number of stages of `family` on `n` ranks with `v` chunks per rank.
const fn stages(family: Family, n: u32, v: u32) -> u32 {
    match family {
        Family::DualPipeV | Family::Zbv => 2 * n,
        Family::Interleaved1F1B => n.saturating_mul(v),
        _ => n,
    }
}

/// The routes of `family` and which micro-batches take them.
fn pipelines(family: Family, n: u32, c: u32, v: u32) -> Vec<Pipeline> {
    let down: Vec<u32> = (0..n).collect();
    let up: Vec<u32> = (0..n).rev().collect();
    match family {
        Family::DualPipe => vec![
            Pipeline {
                route: down,
                microbatches: (0..c / 2).collect(),
            },
            Pipeline {
                route: up,
                microbatches: (c / 2..c).collect(),
            },
        ],
        Family::DualPipeV | Family::Zbv => vec![Pipeline {
            route: down.into_iter().chain(up).collect(),
            microbatches: (0..c).collect(),
        }],
        Family::Interleaved1F1B => vec![Pipeline {
            route: (0..v).flat_map(|_| 0..n).collect(),
            microbatches: (0..c).collect(),
        }],
        Family::OneFOneB | Family::GPipe | Family::Zb1p => vec![Pipeline {
            route: down,
            microbatches: (0..c).collect(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_table_is_in_the_order_of_all() {
        for (info, family) in FAMILIES.iter().zip(Family::ALL) {
            assert_eq!(info.family, family);
            assert_eq!(family.info().name, family.name());
        }
    }

    #[test]
    fn help_and_planner_agree_on_zbv() {
        // The planner accepts zbv with fewer micro-batches than 2N, and the help says so.
        plan(&PlanRequest::new(Family::Zbv, 4, 3)).unwrap();
        let help = families_help();
        let line = help.lines().find(|l| l.contains("zbv")).unwrap();
        assert!(line.contains("C >= 1"), "{line}");
    }

    #[test]
    fn interleaved_takes_the_default_chunks_per_rank() {
        let valid = plan(&PlanRequest::new(Family::Interleaved1F1B, 4, 8)).unwrap();
        assert_eq!(valid.schedule().num_stages, 4 * DEFAULT_CHUNKS_PER_RANK);
        let request = PlanRequest::new(Family::Interleaved1F1B, 4, 8).chunks_per_rank(3);
        assert_eq!(plan(&request).unwrap().schedule().num_stages, 12);
    }

    #[test]
    fn sizes_that_would_not_fit_are_refused_up_front() {
        for (family, n, c) in [
            (Family::OneFOneB, 1000, 100_000),
            (Family::OneFOneB, 256, 20_000),
            (Family::DualPipeV, 100_000, 200_000),
        ] {
            let error = check(&PlanRequest::new(family, n, c)).unwrap_err();
            assert!(
                matches!(&error, PlanError::TooLarge(m) if m.contains("at most 1048576")),
                "{error}"
            );
        }
        // The benchmark sizes still plan.
        for (family, n, c) in [(Family::DualPipeV, 64, 512), (Family::DualPipe, 64, 1024)] {
            check(&PlanRequest::new(family, n, c)).unwrap();
        }
        check(&PlanRequest::new(Family::OneFOneB, 64, 16_384)).unwrap();
    }
}
