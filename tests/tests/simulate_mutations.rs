//! Every mutant the validator accepts also runs to the end in the simulator, under both
//! execution models, with the async step never longer than the blocking one.

use dualpipe_schedule::{Costs, ExecutionModel, Schedule, ValidSchedule, simulate};
use dualpipe_tests::campaign;

/// Simulates an accepted mutant under both models, with free and with costly messages.
fn simulates(schedule: &Schedule) -> Result<(), String> {
    let valid = ValidSchedule::new(schedule.clone()).map_err(|e| e.to_string())?;
    for comm in ["comm=0", "comm=0.5,fb=2.5"] {
        let mut costs = Costs::default();
        costs.apply_assignments(comm).map_err(|e| e.to_string())?;
        let run = |model| simulate(&valid, &costs, model).map_err(|e| format!("{model}: {e}"));
        let blocking = run(ExecutionModel::Blocking)?;
        let overlapped = run(ExecutionModel::Async)?;
        if overlapped.makespan > blocking.makespan {
            return Err(format!(
                "with {comm}: async step {} is longer than blocking {}",
                overlapped.makespan, blocking.makespan
            ));
        }
    }
    Ok(())
}

#[test]
fn accepted_mutants_run_in_the_simulator() {
    let count = std::env::var("DUALPIPE_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    // A different seed from the validator's campaign, so that other mutants are drawn.
    let tally = campaign(count, 1_000_000, &simulates);
    assert!(
        tally.failures.is_empty(),
        "{} failures, first: {}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    assert!(tally.accepted > 0, "no mutant was accepted: {tally:?}");
}
