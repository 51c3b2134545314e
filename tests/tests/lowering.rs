//! The lowering pass loses no time: for every lowered family, size and cost setting, the
//! blocking step of the schedule lowered for those costs is within 1% of the async one, at zero
//! message cost.
//!
//! One setting is exempt: interleaved 1F1B on two ranks with the first and last stages three
//! times heavier. Its two ranks are both busy without a break in the steady state of the
//! as-soon-as-possible run, and some messages between them are in flight while neither rank is
//! between computes; no placement lets the blocking model exchange them without a wait (see
//! `crates/planner/src/lower.rs`). It is held to 8%.

use dualpipe_planner::{Family, PlanRequest, check, plan_for};
use dualpipe_schedule::{Costs, ExecutionModel, StageOverride, simulate};

const LOWERED: [Family; 5] = [
    Family::OneFOneB,
    Family::GPipe,
    Family::Zb1p,
    Family::Zbv,
    Family::Interleaved1F1B,
];

const UNEVEN: &str = "first and last stage 3x";

/// The cost settings, by name, for a schedule of `stages` stages.
fn settings(stages: u32) -> Vec<(String, Costs)> {
    let uniform = |list: &str| {
        let mut costs = Costs::default();
        costs.apply_assignments(list).unwrap();
        costs
    };
    let mut uneven = Costs::default();
    for stage in [0, stages - 1] {
        uneven.stages.insert(
            stage,
            StageOverride {
                f: Some(3.0),
                b: Some(6.0),
                w: Some(3.0),
                ..StageOverride::default()
            },
        );
    }
    vec![
        ("default".into(), Costs::default()),
        ("f=1,b=2,w=1".into(), uniform("f=1,b=2,w=1")),
        ("f=1,b=1,w=0.5".into(), uniform("f=1,b=1,w=0.5")),
        ("f=0.5,b=1,w=0.5".into(), uniform("f=0.5,b=1,w=0.5")),
        (UNEVEN.into(), uneven),
    ]
}

fn requests() -> Vec<PlanRequest> {
    let mut out = Vec::new();
    for family in LOWERED {
        for n in [1, 2, 3, 4, 8] {
            for c in [1, 2, 3, n, 2 * n, 2 * n + 1, 4 * n, 32] {
                let mut request = PlanRequest::new(family, n, c);
                if family == Family::Interleaved1F1B {
                    for v in [2, 3] {
                        request = request.chunks_per_rank(v);
                        if check(&request).is_ok() && !out.contains(&request) {
                            out.push(request);
                        }
                    }
                    continue;
                }
                if check(&request).is_ok() && !out.contains(&request) {
                    out.push(request);
                }
            }
        }
    }
    out
}

#[test]
fn blocking_loses_no_time_against_async() {
    let mut failures = Vec::new();
    let mut worst = 1.0f64;
    for request in requests() {
        for forward_only in [false, true] {
            let request = if forward_only {
                request.forward_only()
            } else {
                request
            };
            let stages = request.num_stages();
            for (name, costs) in settings(stages) {
                let valid = plan_for(&request, &costs).unwrap_or_else(|e| panic!("{e}"));
                let blocking = simulate(&valid, &costs, ExecutionModel::Blocking)
                    .unwrap()
                    .makespan;
                let overlapped = simulate(&valid, &costs, ExecutionModel::Async)
                    .unwrap()
                    .makespan;
                let exempt = request.family == Family::Interleaved1F1B
                    && request.ranks == 2
                    && name == UNEVEN;
                let allowed = if exempt { 1.08 } else { 1.01 };
                if !exempt {
                    worst = worst.max(blocking / overlapped);
                }
                if blocking > allowed * overlapped {
                    failures.push(format!(
                        "{} N={} C={} V={:?}{} with {name}: blocking {blocking}, async {overlapped}",
                        request.family,
                        request.ranks,
                        request.microbatches,
                        request.chunks_per_rank,
                        if forward_only { " forward only" } else { "" },
                    ));
                }
            }
        }
    }
    eprintln!("worst blocking / async outside the exempt setting: {worst}");
    assert!(
        failures.is_empty(),
        "{} cases lose time:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn dualpipe_families_keep_the_reference_messages_whatever_the_costs() {
    let mut costs = Costs::default();
    costs.apply_assignments("f=1,b=1,w=0.5").unwrap();
    for request in [
        PlanRequest::new(Family::DualPipe, 4, 8),
        PlanRequest::new(Family::DualPipeV, 4, 10),
    ] {
        assert_eq!(
            plan_for(&request, &costs).unwrap(),
            plan_for(&request, &Costs::default()).unwrap()
        );
    }
}

#[test]
fn the_compute_order_does_not_depend_on_the_costs() {
    let mut costs = Costs::default();
    costs.apply_assignments("f=1,b=1,w=0.5").unwrap();
    for request in requests().into_iter().step_by(4) {
        let computes = |costs: &Costs| -> Vec<Vec<_>> {
            plan_for(&request, costs)
                .unwrap()
                .into_inner()
                .ranks
                .into_iter()
                .map(|list| list.into_iter().filter(|i| i.is_compute()).collect())
                .collect()
        };
        assert_eq!(computes(&costs), computes(&Costs::default()), "{request:?}");
    }
}
