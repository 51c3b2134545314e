//! The runner of the checks only a GPU can answer (test targets with `harness = false`).
//!
//! Without a GPU (no driver, no device) it prints `skipped: no GPU (why)` and the number of
//! checks not run, and counts none of them as passed. A GPU the backend cannot use (a library
//! missing, a driver that fails) is a failure: it prints why and exits with 1. With one, it runs every check (or those whose name contains
//! the first non-flag argument, as `cargo test NAME` passes it), prints one line per check, and
//! exits with 1 if any failed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;

/// One named check.
pub struct Check {
    pub name: &'static str,
    pub run: Box<dyn Fn()>,
}

/// Whether the checks can run: `Ok`, or the error of `probe` or of opening the backend.
pub fn run(checks: Vec<Check>, gpu: Result<(), dualpipe_cuda::CudaError>) -> ExitCode {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let selected: Vec<Check> = checks
        .into_iter()
        .filter(|c| filter.as_deref().is_none_or(|f| c.name.contains(f)))
        .collect();
    match gpu {
        Ok(()) => {}
        Err(why) if why.is_no_gpu() => {
            println!(
                "skipped: no GPU ({why}); {} GPU checks not run, none counted as passed",
                selected.len()
            );
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            println!(
                "error: the GPU checks cannot run: {why}; {} GPU checks failed",
                selected.len()
            );
            return ExitCode::FAILURE;
        }
    }
    let mut failed = Vec::new();
    for check in &selected {
        let ok = catch_unwind(AssertUnwindSafe(|| (check.run)())).is_ok();
        println!(
            "check {} ... {}",
            check.name,
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            failed.push(check.name);
        }
    }
    println!(
        "GPU checks: {} passed, {} failed",
        selected.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
