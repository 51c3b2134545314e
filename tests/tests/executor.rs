//! The reference implementation's own schedules, run by the executor: the same losses as the
//! single-process run, bit for bit, and gradients within the reference's bound.

use dualpipe_reference::conformance::CpuReference;
use dualpipe_reference::model::ModelSpec;
use dualpipe_reference::suite::check;
use dualpipe_schedule::{ExecutionModel, Schedule, ValidSchedule};

fn golden(name: &str) -> ValidSchedule {
    let path = dualpipe_tests::fixtures().join("golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ValidSchedule::new(Schedule::from_json(&text).unwrap()).unwrap()
}

#[test]
fn reference_schedules_run_and_match_the_single_process_run() {
    for name in ["dualpipe-8x20.json", "dualpipev-4x10.json"] {
        let schedule = golden(name);
        let doc = schedule.schedule();
        let spec = ModelSpec {
            hidden: 16,
            rows: 6,
            stages: doc.num_stages,
            seed: 233,
        };
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            check(&mut CpuReference, schedule.clone(), &spec, model, 0);
        }
    }
}
