//! Step time of the reference model where compute dominates: the pipeline on CPU threads
//! against the same model in one process (`Sequential`), same micro-batches, same order.
//!
//! `cargo bench -p dualpipe-executor --bench step` prints one table. Timings on a shared
//! machine drift by several percent from second to second, so each row alternates the two
//! runs, round after round, and reports the median of the per-round ratios.
//!
//! With one rank the pipeline does exactly the sequential run's work on one thread: the ratio
//! is the executor's whole overhead (target: at most 1.10). With two ranks on two cores the
//! pipeline may also run stages side by side.

use std::time::{Duration, Instant};

use dualpipe_executor::{CpuPipeline, Options};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_reference::model::{Batch, ModelSpec, ReferenceStage, Sequential};
use dualpipe_schedule::ExecutionModel;

const HIDDEN: usize = 256;
const ROWS: usize = 128;
const MICROBATCHES: u32 = 20;
const ROUNDS: usize = 11;

fn main() {
    // `cargo test --benches` runs this too: one round of the smallest row is enough there.
    let quick = std::env::args().any(|a| a == "--test");
    let rows: &[(Family, u32)] = if quick {
        &[(Family::DualPipeV, 1)]
    } else {
        &[
            (Family::OneFOneB, 1),
            (Family::Zb1p, 1),
            (Family::DualPipeV, 1),
            (Family::OneFOneB, 2),
            (Family::Zb1p, 2),
            (Family::DualPipe, 2),
            (Family::DualPipeV, 2),
        ]
    };
    let rounds = if quick { 1 } else { ROUNDS };
    println!(
        "hidden {HIDDEN}, {ROWS} rows per micro-batch, {MICROBATCHES} micro-batches, training; median of {rounds} alternating rounds"
    );
    println!(
        "{:<10} {:>5} {:>6} {:>8} {:>14} {:>12} {:>7} {:>9}",
        "schedule",
        "ranks",
        "stages",
        "model",
        "sequential ms",
        "pipeline ms",
        "ratio",
        "min ratio"
    );
    for &(family, ranks) in rows {
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            row(family, ranks, model, rounds);
        }
    }
}

fn row(family: Family, ranks: u32, model: ExecutionModel, rounds: usize) {
    let schedule = plan(&PlanRequest::new(family, ranks, MICROBATCHES)).unwrap();
    let stages = schedule.schedule().num_stages;
    let spec = ModelSpec {
        hidden: HIDDEN,
        rows: ROWS,
        stages,
        seed: 233,
    };
    let options = Options {
        message_shape: Some(spec.message_shape()),
        model,
        timeout: Duration::from_secs(600),
        ..Options::default()
    };
    let mut pipeline =
        CpuPipeline::new(schedule, options, |_, s| Ok(ReferenceStage::new(&spec, s))).unwrap();
    let mut sequential = Sequential::new(&spec);
    let batch = Batch::synthetic(&spec, MICROBATCHES, 0);
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        sequential.step(&batch, true).unwrap();
        let reference = started.elapsed().as_secs_f64();
        let (inputs, targets) = (batch.inputs.clone(), batch.targets.clone());
        let started = Instant::now();
        pipeline.step(inputs, targets).unwrap();
        let pipelined = started.elapsed().as_secs_f64();
        theirs.push(reference);
        ours.push(pipelined);
        ratios.push(pipelined / reference);
    }
    println!(
        "{:<10} {:>5} {:>6} {:>8} {:>14.1} {:>12.1} {:>7.3} {:>9.3}",
        family.name(),
        ranks,
        stages,
        model.to_string(),
        1e3 * median(&mut theirs),
        1e3 * median(&mut ours),
        median(&mut ratios),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
    );
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
