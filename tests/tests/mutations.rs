//! Mutation tests: random damage to valid schedules is either rejected with an error, or
//! accepted and proven runnable by the independent brute-force interpreter.

use dualpipe_tests::{brute, campaign, corpus};

#[test]
fn every_corpus_schedule_runs_in_the_brute_force_interpreter() {
    for schedule in corpus() {
        for model in [brute::Model::Blocking, brute::Model::Async] {
            if let Err(why) = brute::run(&schedule, model) {
                panic!(
                    "{} ({} ranks, {} mbs): {why}",
                    schedule.schedule, schedule.num_ranks, schedule.num_microbatches
                );
            }
        }
    }
}

#[test]
fn mutants_are_rejected_or_runnable() {
    // Debug builds are slow; `cargo xtask mutations` runs 100,000 and more in release.
    let count = std::env::var("DUALPIPE_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let tally = campaign(count, 0, &|_| Ok(()));
    assert!(
        tally.failures.is_empty(),
        "{} failures, first: {}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    assert_eq!(tally.panicked, 0);
    assert!(
        tally.rejected > count / 2,
        "most mutants must be rejected: {tally:?}"
    );
    assert!(
        tally.accepted > 0,
        "some mutants are harmless and must be accepted: {tally:?}"
    );
}
