//! Step time of the reference model where compute dominates: the pipeline on CPU threads
//! against the same model in one process (`Sequential`), same micro-batches, same order.
//!
//! `cargo bench -p dualpipe-executor --bench step`. With one rank the pipeline does the same
//! work on one thread, so the ratio is the executor's whole overhead (target: at most 1.10).
//! With two ranks on two cores the pipeline also runs stages in parallel.

use std::time::Duration;

use divan::Bencher;
use dualpipe_executor::model::{Batch, ModelSpec, ReferenceStage, Sequential};
use dualpipe_executor::{CpuPipeline, Options};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{ExecutionModel, ValidSchedule};

fn main() {
    divan::main();
}

const HIDDEN: usize = 256;
const ROWS: usize = 128;
const MICROBATCHES: u32 = 20;

fn spec(stages: u32) -> ModelSpec {
    ModelSpec {
        hidden: HIDDEN,
        rows: ROWS,
        stages,
        seed: 233,
    }
}

/// The model in one process: every micro-batch through every stage, then its backward.
#[divan::bench(args = [2, 4], sample_count = 10, sample_size = 1)]
fn sequential(bencher: Bencher, stages: u32) {
    let spec = spec(stages);
    let mut model = Sequential::new(&spec);
    let batch = Batch::synthetic(&spec, MICROBATCHES, 0);
    bencher.bench_local(|| model.step(&batch, true).unwrap());
}

/// The same model under a schedule, one thread per rank.
#[divan::bench(
    args = [
        (Family::DualPipeV, 1),
        (Family::DualPipeV, 2),
        (Family::OneFOneB, 2),
        (Family::Zb1p, 2),
    ],
    consts = [false, true],
    sample_count = 10,
    sample_size = 1,
)]
fn pipeline<const ASYNC: bool>(bencher: Bencher, (family, ranks): (Family, u32)) {
    let schedule =
        ValidSchedule::new(plan(&PlanRequest::new(family, ranks, MICROBATCHES)).unwrap()).unwrap();
    let spec = spec(schedule.schedule().num_stages);
    let options = Options {
        message_shape: Some(spec.message_shape()),
        model: if ASYNC {
            ExecutionModel::Async
        } else {
            ExecutionModel::Blocking
        },
        timeout: Duration::from_secs(600),
        ..Options::default()
    };
    let mut pipeline = CpuPipeline::new(schedule, options, |_, stage| {
        Ok(ReferenceStage::new(&spec, stage))
    })
    .unwrap();
    let batch = Batch::synthetic(&spec, MICROBATCHES, 0);
    bencher
        .with_inputs(|| (batch.inputs.clone(), batch.targets.clone()))
        .bench_local_values(|(inputs, targets)| pipeline.step(inputs, targets).unwrap());
}
