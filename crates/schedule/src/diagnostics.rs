//! The ground floor of the crate: what a broken rule looks like ([`Rule`], [`Location`],
//! [`Violation`]), the two execution models every analysis names, and the wording helpers
//! shared by the header checks ([`crate::Topology`]) and the validator.
//!
//! It depends on nothing but the format's types, so every other module can use it.

use std::fmt;

use crate::format::Instruction;

/// Which rule a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The header or an instruction's fields are inconsistent (counts, routes, ids in range).
    Structure,
    /// Rule 1: every forward, backward and weight gradient exactly once, where the route says.
    Completeness,
    /// Rule 2: every compute after the data it needs.
    DataDependency,
    /// Rule 3: one send and one matching receive per cross-rank edge, in the same order on
    /// both sides of every channel.
    Communication,
    /// Rule 4: the schedule runs to the end under both execution models.
    Progress,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Structure => "structure",
            Rule::Completeness => "rule 1 (completeness)",
            Rule::DataDependency => "rule 2 (data dependency)",
            Rule::Communication => "rule 3 (communication)",
            Rule::Progress => "rule 4 (progress)",
        })
    }
}

/// Where a violation is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// The document header.
    Document,
    /// A rank as a whole (for example something missing from its list).
    Rank(u32),
    /// One instruction.
    Instruction {
        /// The rank.
        rank: u32,
        /// Index in the rank's list.
        index: usize,
        /// The instruction itself.
        instruction: Instruction,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Document => f.write_str("document"),
            Location::Rank(rank) => write!(f, "rank {rank}"),
            Location::Instruction {
                rank,
                index,
                instruction,
            } => write!(f, "rank {rank}, instruction {index} `{instruction}`"),
        }
    }
}

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The rule.
    pub rule: Rule,
    /// Where.
    pub location: Location,
    /// What is wrong, in words.
    pub message: String,
}

impl Violation {
    /// A violation of `rule` at `location`.
    pub fn new(rule: Rule, location: Location, message: impl Into<String>) -> Self {
        Violation {
            rule,
            location,
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.location, self.rule, self.message)
    }
}

/// How communication and computation interleave when a schedule runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExecutionModel {
    /// A commit returns when every op of its batch has met its partner (the reference
    /// implementation's `batch_isend_irecv` followed by `wait`).
    Blocking,
    /// A commit launches its batch on a communication stream; compute waits only for the data
    /// it needs.
    Async,
}

impl std::fmt::Display for ExecutionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecutionModel::Blocking => "blocking",
            ExecutionModel::Async => "async",
        })
    }
}

/// `1 stage`, `2 stages`, `1 micro-batch`, `3 micro-batches`.
pub(crate) fn plural(n: u32, noun: &str) -> String {
    match (n, noun.ends_with('h')) {
        (1, _) => format!("1 {noun}"),
        (_, true) => format!("{n} {noun}es"),
        _ => format!("{n} {noun}s"),
    }
}

/// Shortens a long list of items for an error message.
pub(crate) fn abbreviate(items: &[String]) -> String {
    const SHOWN: usize = 8;
    if items.len() <= SHOWN {
        items.join(", ")
    } else {
        format!(
            "{} and {} more",
            items[..SHOWN].join(", "),
            items.len() - SHOWN
        )
    }
}
