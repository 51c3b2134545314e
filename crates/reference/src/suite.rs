//! Test bodies shared by every backend: each runs the reference model under many schedules
//! and holds the result to a single-process run on the same backend, and panics with the
//! configuration and what differs when they disagree (they are test bodies).
//! [`backend_tests!`](crate::backend_tests) makes one test per body and backend, in the manner
//! of candle's `test_device!`; [`backend_checks!`](crate::backend_checks) makes the same bodies
//! a list of named checks for runners without the test harness. The CPU variants live in
//! `crates/reference/tests/backends.rs`, the CUDA variants in `crates/cuda/tests/backends.rs`.

use std::time::Duration;

use dualpipe_executor::Options;

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{ExecutionModel, ValidSchedule};

use crate::conformance::{Agreement, ReferenceBackend, compare};
use crate::model::{Batch, ModelSpec};

/// One test per body, named after the backend: `$make` gives the backend, or `None` when it
/// cannot run here (it then says why on the terminal and the test returns).
///
/// ```text
/// dualpipe_reference::backend_tests!(
///     cpu => Some(dualpipe_reference::conformance::CpuReference);
///     every_family_matches_the_single_process_run,
/// );
/// ```
#[macro_export]
macro_rules! backend_tests {
    ($backend:ident => $make:expr; $($body:ident),* $(,)?) => {$(
        mod $body {
            #[test]
            fn $backend() {
                if let Some(mut backend) = $make {
                    $crate::suite::$body(&mut backend);
                }
            }
        }
    )*};
}

/// The same bodies as a list of named checks, for runners without the test harness (backends
/// that need hardware the machine may not have): `$make` gives the backend.
#[macro_export]
macro_rules! backend_checks {
    ($make:expr; $($body:ident),* $(,)?) => {{
        let checks: Vec<(&'static str, Box<dyn Fn()>)> = vec![$(
            (stringify!($body), Box::new(|| $crate::suite::$body(&mut $make)) as Box<dyn Fn()>),
        )*];
        checks
    }};
}

/// (family, chunks per rank, ranks, micro-batches).
const CASES: &[(Family, Option<u32>, u32, u32)] = &[
    (Family::DualPipe, None, 2, 4),
    (Family::DualPipe, None, 4, 8),
    (Family::DualPipe, None, 4, 10),
    (Family::DualPipe, None, 6, 12),
    (Family::DualPipe, None, 8, 16),
    (Family::DualPipeV, None, 1, 2),
    (Family::DualPipeV, None, 1, 5),
    (Family::DualPipeV, None, 2, 4),
    (Family::DualPipeV, None, 3, 7),
    (Family::DualPipeV, None, 4, 10),
    (Family::OneFOneB, None, 1, 1),
    (Family::OneFOneB, None, 2, 3),
    (Family::OneFOneB, None, 3, 7),
    (Family::OneFOneB, None, 4, 8),
    (Family::GPipe, None, 1, 3),
    (Family::GPipe, None, 3, 5),
    (Family::GPipe, None, 4, 4),
    (Family::Zb1p, None, 1, 2),
    (Family::Zb1p, None, 2, 5),
    (Family::Zb1p, None, 4, 8),
    (Family::Zbv, None, 1, 2),
    (Family::Zbv, None, 2, 4),
    (Family::Zbv, None, 3, 7),
    (Family::Zbv, None, 4, 8),
    (Family::Interleaved1F1B, Some(2), 2, 4),
    (Family::Interleaved1F1B, Some(2), 4, 8),
    (Family::Interleaved1F1B, Some(3), 2, 6),
    (Family::Interleaved1F1B, Some(3), 3, 6),
];

fn schedule(
    family: Family,
    chunks: Option<u32>,
    n: u32,
    c: u32,
    forward_only: bool,
) -> ValidSchedule {
    let mut request = PlanRequest::new(family, n, c);
    request.chunks_per_rank = chunks;
    request.forward_only = forward_only;
    plan(&request).unwrap_or_else(|e| panic!("{family} {n}x{c}: {e}"))
}

/// Runs `schedule` and the single-process model on `backend` with a synthetic batch (drawn
/// for `seed_step`) and compares them: losses and outputs bitwise, gradients within the
/// reference's bound. Panics with the configuration and what differs (a test body).
pub fn check(
    backend: &mut dyn ReferenceBackend,
    schedule: ValidSchedule,
    spec: &ModelSpec,
    model: ExecutionModel,
    seed_step: u64,
) -> Agreement {
    let doc = schedule.schedule();
    let label = format!(
        "{} on {}: {} ranks, {} micro-batches, {}, {model} model",
        doc.schedule,
        backend.name(),
        doc.num_ranks,
        doc.num_microbatches,
        if doc.forward_only {
            "forward only"
        } else {
            "training"
        }
    );
    let training = !doc.forward_only;
    let batch = Batch::synthetic(spec, doc.num_microbatches, seed_step);
    let options = Options {
        message_shape: Some(spec.message_shape()),
        keep_outputs: true,
        model,
        timeout: Duration::from_secs(30),
        profile: false,
    };
    let ours = backend
        .pipelined(schedule, spec, &batch, options)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let reference = backend
        .sequential(spec, &batch, training)
        .unwrap_or_else(|e| panic!("{label}: reference: {e}"));
    let agreement = compare(&ours, &reference).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(agreement.losses, batch.inputs.len(), "{label}");
    assert_eq!(agreement.outputs, batch.inputs.len(), "{label}");
    agreement
}

/// Every family at several sizes, under both execution models: losses bitwise equal to the
/// single-process run, gradients within the bound.
pub fn every_family_matches_the_single_process_run(backend: &mut dyn ReferenceBackend) {
    for &(family, chunks, n, c) in CASES {
        let probe = schedule(family, chunks, n, c, false);
        let spec = ModelSpec {
            hidden: 8,
            rows: 4,
            stages: probe.schedule().num_stages,
            seed: 233,
        };
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            let agreement = check(backend, probe.clone(), &spec, model, 1);
            assert!(agreement.max_cal_diff < 1e-13);
        }
    }
}

/// Every family planned forward only, under both execution models: outputs bitwise equal.
pub fn forward_only_outputs_match_bitwise(backend: &mut dyn ReferenceBackend) {
    for &(family, chunks, n, c) in CASES {
        let schedule = schedule(family, chunks, n, c, true);
        let spec = ModelSpec {
            hidden: 8,
            rows: 4,
            stages: schedule.schedule().num_stages,
            seed: 5,
        };
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            let agreement = check(backend, schedule.clone(), &spec, model, 2);
            assert_eq!(agreement.max_cal_diff, 0.0, "no gradients in forward-only");
        }
    }
}

/// The reference example's own shape class (long rows, wide hidden) at a size a debug build
/// runs quickly: summation-order differences in the gradients stay far below the bound.
pub fn a_larger_model_matches_too(backend: &mut dyn ReferenceBackend) {
    for (family, n, c) in [(Family::DualPipe, 4, 8), (Family::DualPipeV, 2, 6)] {
        let schedule = schedule(family, None, n, c, false);
        let spec = ModelSpec {
            hidden: 32,
            rows: 24,
            stages: schedule.schedule().num_stages,
            seed: 233,
        };
        check(backend, schedule, &spec, ExecutionModel::Async, 3);
    }
}
