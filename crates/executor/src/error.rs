//! Failures of a step: which rank, which instruction, what happened.

use std::fmt;

use dualpipe_schedule::{Instruction, Location};

use crate::stage::StageError;
use crate::transport::{CommError, CommErrorKind};

/// Why a rank stopped.
#[derive(Debug)]
pub enum Cause {
    /// A stage method returned an error.
    Stage(StageError),
    /// A stage method panicked; the message of the panic.
    Panic(String),
    /// A send, receive or commit failed. `op` is the send or receive concerned (its index and
    /// text), when the failure belongs to one.
    Comm {
        /// The send or receive whose message did not get through.
        op: Option<(usize, Instruction)>,
        /// What happened.
        error: CommError,
    },
    /// A buffer crossing a stage boundary does not have the shape messages have.
    Shape {
        /// Which buffer, in words (`the output`, `the input gradient`, `the received buffer`).
        what: &'static str,
        /// The schedule's message shape.
        expected: Vec<usize>,
        /// The buffer's shape.
        found: Vec<usize>,
    },
    /// A stage broke the contract of [`Stage`](crate::Stage), or the step lacks something a
    /// rank needs (an input, a target, a stage); says what.
    Contract(String),
}

impl Cause {
    /// Whether this rank stopped only because another rank ended the step.
    pub fn is_abort(&self) -> bool {
        matches!(
            self,
            Cause::Comm {
                error: CommError {
                    kind: CommErrorKind::Aborted { .. },
                    ..
                },
                ..
            }
        )
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Stage(error) => write!(f, "the stage failed: {error}"),
            Cause::Panic(message) => write!(f, "the stage panicked: {message}"),
            Cause::Comm {
                op: Some((index, op)),
                error,
            } => write!(f, "`{op}` (instruction {index}): {error}"),
            Cause::Comm { op: None, error } => error.fmt(f),
            Cause::Shape {
                what,
                expected,
                found,
            } => write!(
                f,
                "{what} has shape {found:?}, but messages between stages have shape {expected:?}"
            ),
            Cause::Contract(message) => f.write_str(message),
        }
    }
}

/// One rank's failure: where it stopped and why.
#[derive(Debug)]
pub struct RankFailure {
    /// Where: the rank and, when it stopped inside its list, the instruction.
    pub location: Location,
    /// Why.
    pub cause: Cause,
}

impl RankFailure {
    /// A failure at instruction `index` (`instruction`) of `rank`.
    pub fn at(rank: u32, index: usize, instruction: Instruction, cause: Cause) -> Self {
        RankFailure {
            location: Location::Instruction {
                rank,
                index,
                instruction,
            },
            cause,
        }
    }

    /// A failure of `rank` outside its instruction list (before or after it).
    pub fn on_rank(rank: u32, cause: Cause) -> Self {
        RankFailure {
            location: Location::Rank(rank),
            cause,
        }
    }

    /// The rank that failed.
    pub fn rank(&self) -> u32 {
        match self.location {
            Location::Rank(rank) | Location::Instruction { rank, .. } => rank,
            Location::Document => 0,
        }
    }

    /// The index of the instruction where it stopped, if inside its list.
    pub fn index(&self) -> Option<usize> {
        match self.location {
            Location::Instruction { index, .. } => Some(index),
            _ => None,
        }
    }
}

impl fmt::Display for RankFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.cause)
    }
}

impl std::error::Error for RankFailure {}

/// A step that did not complete. The first failure is the cause; the others are the ranks it
/// stopped, each where it stood.
#[derive(Debug)]
pub struct StepError {
    /// Every rank that stopped, the cause first.
    pub failures: Vec<RankFailure>,
    /// Ranks that had run their whole list when the step ended.
    pub finished: Vec<u32>,
}

impl StepError {
    /// Gathers the outcome of every rank of a step (in rank order): every rank's result when
    /// all finished, else the step's error.
    pub fn gather<R>(results: Vec<Result<R, RankFailure>>) -> Result<Vec<R>, StepError> {
        let mut runs = Vec::with_capacity(results.len());
        let mut failures = Vec::new();
        let mut finished = Vec::new();
        for (rank, result) in results.into_iter().enumerate() {
            match result {
                Ok(run) => {
                    finished.push(rank as u32);
                    runs.push(run);
                }
                Err(failure) => failures.push(failure),
            }
        }
        if failures.is_empty() {
            Ok(runs)
        } else {
            Err(StepError::new(failures, finished))
        }
    }

    /// Builds the error from every rank's failure and the ranks that finished. The cause
    /// goes first: the rank that ended the step, as the aborted ranks name it, else the
    /// first failure that is not the echo of an abort.
    pub fn new(mut failures: Vec<RankFailure>, finished: Vec<u32>) -> Self {
        let first = failures.iter().find_map(|f| match &f.cause {
            Cause::Comm {
                error:
                    CommError {
                        kind: CommErrorKind::Aborted { rank, .. },
                        ..
                    },
                ..
            } => Some(*rank),
            _ => None,
        });
        let cause = first
            .and_then(|rank| {
                failures
                    .iter()
                    .position(|f| f.rank() == rank && !f.cause.is_abort())
            })
            .or_else(|| failures.iter().position(|f| !f.cause.is_abort()))
            .unwrap_or(0);
        if !failures.is_empty() {
            let root = failures.remove(cause);
            failures.insert(0, root);
        }
        StepError { failures, finished }
    }

    /// The failure that ended the step.
    pub fn cause(&self) -> &RankFailure {
        &self.failures[0]
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((cause, rest)) = self.failures.split_first() else {
            return f.write_str("the step failed");
        };
        write!(f, "{cause}")?;
        for failure in rest {
            if failure.cause.is_abort() {
                write!(f, "\n  then {}: stopped there", failure.location)?;
            } else {
                write!(f, "\n  also {failure}")?;
            }
        }
        if !self.finished.is_empty() {
            let ranks: Vec<String> = self.finished.iter().map(u32::to_string).collect();
            write!(
                f,
                "\n  rank{} {} had finished",
                if ranks.len() == 1 { "" } else { "s" },
                ranks.join(", ")
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for StepError {}
