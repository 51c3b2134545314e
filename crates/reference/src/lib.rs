//! The reference model of the dualpipe executor and the checks every backend passes.
//!
//! - [`model`]: the reference model (Linear-GELU-Linear stages, mean squared error, a split
//!   backward, seeded parameters) as an executor [`Stage`](dualpipe_executor::Stage), and
//!   [`Sequential`](model::Sequential), the same model in one process, micro-batch after
//!   micro-batch: the numerical reference for any schedule.
//! - [`Backend`]: what every backend running the model offers (one step over a [`Batch`](model::Batch),
//!   gradients, leftovers, plain gradient descent); [`CpuBackend`] here, the CUDA backend and
//!   its stand-in in `dualpipe-cuda`.
//! - [`conformance`]: [`compare`](conformance::compare) holds a pipelined step to the
//!   single-process one (losses and forward-only outputs bitwise equal, gradients within
//!   `cal_diff` < 1e-13); [`ReferenceBackend`](conformance::ReferenceBackend) runs both on one
//!   backend.
//! - [`suite`]: the test bodies every backend runs ([`backend_tests!`], [`backend_checks!`]).
//!
//! ```
//! use dualpipe_executor::Options;
//! use dualpipe_planner::{Family, PlanRequest, plan};
//! use dualpipe_reference::conformance::compare;
//! use dualpipe_reference::model::{Batch, ModelSpec, Sequential};
//! use dualpipe_reference::{Backend, CpuBackend};
//! use dualpipe_schedule::ValidSchedule;
//!
//! // DualPipe on 4 ranks with 8 micro-batches: 4 stages, each held by two ranks.
//! let schedule = plan(&PlanRequest::new(Family::DualPipe, 4, 8)).unwrap();
//! let spec = ModelSpec { hidden: 16, rows: 4, stages: 4, seed: 233 };
//! let options = Options { message_shape: Some(spec.message_shape()), ..Options::default() };
//! let mut backend = CpuBackend::new(schedule, options, &spec).unwrap();
//!
//! let batch = Batch::synthetic(&spec, 8, 0);
//! let step = backend.step(&batch).unwrap();
//! let ours = backend.reference_run(step).unwrap();
//!
//! // The same model in one process: the same losses bit for bit, gradients within the bound.
//! let theirs = Sequential::new(&spec).reference_run(&batch, true).unwrap();
//! let agreement = compare(&ours, &theirs).unwrap();
//! assert_eq!(agreement.losses, 8);
//! ```

mod backend;
pub mod conformance;
pub mod model;
pub mod suite;

pub use backend::{Backend, CpuBackend, HostStep};
