//! Partitioning speed: 1,000 layers over 64 stages.
//!
//! `cargo bench -p dualpipe-partition --bench partition`; the recorded results are in
//! `docs/performance.md`. `bottleneck` runs the exact bottleneck optimum alone
//! (`max_evaluations: 0`); `refined` adds the default refinement under the simulator.

use divan::Bencher;
use dualpipe_partition::{Layer, Layers, Options, partition};
use dualpipe_planner::{Family, PlanRequest, plan};

fn main() {
    divan::main();
}

/// 1,000 layers of varied cost (a fixed pseudo-random sequence), heavier first and last.
fn layers() -> Layers {
    let mut state = 12345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let layers = (0..1000)
        .map(|i| {
            let heavy = if i == 0 || i == 999 { 8.0 } else { 1.0 };
            let f = (0.5 + next()) * heavy;
            Layer {
                name: None,
                f,
                b: 2.0 * f,
                w: f,
                fb: None,
                param_bytes: 1e6 * (0.5 + next()),
                activation_bytes: 1e5 * (0.5 + next()),
            }
        })
        .collect();
    Layers {
        unit: Some("ms".into()),
        layers,
    }
}

/// Schedules with 64 stages.
const CASES: [(Family, u32, u32); 3] = [
    (Family::DualPipeV, 32, 64),
    (Family::DualPipe, 64, 128),
    (Family::OneFOneB, 64, 64),
];

fn run(bencher: Bencher, case: usize, max_evaluations: usize) {
    let (family, n, c) = CASES[case];
    let valid = plan(&PlanRequest::new(family, n, c)).unwrap();
    let layers = layers();
    let options = Options {
        memory_cap: None,
        max_evaluations,
    };
    bencher.bench(|| partition(divan::black_box(&layers), &valid, &options).unwrap());
}

/// 0: dualpipev 32 x 64, 1: dualpipe 64 x 128, 2: 1f1b 64 x 64.
#[divan::bench(args = [0, 1, 2], sample_count = 5)]
fn bottleneck(bencher: Bencher, case: usize) {
    run(bencher, case, 0);
}

/// The same with the default refinement (up to 256 simulations).
#[divan::bench(args = [0, 1, 2], sample_count = 3)]
fn refined(bencher: Bencher, case: usize) {
    run(bencher, case, Options::default().max_evaluations);
}
