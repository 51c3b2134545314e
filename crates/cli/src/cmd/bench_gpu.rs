//! `dualpipe bench-gpu`: the GPU benchmark's Rust side. Runs the reference model on GPU
//! `--device` and prints one measurement per line (`name<TAB>value<TAB>unit`), which
//! `scripts/gpu_bench.sh` puts in one table beside torch's figures from the same run.

use std::fmt::Write as _;
use std::time::Duration;

use dualpipe_cuda::{CommMode, CudaPipeline, DType, GpuConfig, GpuSequential, probe};
use dualpipe_executor::Options;
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_reference::Backend;
use dualpipe_reference::model::{Batch, ModelSpec};
use dualpipe_schedule::{ExecutionModel, ValidSchedule};

use crate::io::{Failure, write_stdout};

/// Measure the CUDA backend on one GPU: host dispatch time per instruction; DualPipeV on 1
/// rank at a small (hidden 512, f32) and a large (hidden 4096, bf16) size; DualPipeV on 4
/// virtual ranks against a plain sequence of forwards and backwards; the same step with
/// communication replaced by no-ops. Needs a GPU; exits with code 2 when there is none.
#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  dualpipe bench-gpu
  dualpipe bench-gpu --steps 50 --device 1

Exit codes: 0 success, 1 a failed step or a GPU the backend cannot use, 2 usage error or
no GPU.")]
pub struct Args {
    /// The GPU to use.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Timed steps per measurement (the median is printed).
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Untimed steps before each measurement.
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Rows per micro-batch of the large model (sequence length times micro-batch size).
    #[arg(long, default_value_t = 1024)]
    large_rows: usize,
}

fn schedule(family: Family, ranks: u32, microbatches: u32) -> Result<ValidSchedule, Failure> {
    plan(&PlanRequest::new(family, ranks, microbatches)).map_err(crate::cmd::plan::failure)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Median step time (ms) and median dispatch time per instruction (us) of `schedule`.
fn pipelined(
    args: &Args,
    schedule: ValidSchedule,
    spec: &ModelSpec,
    config: GpuConfig,
) -> Result<(f64, f64), Failure> {
    let options = Options {
        message_shape: Some(spec.message_shape()),
        keep_outputs: false,
        model: ExecutionModel::Async,
        timeout: Duration::from_secs(120),
        profile: false,
    };
    let microbatches = schedule.schedule().num_microbatches;
    let mut pipeline = CudaPipeline::new(schedule, options, spec, config).map_err(gpu_failure)?;
    let batch = Batch::synthetic(spec, microbatches, 0);
    let (mut steps, mut dispatch) = (Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let step = pipeline
            .step(&batch)
            .map_err(|e| Failure::invalid(e.to_string()))?;
        pipeline.sgd(0.0).map_err(gpu_failure)?;
        if i >= args.warmup {
            steps.push(step.step_us / 1e3);
            dispatch.push(step.dispatch_us / step.instructions.max(1) as f64);
        }
    }
    Ok((median(steps), median(dispatch)))
}

/// No GPU (or no CUDA support) is a usage error (2); any other GPU failure is 1.
pub fn gpu_failure(e: dualpipe_cuda::CudaError) -> Failure {
    if e.is_no_gpu() {
        Failure::usage(e.to_string())
    } else {
        Failure::invalid(e.to_string())
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    if args.steps == 0 {
        return Err(Failure::usage("--steps must be at least 1"));
    }
    let info = probe(args.device).map_err(gpu_failure)?;
    let mut out = String::new();
    let mut line = |name: &str, value: f64, unit: &str| {
        let _ = writeln!(out, "{name}\t{value:.4}\t{unit}");
    };
    let gpu = |dtype, comm| GpuConfig {
        device: args.device,
        dtype,
        comm,
        fb_two_streams: true,
        host_timeout: Some(Duration::from_secs(300)),
    };
    let small = |stages| ModelSpec {
        hidden: 512,
        rows: 768,
        stages,
        seed: 233,
    };
    let large = |stages| ModelSpec {
        hidden: 4096,
        rows: args.large_rows,
        stages,
        seed: 233,
    };

    let (step, dispatch) = pipelined(
        &args,
        schedule(Family::DualPipeV, 1, 20)?,
        &small(2),
        gpu(DType::F32, CommMode::Copy),
    )?;
    line("dispatch_per_instruction", dispatch, "us");
    line("dualpipev_1rank_small_f32", step, "ms");
    let (step, _) = pipelined(
        &args,
        schedule(Family::DualPipeV, 1, 20)?,
        &large(2),
        gpu(DType::Bf16, CommMode::Copy),
    )?;
    line("dualpipev_1rank_large_bf16", step, "ms");
    let (with_comm, _) = pipelined(
        &args,
        schedule(Family::DualPipeV, 4, 20)?,
        &small(8),
        gpu(DType::F32, CommMode::Copy),
    )?;
    line("dualpipev_4ranks_small_f32", with_comm, "ms");
    let (no_comm, _) = pipelined(
        &args,
        schedule(Family::DualPipeV, 4, 20)?,
        &small(8),
        gpu(DType::F32, CommMode::Move),
    )?;
    line("dualpipev_4ranks_small_f32_comm_noop", no_comm, "ms");

    let spec = small(8);
    let mut sequential =
        GpuSequential::new(&spec, gpu(DType::F32, CommMode::Copy)).map_err(gpu_failure)?;
    let batch = Batch::synthetic(&spec, 20, 0);
    let mut times = Vec::new();
    for i in 0..args.warmup + args.steps {
        let step = sequential.step(&batch, true).map_err(gpu_failure)?;
        if i >= args.warmup {
            times.push(step.step_us / 1e3);
        }
    }
    line("sequential_8stages_small_f32", median(times), "ms");
    write_stdout(&format!("# {info}\n{out}"))
}
