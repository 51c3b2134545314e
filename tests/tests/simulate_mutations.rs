//! Every mutant the validator accepts also runs to the end in the simulator, under both
//! execution models, with the async step never longer than the blocking one.

use dualpipe_tests::{campaign, simulates};

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
