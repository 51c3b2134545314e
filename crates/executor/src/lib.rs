//! Runs validated pipeline schedules.
//!
//! The executor is an interpreter of schedule format v1: for one rank, it replays that rank's
//! instruction list against
//! - the model, through the [`Stage`] trait the user implements (forward, backward with an
//!   optional deferred weight gradient, the weight gradient, an optional overlapped
//!   forward-and-backward);
//! - a backend, through the [`Transport`] trait (queued sends and receives posted as one
//!   batch at each `commit`, matched in issue order per pair of ranks, under the blocking or
//!   the asynchronous execution model) and the [`Clock`] trait (timings).
//!
//! The interpreter knows nothing of CPUs or GPUs: backends implement its traits and run their
//! steps through one driver ([`drive`]: a thread per rank, panics turned into aborts, the
//! copies of a stage summed through [`Stage::sum_gradients`], results brought to the host by
//! the backend's [`Host`]). This crate has the CPU backend ([`CpuPipeline`]: the in-process
//! transport [`InProcess`]); the reference model, the single-process run every schedule is
//! checked against and the `Backend` trait over the backends that run it live in
//! `dualpipe-reference`.
//!
//! Only a [`ValidSchedule`](dualpipe_schedule::ValidSchedule) runs, so every schedule the
//! executor sees is complete, correctly ordered and free of deadlock under both models.
//! When anything fails (a stage error, a message that never arrives, a buffer of the wrong
//! shape) the failing rank ends the step on every rank, and the [`StepError`] names the rank,
//! the instruction and the cause.
//!
//! ```
//! use dualpipe_reference::model::{Batch, ModelSpec, ReferenceStage, Sequential};
//! use dualpipe_executor::{CpuPipeline, Options};
//! use dualpipe_planner::{Family, PlanRequest, plan};
//! use dualpipe_schedule::ValidSchedule;
//!
//! // DualPipe on 4 ranks with 8 micro-batches: 4 stages, each held by two ranks.
//! let schedule = plan(&PlanRequest::new(Family::DualPipe, 4, 8)).unwrap();
//! let spec = ModelSpec { hidden: 16, rows: 4, stages: 4, seed: 233 };
//! let options = Options { message_shape: Some(spec.message_shape()), ..Options::default() };
//! let mut pipeline =
//!     CpuPipeline::new(schedule, options, |_rank, stage| Ok(ReferenceStage::new(&spec, stage))).unwrap();
//!
//! let batch = Batch::synthetic(&spec, 8, 0);
//! let step = pipeline.step(batch.inputs.clone(), batch.targets.clone()).unwrap();
//!
//! // The same model in one process, micro-batch after micro-batch: the same losses, bit for bit.
//! let reference = Sequential::new(&spec).step(&batch, true).unwrap();
//! for (ours, theirs) in step.losses.iter().zip(&reference.losses) {
//!     assert_eq!(ours.unwrap().to_bits(), theirs.to_bits());
//! }
//! ```

mod cpu;
mod driver;
mod error;
mod interpret;
mod profile;
mod program;
mod stage;
mod transport;

pub use cpu::{CpuPipeline, HostClock, InProcess, InProcessTicket, run_on_threads};
pub use driver::{Host, Kept, RankParts, StepOutput, drive};
pub use error::{Cause, RankFailure, StepError};
pub use interpret::{Executor, Feed, Options, RankRun, Stages};
pub use profile::{Clock, MeasuredCosts, Overlap, Profile, RankSummary, Timing};
pub use stage::{Backward, Forward, Forwarded, Overlapped, Payload, Stage, StageError};
pub use transport::{CommError, CommErrorKind, Transport};
