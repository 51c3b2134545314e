//! Test support shared by the workspace's cross-crate tests and by `cargo xtask mutations`:
//! an independent brute-force interpreter of schedules, a mutation engine, and the mutation
//! campaign that ties them to the validator.

pub mod brute;
pub mod mutate;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{Schedule, validate};

/// The folder holding the reference goldens and other fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Small valid schedules of every family, training and inference: the seeds of the mutation
/// campaign.
pub fn corpus() -> Vec<Schedule> {
    let mut requests = Vec::new();
    for forward_only in [false, true] {
        let mut add = |request: PlanRequest| {
            let request = if forward_only {
                request.forward_only()
            } else {
                request
            };
            requests.push(request);
        };
        add(PlanRequest::new(Family::DualPipe, 2, 4));
        add(PlanRequest::new(Family::DualPipe, 4, 8));
        add(PlanRequest::new(Family::DualPipe, 4, 10));
        add(PlanRequest::new(Family::DualPipeV, 1, 3));
        add(PlanRequest::new(Family::DualPipeV, 2, 5));
        add(PlanRequest::new(Family::DualPipeV, 3, 6));
        add(PlanRequest::new(Family::OneFOneB, 3, 5));
        add(PlanRequest::new(Family::GPipe, 3, 3));
        add(PlanRequest::new(Family::Zb1p, 3, 5));
        add(PlanRequest::new(Family::Zbv, 2, 4));
        add(PlanRequest::new(Family::Interleaved1F1B, 2, 4).chunks_per_rank(2));
    }
    requests
        .iter()
        .map(|r| {
            plan(r)
                .unwrap_or_else(|e| panic!("{r:?}: {e}"))
                .into_inner()
        })
        .collect()
}

/// The checked-in canonical schedules: file name under `schedules/` and the request that
/// produces it.
pub fn canonical() -> Vec<(&'static str, PlanRequest)> {
    vec![
        (
            "dualpipe-8x20.json",
            PlanRequest::new(Family::DualPipe, 8, 20),
        ),
        (
            "dualpipev-4x10.json",
            PlanRequest::new(Family::DualPipeV, 4, 10),
        ),
        ("1f1b-4x8.json", PlanRequest::new(Family::OneFOneB, 4, 8)),
        ("gpipe-4x8.json", PlanRequest::new(Family::GPipe, 4, 8)),
        ("zb1p-4x8.json", PlanRequest::new(Family::Zb1p, 4, 8)),
        ("zbv-4x8.json", PlanRequest::new(Family::Zbv, 4, 8)),
        (
            "interleaved-1f1b-4x8-v2.json",
            PlanRequest::new(Family::Interleaved1F1B, 4, 8).chunks_per_rank(2),
        ),
    ]
}

/// An extra check for [`campaign`]: the schedule runs to the end in the simulator under both
/// execution models, with free and with costly messages, and the async step is never longer
/// than the blocking one.
pub fn simulates(schedule: &Schedule) -> Result<(), String> {
    use dualpipe_schedule::{Costs, ExecutionModel, ValidSchedule, simulate};
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

/// The outcome of a mutation campaign.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Mutants the validator rejected.
    pub rejected: u64,
    /// Of those, mutants the brute-force interpreter nevertheless ran to the end under both
    /// models (the validator is stricter than necessary there; not a failure).
    pub rejected_but_runnable: u64,
    /// The first few of those, with the reason the validator gave.
    pub stricter_examples: Vec<String>,
    /// Mutants the validator accepted (each proven runnable, or listed in `failures`).
    pub accepted: u64,
    /// Mutants on which the validator panicked.
    pub panicked: u64,
    /// Accepted mutants the brute-force interpreter could not run, and panics: each with its
    /// seed and what happened.
    pub failures: Vec<String>,
}

/// Runs `count` mutations, starting from seed `seed`. Each mutant is one to three random
/// mutations of a corpus schedule. A mutant the validator accepts must run to the end under
/// both execution models in the brute-force interpreter, and also pass `extra` (a further
/// check, such as simulating it); anything else is a failure.
pub fn campaign(count: u64, seed: u64, extra: &dyn Fn(&Schedule) -> Result<(), String>) -> Tally {
    let corpus = corpus();
    let mut tally = Tally::default();
    let mut made = 0u64;
    let mut attempt = seed;
    while made < count {
        attempt += 1;
        let mut rng = mutate::Rng::new(attempt);
        let mut mutant = corpus[rng.below(corpus.len())].clone();
        let rounds = 1 + rng.below(3);
        let mut what = Vec::new();
        for _ in 0..rounds {
            if let Some(description) = mutate::mutate(&mut mutant, &mut rng) {
                what.push(description);
            }
        }
        if what.is_empty() {
            continue;
        }
        made += 1;
        let verdict = catch_unwind(AssertUnwindSafe(|| validate(&mutant)));
        match verdict {
            Err(_) => {
                tally.panicked += 1;
                tally.failures.push(format!(
                    "seed {attempt}: validator panicked on {}",
                    what.join("; ")
                ));
            }
            Ok(Err(errors)) => {
                tally.rejected += 1;
                if errors.violations.is_empty() || errors.to_string().is_empty() {
                    tally
                        .failures
                        .push(format!("seed {attempt}: rejected without a message"));
                }
                let runnable = brute::run(&mutant, brute::Model::Blocking).is_ok()
                    && brute::run(&mutant, brute::Model::Async).is_ok();
                if runnable {
                    tally.rejected_but_runnable += 1;
                    if tally.stricter_examples.len() < 5 {
                        tally.stricter_examples.push(format!(
                            "seed {attempt}: {}; rejected with: {}",
                            what.join("; "),
                            errors.violations[0]
                        ));
                    }
                }
            }
            Ok(Ok(_)) => {
                tally.accepted += 1;
                for model in [brute::Model::Blocking, brute::Model::Async] {
                    if let Err(why) = brute::run(&mutant, model) {
                        tally.failures.push(format!(
                            "seed {attempt}: accepted but does not run under {model:?}: {why}; mutations: {}",
                            what.join("; ")
                        ));
                    }
                }
                if let Err(why) = extra(&mutant) {
                    tally.failures.push(format!(
                        "seed {attempt}: accepted but fails the extra check: {why}; mutations: {}",
                        what.join("; ")
                    ));
                }
            }
        }
    }
    tally
}
