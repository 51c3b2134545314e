//! The simulator on planned schedules: the DualPipe README's bubble and memory table, and the
//! async model never slower than the blocking one.

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{Costs, ExecutionModel, Simulation, ValidSchedule, rank_stats, simulate};

/// F = 1, B = 2, W = 1, FB = 3, free messages: the units of the README's table.
fn readme_costs() -> Costs {
    let mut costs = Costs::default();
    costs.apply_assignments("f=1,b=2,w=1,fb=3,comm=0").unwrap();
    costs
}

fn planned(family: Family, n: u32, c: u32) -> ValidSchedule {
    plan(&PlanRequest::new(family, n, c)).unwrap_or_else(|e| panic!("{family} ({n}, {c}): {e}"))
}

fn run(valid: &ValidSchedule, costs: &Costs, model: ExecutionModel) -> Simulation {
    simulate(valid, costs, model).unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// Idle time of every rank under the blocking model with the README's units.
fn idle(family: Family, n: u32, c: u32) -> Vec<f64> {
    let valid = planned(family, n, c);
    run(&valid, &readme_costs(), ExecutionModel::Blocking)
        .ranks
        .iter()
        .map(|r| r.idle)
        .collect()
}

/// Checks that every rank idles exactly `expected`.
fn check_idle(family: Family, n: u32, c: u32, expected: f64) {
    let idle = idle(family, n, c);
    assert!(
        idle.iter().all(|&i| i == expected),
        "{family} ({n} ranks, {c} micro-batches): idle per rank {idle:?}, README bubble {expected}"
    );
}

// (PP/2 - 1)(F&B + B - 3W) with F&B = 3, B = 2, W = 1: (PP/2 - 1) * 2.
#[test]
fn dualpipe_bubble_is_the_readme_formula() {
    for (n, c) in [(8, 20), (4, 16), (2, 4), (4, 8), (6, 12), (8, 16), (8, 32)] {
        let pp = n as f64;
        check_idle(Family::DualPipe, n, c, (pp / 2.0 - 1.0) * 2.0);
    }
}

#[test]
fn dualpipev_bubble_is_the_readme_formula() {
    for (n, c) in [
        (4, 10),
        (3, 9),
        (1, 2),
        (2, 4),
        (4, 8),
        (4, 9),
        (8, 20),
        (5, 13),
    ] {
        let pp = 2.0 * n as f64;
        check_idle(Family::DualPipeV, n, c, (pp / 2.0 - 1.0) * 2.0);
    }
}

#[test]
fn reference_table_of_the_notes() {
    for (family, n, c, expected) in [
        (Family::DualPipe, 8, 20, 6.0),
        (Family::DualPipe, 4, 16, 2.0),
        (Family::DualPipeV, 4, 10, 6.0),
        (Family::DualPipeV, 3, 9, 4.0),
    ] {
        check_idle(family, n, c, expected);
    }
}

// (PP - 1)(F + B) = 3 (PP - 1).
#[test]
fn one_f_one_b_bubble_is_the_readme_formula() {
    for (n, c) in [(4, 8), (4, 4), (8, 16), (2, 5), (1, 3)] {
        check_idle(Family::OneFOneB, n, c, 3.0 * (n as f64 - 1.0));
    }
}

// (PP - 1)(F + B - 2W) = PP - 1.
#[test]
fn zb1p_bubble_is_the_readme_formula() {
    for (n, c) in [(4, 8), (4, 12), (8, 16), (2, 4), (3, 5)] {
        check_idle(Family::Zb1p, n, c, n as f64 - 1.0);
    }
}

#[test]
fn peak_activations_are_the_readme_memory() {
    let costs = readme_costs();
    for (family, n, c) in [
        (Family::DualPipe, 8, 20),
        (Family::DualPipe, 4, 16),
        (Family::DualPipeV, 4, 10),
        (Family::DualPipeV, 3, 9),
    ] {
        let valid = planned(family, n, c);
        let pp = valid.topology().num_stages();
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            let sim = run(&valid, &costs, model);
            for (rank, r) in sim.ranks.iter().enumerate() {
                assert_eq!(
                    r.peak_activations,
                    pp + 1,
                    "{family} ({n}, {c}) {model} rank {rank}"
                );
            }
        }
    }
    for (n, c) in [(4, 8), (8, 16)] {
        let valid = planned(Family::OneFOneB, n, c);
        let sim = run(&valid, &costs, ExecutionModel::Blocking);
        assert_eq!(sim.ranks[0].peak_activations, n, "1f1b ({n}, {c}) rank 0");
    }
}

#[test]
fn peaks_agree_with_the_list_order_count() {
    let costs = readme_costs();
    for family in families() {
        let valid = planned(family, 4, 8);
        let stats = rank_stats(valid.schedule());
        let sim = run(&valid, &costs, ExecutionModel::Async);
        for (rank, (r, s)) in sim.ranks.iter().zip(&stats).enumerate() {
            assert_eq!(
                (r.peak_activations, r.peak_pending_w),
                (s.peak_activations, s.peak_pending_w),
                "{family} rank {rank}"
            );
        }
    }
}

fn families() -> [Family; 7] {
    Family::ALL
}

/// Cost models that stress different parts of the schedules.
fn cost_models() -> Vec<Costs> {
    let mut models = vec![readme_costs()];
    for list in [
        "f=1,b=2,w=1,fb=2.5,comm=0.3",
        "f=1,b=1,w=0,comm=2",
        "f=0.7,b=2.2,w=0.9,fb=2,comm=0.1,bytes=8,bandwidth=16",
    ] {
        let mut costs = Costs::default();
        costs.apply_assignments(list).unwrap();
        models.push(costs);
    }
    let mut uneven =
        Costs::from_json(r#"{"stages": [{"stage": 0, "f": 3, "b": 4}, {"stage": 1, "w": 0.1}]}"#)
            .unwrap();
    uneven.latency = 0.2;
    models.push(uneven);
    models
}

#[test]
fn async_is_never_slower_than_blocking() {
    for family in families() {
        for (n, c) in [(2, 4), (4, 8), (4, 12)] {
            let Ok(valid) = plan(&PlanRequest::new(family, n, c)) else {
                continue;
            };
            for costs in cost_models() {
                let blocking = run(&valid, &costs, ExecutionModel::Blocking);
                let overlapped = run(&valid, &costs, ExecutionModel::Async);
                assert!(
                    overlapped.makespan <= blocking.makespan,
                    "{family} ({n}, {c}) costs {costs}: async {} > blocking {}",
                    overlapped.makespan,
                    blocking.makespan
                );
                // Event by event, not only at the end.
                for (rank, (a, b)) in overlapped.times.iter().zip(&blocking.times).enumerate() {
                    for (index, (a, b)) in a.iter().zip(b).enumerate() {
                        let instruction = valid.schedule().ranks[rank][index];
                        if instruction.is_compute() {
                            assert!(
                                a.end <= b.end,
                                "{family} ({n}, {c}) costs {costs}: rank {rank} instruction {index} `{instruction}` ends at {} async, {} blocking",
                                a.end,
                                b.end
                            );
                        }
                    }
                }
                for r in blocking.ranks.iter().chain(&overlapped.ranks) {
                    assert!(r.busy >= 0.0 && r.idle >= -1e-9 && r.end <= blocking.makespan);
                }
            }
        }
    }
}
