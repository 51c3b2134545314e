//! Simulator throughput: instructions simulated per second on large planned schedules.
//!
//! `cargo bench -p dualpipe-schedule --bench simulate`; the target (>= 5 M instructions/s on
//! DualPipeV with 64 ranks and 512 micro-batches) and the recorded results are in
//! `docs/performance.md`.

use divan::{Bencher, counter::ItemsCount};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{Costs, ExecutionModel, ValidSchedule, simulate};

fn main() {
    divan::main();
}

fn planned(family: Family, n: u32, c: u32) -> ValidSchedule {
    plan(&PlanRequest::new(family, n, c)).expect("plannable")
}

fn instructions(valid: &ValidSchedule) -> usize {
    valid.schedule().ranks.iter().map(Vec::len).sum()
}

fn bench(bencher: Bencher, valid: &ValidSchedule, model: ExecutionModel) {
    let costs = Costs::default();
    bencher
        .counter(ItemsCount::new(instructions(valid)))
        .bench(|| simulate(divan::black_box(valid), &costs, model).expect("runs"));
}

#[divan::bench(args = [ExecutionModel::Blocking, ExecutionModel::Async], sample_count = 10)]
fn dualpipev_64x512(bencher: Bencher, model: ExecutionModel) {
    bench(bencher, &planned(Family::DualPipeV, 64, 512), model);
}

#[divan::bench(args = [ExecutionModel::Blocking, ExecutionModel::Async], sample_count = 20)]
fn dualpipe_8x20(bencher: Bencher, model: ExecutionModel) {
    bench(bencher, &planned(Family::DualPipe, 8, 20), model);
}
