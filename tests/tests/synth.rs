//! The synthesiser's schedules run: they pass the validator, the brute-force interpreter and the
//! simulator under both models, the CPU executor with the single-process run's losses, keep the
//! memory cap, are never slower than their start point, and the same seed gives the same
//! schedule.

use dualpipe_planner::Family;
use dualpipe_reference::conformance::CpuReference;
use dualpipe_reference::model::ModelSpec;
use dualpipe_reference::suite::check as matches_single_process;
use dualpipe_schedule::{Costs, ExecutionModel, ValidSchedule, simulate};
use dualpipe_tests::brute;
use dualpipe_tune::synth::{
    Depth, MemoryCap, SynthCosts, SynthError, SynthRequest, Synthesis, deep_v, synthesize,
};

fn model(list: &str) -> SynthCosts {
    let mut costs = Costs::default();
    costs.apply_assignments(list).unwrap();
    SynthCosts::Model(costs)
}

fn request(n: u32, c: u32, memory: MemoryCap, start: Option<Family>) -> SynthRequest {
    let mut r = SynthRequest::new(n, c);
    r.memory = memory;
    r.start = start;
    r.evaluations = 300;
    r.seed = 7;
    r
}

/// Everything a synthesised schedule must satisfy.
fn check(result: &Synthesis, what: &str) {
    let schedule = result.schedule.schedule();
    // Validator (again, from the document), brute force, simulator.
    let again = dualpipe_schedule::Schedule::from_json(&schedule.to_json()).unwrap();
    let valid = ValidSchedule::new(again).unwrap_or_else(|e| panic!("{what}: {e}"));
    for model in [brute::Model::Blocking, brute::Model::Async] {
        brute::run(schedule, model).unwrap_or_else(|e| panic!("{what} {model:?}: {e}"));
    }
    dualpipe_tests::simulates(schedule).unwrap_or_else(|e| panic!("{what}: {e}"));
    // The reported steps are the simulator's.
    let b = simulate(&valid, &result.costs, ExecutionModel::Blocking).unwrap();
    let a = simulate(&valid, &result.costs, ExecutionModel::Async).unwrap();
    assert_eq!(
        (b.makespan, a.makespan),
        (result.blocking, result.async_step),
        "{what}"
    );
    // Memory cap, and never slower than the start.
    if let Some(cap) = result.memory_cap {
        assert!(
            result.peak_memory <= cap + 1e-9,
            "{what}: {} > {cap}",
            result.peak_memory
        );
    }
    assert!(
        result.objective() <= result.start_objective() + 1e-9,
        "{what}: {} slower than the start's {}",
        result.objective(),
        result.start_objective()
    );
    // The CPU executor: losses equal to the single-process run.
    let doc = valid.schedule();
    let spec = ModelSpec {
        hidden: 8,
        rows: 4,
        stages: doc.num_stages,
        seed: 233,
    };
    for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
        matches_single_process(&mut CpuReference, valid.clone(), &spec, model, 0);
    }
}

#[test]
fn synthesised_schedules_run_on_every_checker() {
    let settings = [
        "f=4,b=8,w=4,fb=9.6,comm=0.1",
        "f=4,b=8,w=4,comm=0",
        "f=4,b=8,w=2,fb=10,comm=0.3",
    ];
    let cases = [
        (2, 4, MemoryCap::None, None),
        (
            2,
            6,
            MemoryCap::Like(Family::DualPipeV),
            Some(Family::DualPipeV),
        ),
        (3, 6, MemoryCap::Like(Family::DualPipeV), None),
        (4, 8, MemoryCap::Share(4.0), Some(Family::Zbv)),
        (4, 8, MemoryCap::None, Some(Family::Interleaved1F1B)),
        (3, 5, MemoryCap::None, Some(Family::Zbv)),
    ];
    for costs in settings {
        for &(n, c, memory, start) in &cases {
            let what = format!("N={n} C={c} {memory:?} {start:?} {costs}");
            let result = synthesize(&request(n, c, memory, start), &model(costs))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            check(&result, &what);
        }
    }
}

#[test]
fn one_stage_per_rank_and_uneven_stages() {
    // S = N: the 1F1B and ZB-H1 placement.
    let mut r = request(4, 8, MemoryCap::Like(Family::Zb1p), None);
    r.stages = Some(4);
    let result = synthesize(&r, &model("f=4,b=8,w=4,fb=10,comm=0.05")).unwrap();
    assert_eq!(result.schedule.topology().num_stages(), 4);
    check(&result, "S=N");
    // A cost file with a heavy first and last stage.
    let file = Costs::from_json(
        r#"{"f": 1, "b": 2, "w": 1, "latency": 0.05,
            "stages": [{"stage": 0, "f": 2, "b": 4, "w": 2}, {"stage": 5, "f": 2, "b": 4, "w": 2}]}"#,
    )
    .unwrap();
    let result = synthesize(
        &request(3, 6, MemoryCap::Like(Family::DualPipeV), None),
        &SynthCosts::File(file),
    )
    .unwrap();
    check(&result, "uneven");
}

#[test]
fn the_search_improves_where_room_is_known() {
    // Without an overlap gain, DualPipeV's pairing buys nothing; ZB-V's deferred W fills its
    // bubbles, so the synthesised schedule is at least as fast as the better of the two.
    let costs = model("f=8,b=16,w=8,comm=0");
    let mut r = request(4, 16, MemoryCap::Like(Family::DualPipeV), None);
    r.evaluations = 600;
    let result = synthesize(&r, &costs).unwrap();
    let of = |f: Family| {
        result
            .baselines
            .iter()
            .find(|b| b.family == f)
            .unwrap()
            .objective()
    };
    assert!(result.objective() <= of(Family::DualPipeV).min(of(Family::Zbv)) + 1e-9);
    check(&result, "no overlap gain");
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    let costs = model("f=4,b=8,w=4,fb=9.6,comm=0.1");
    let r = request(3, 8, MemoryCap::Like(Family::DualPipeV), None);
    let one = synthesize(&r, &costs).unwrap();
    let two = synthesize(&r, &costs).unwrap();
    assert_eq!(one.schedule.schedule(), two.schedule.schedule());
    assert_eq!(
        (one.blocking, one.async_step),
        (two.blocking, two.async_step)
    );
    assert_eq!(one.evaluations, two.evaluations);
    // A zero wall-time cap stops at once and still returns a valid schedule.
    let mut quick = r.clone();
    quick.seconds = Some(0.0);
    let cut = synthesize(&quick, &costs).unwrap();
    assert!(cut.cut_short);
    check(&cut, "cut short");
}

#[test]
fn bad_parameters_say_which() {
    let costs = model("f=4,b=8,w=4");
    let error = |r: SynthRequest| synthesize(&r, &costs).unwrap_err();
    let e = error(request(4, 0, MemoryCap::None, None));
    assert!(e.to_string().contains("microbatches: 0"), "{e}");
    let e = error(request(0, 4, MemoryCap::None, None));
    assert!(e.to_string().contains("ranks: 0"), "{e}");
    // C too small for the start asked for.
    let e = error(request(4, 6, MemoryCap::None, Some(Family::DualPipeV)));
    assert!(e.to_string().contains("C = 6 is too few"), "{e}");
    // A family to measure the cap by that does not accept C.
    let e = error(request(4, 6, MemoryCap::Like(Family::DualPipeV), None));
    assert!(e.to_string().contains("memory like dualpipev"), "{e}");
    // An impossible cap.
    let e = error(request(4, 8, MemoryCap::Share(0.5), None));
    assert!(matches!(e, SynthError::Cap(_)), "{e}");
    assert!(e.to_string().contains("below every start point"), "{e}");
    let e = error(request(4, 8, MemoryCap::Share(-1.0), None));
    assert!(e.to_string().contains("memory cap"), "{e}");
    let mut r = request(4, 8, MemoryCap::None, None);
    r.copies = 3;
    assert!(error(r.clone()).to_string().contains("copies: 3"));
    r.copies = 1;
    r.stages = Some(6);
    assert!(error(r.clone()).to_string().contains("stages: 6"));
    r.stages = Some(4);
    r.start = Some(Family::DualPipe);
    assert!(error(r.clone()).to_string().contains("copies 2"));
    r.seconds = Some(f64::NAN);
    assert!(error(r).to_string().contains("seconds"));
    let mut bad = Costs::default();
    bad.uniform.f = -1.0;
    let e = synthesize(
        &request(2, 4, MemoryCap::None, None),
        &SynthCosts::Model(bad),
    )
    .unwrap_err();
    assert!(matches!(e, SynthError::Costs(_)), "{e}");
}

#[test]
fn two_copies_let_dualpipe_start() {
    let mut r = request(4, 8, MemoryCap::None, Some(Family::DualPipe));
    r.copies = 2;
    r.stages = Some(4);
    let result = synthesize(&r, &model("f=4,b=8,w=4,fb=9.6,comm=0.1")).unwrap();
    assert_eq!(result.start, Family::DualPipe);
    assert_eq!(result.copies, 2.0);
    check(&result, "dualpipe");
}

#[test]
fn deeper_dualpipev_orders_run_on_every_checker() {
    // DualPipeV's order with more steps of lag on some rank boundaries: every depth, the least
    // micro-batches it needs and a few more, under two cost settings.
    for costs in ["f=4,b=8,w=4,fb=9.6,comm=0.1", "f=4,b=8,w=2,comm=0"] {
        for n in [2u32, 3, 4] {
            for k in 0..n {
                let depth = Depth::spread(n, k);
                let least = depth.min_microbatches(n);
                // Too few micro-batches: no order (below DualPipeV's 2N, an error).
                assert!(!matches!(
                    deep_v(n, least - 1, &model(costs), &depth),
                    Ok(Some(_))
                ));
                for c in [least, least + 3] {
                    let what = format!("N={n} C={c} {depth:?} {costs}");
                    let point = deep_v(n, c, &model(costs), &depth)
                        .unwrap()
                        .unwrap_or_else(|| panic!("{what}: no order"));
                    let schedule = point.schedule.schedule();
                    let again =
                        dualpipe_schedule::Schedule::from_json(&schedule.to_json()).unwrap();
                    let valid = ValidSchedule::new(again).unwrap_or_else(|e| panic!("{what}: {e}"));
                    for model in [brute::Model::Blocking, brute::Model::Async] {
                        brute::run(schedule, model)
                            .unwrap_or_else(|e| panic!("{what} {model:?}: {e}"));
                    }
                    dualpipe_tests::simulates(schedule).unwrap_or_else(|e| panic!("{what}: {e}"));
                    // One more N-th of the model's activations per extra step of lag.
                    let dualpipev = f64::from(2 * n + 1) / 2.0;
                    assert!(
                        (point.peak_memory - dualpipev - f64::from(k)).abs() < 1e-9,
                        "{what}: peak {}",
                        point.peak_memory
                    );
                    let spec = ModelSpec {
                        hidden: 8,
                        rows: 4,
                        stages: 2 * n,
                        seed: 233,
                    };
                    for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
                        matches_single_process(&mut CpuReference, valid.clone(), &spec, model, 0);
                    }
                }
            }
        }
    }
}
