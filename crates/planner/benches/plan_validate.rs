//! Plan and validate large schedules. Target: dualpipev (64, 512) in 75 ms or less on a
//! 2-core machine, growing linearly with the instruction count.

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::validate;

fn main() {
    divan::main();
}

const CONFIGS: [(Family, u32, u32); 4] = [
    (Family::DualPipeV, 8, 20),
    (Family::DualPipeV, 32, 256),
    (Family::DualPipeV, 64, 512),
    (Family::DualPipe, 64, 1024),
];

fn label(i: usize) -> String {
    let (family, n, c) = CONFIGS[i];
    format!("{family} ({n},{c})")
}

/// Plan, which validates too: the whole path of `dualpipe plan`.
#[divan::bench(args = [0, 1, 2, 3], sample_count = 10, sample_size = 1)]
fn plan_and_validate(bencher: divan::Bencher, i: usize) {
    let (family, n, c) = CONFIGS[i];
    let _ = label(i);
    bencher.bench(|| plan(&PlanRequest::new(family, n, c)).unwrap());
}

/// Validation alone.
#[divan::bench(args = [0, 1, 2, 3], sample_count = 10, sample_size = 1)]
fn validate_only(bencher: divan::Bencher, i: usize) {
    let (family, n, c) = CONFIGS[i];
    let schedule = plan(&PlanRequest::new(family, n, c)).unwrap().into_inner();
    bencher.bench(|| validate(&schedule).unwrap());
}
