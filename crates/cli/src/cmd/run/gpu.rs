//! `dualpipe run --device cuda`: the same training on the CUDA backend, with virtual ranks on
//! one GPU, or with `--launch` one process per GPU over NCCL placed by torchrun-style
//! variables. The host waits at most `--host-timeout` seconds for a step's device work, so an
//! NCCL stall (a peer gone) fails the step instead of hanging it.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use dualpipe_cuda::{CommMode, CudaError, CudaPipeline, DType, GpuConfig, LaunchEnv, NcclRank};
use dualpipe_executor::Options;
use dualpipe_reference::Backend;
use dualpipe_reference::model::{Batch, ModelSpec, Sequential};
use dualpipe_schedule::ValidSchedule;

use crate::io::{Failure, write_stdout};

/// What a GPU run needs beyond the CPU run's arguments, checked before any GPU is looked for.
pub struct GpuRun {
    /// This process's place in a multi-process run (`--launch`), or `None` for one GPU.
    pub launch: Option<LaunchEnv>,
    /// The GPU of a one-GPU run.
    pub gpu: usize,
    /// The host's limit on waiting for one step's device work.
    pub host_timeout: Duration,
}

impl GpuRun {
    /// Checks the GPU options: `--launch` reads the launch variables now (a missing or bad
    /// one is a usage error naming it) and needs `WORLD_SIZE` equal to the schedule's ranks.
    pub fn check(
        launch: bool,
        gpu: usize,
        host_timeout: f64,
        schedule: &ValidSchedule,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<GpuRun, Failure> {
        if !(host_timeout.is_finite() && host_timeout > 0.0) {
            return Err(Failure::usage(
                "--host-timeout must be a positive number of seconds",
            ));
        }
        let launch = if launch {
            if gpu != 0 {
                return Err(Failure::usage(
                    "--gpu is for a run on one GPU; with --launch each process takes GPU LOCAL_RANK",
                ));
            }
            let env = LaunchEnv::from_lookup(lookup)
                .map_err(|e| Failure::usage(format!("--launch: {e}")))?;
            let ranks = schedule.schedule().num_ranks;
            if env.world_size != ranks {
                return Err(Failure::usage(format!(
                    "--launch: WORLD_SIZE is {}, but the schedule has {ranks} ranks: start one process per rank",
                    env.world_size
                )));
            }
            Some(env)
        } else {
            None
        };
        Ok(GpuRun {
            launch,
            gpu,
            host_timeout: Duration::from_secs_f64(host_timeout),
        })
    }
}

/// No GPU (or a build without CUDA) and usage mistakes exit with 2; anything else with 1.
fn gpu_failure(e: CudaError) -> Failure {
    if e.is_no_gpu() || matches!(e, CudaError::Usage(_)) {
        Failure::usage(format!("--device cuda: {e}"))
    } else {
        Failure::invalid(format!("--device cuda: {e}"))
    }
}

/// Trains `steps` steps on the GPU from the model's initial parameters and prints each step's
/// mean loss (the ranks holding the last stage) and time. The first step's losses are set
/// beside the CPU model's from the same parameters (the GPU sums in another order, so they
/// agree closely, not bit for bit).
#[allow(clippy::too_many_arguments)]
pub fn train(
    run: &GpuRun,
    schedule: ValidSchedule,
    options: Options,
    spec: &ModelSpec,
    steps: u32,
    lr: f32,
    out: &mut String,
) -> Result<(), Failure> {
    let doc = schedule.schedule();
    let (training, microbatches) = (!doc.forward_only, doc.num_microbatches);
    let config = GpuConfig {
        device: run
            .launch
            .as_ref()
            .map_or(run.gpu, |env| env.local_rank as usize),
        dtype: DType::F32,
        comm: CommMode::Copy,
        fb_two_streams: true,
        host_timeout: Some(run.host_timeout),
    };
    let rendezvous_timeout = options.timeout;
    let mut backend: Box<dyn Backend<Error = CudaError>> = match &run.launch {
        None => {
            let info = dualpipe_cuda::probe(run.gpu).map_err(gpu_failure)?;
            let _ = writeln!(out, "device: {info}, {} virtual ranks", doc.num_ranks);
            Box::new(CudaPipeline::new(schedule, options, spec, config).map_err(gpu_failure)?)
        }
        Some(env) => {
            let info = dualpipe_cuda::probe(env.local_rank as usize).map_err(gpu_failure)?;
            let _ = writeln!(out, "device: {info}; {env}");
            Box::new(
                NcclRank::new(env, schedule, options, spec, config, rendezvous_timeout)
                    .map_err(gpu_failure)?,
            )
        }
    };
    write_stdout(&std::mem::take(out))?;
    let mut step_ms = Vec::new();
    for step in 0..steps {
        let batch = Batch::synthetic(spec, microbatches, u64::from(step));
        let started = Instant::now();
        let output = backend
            .step(&batch)
            .map_err(|e| Failure::invalid(format!("step {}: {e}", step + 1)))?;
        step_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let losses: Vec<f32> = output.losses.iter().flatten().copied().collect();
        if step == 0 {
            let cpu = Sequential::new(spec)
                .reference_run(&batch, training)
                .map_err(|e| Failure::invalid(format!("step 1: the CPU model: {e}")))?;
            let worst = output
                .losses
                .iter()
                .zip(&cpu.losses)
                .filter_map(|(gpu, cpu)| Some(relative_difference((*gpu)?, (*cpu)?)))
                .fold(0.0f64, f64::max);
            let _ = writeln!(
                out,
                "step 1 against the CPU model from the same parameters: {} losses, largest relative difference {worst:.1e}",
                losses.len()
            );
        }
        let _ = if losses.is_empty() {
            writeln!(
                out,
                "step {:>3}  (no loss on this rank)  {:>8.1} ms",
                step + 1,
                step_ms[step as usize]
            )
        } else {
            let mean = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len() as f64;
            writeln!(
                out,
                "step {:>3}  loss {mean:.6}  {:>8.1} ms",
                step + 1,
                step_ms[step as usize]
            )
        };
        write_stdout(&std::mem::take(out))?;
        if training {
            backend
                .sgd(lr)
                .map_err(|e| Failure::invalid(format!("step {}: {e}", step + 1)))?;
        }
    }
    step_ms.sort_by(f64::total_cmp);
    let median = step_ms.get(step_ms.len() / 2).copied().unwrap_or(0.0);
    let _ = writeln!(out, "median step: {median:.1} ms over {steps} steps");
    Ok(())
}

/// `|a - b| / max(|b|, tiny)`, as f64.
fn relative_difference(a: f32, b: f32) -> f64 {
    let (a, b) = (f64::from(a), f64::from(b));
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualpipe_planner::{Family, PlanRequest, plan};

    fn schedule(ranks: u32) -> ValidSchedule {
        plan(&PlanRequest::new(Family::DualPipeV, ranks, 4)).unwrap()
    }

    fn check(launch: bool, gpu: usize, timeout: f64, vars: &str) -> Result<GpuRun, Failure> {
        let table: Vec<(String, String)> = vars
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        GpuRun::check(launch, gpu, timeout, &schedule(2), |name| {
            table
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    fn usage(result: Result<GpuRun, Failure>) -> String {
        match result {
            Ok(_) => panic!("expected a usage error"),
            Err(failure) => {
                assert_eq!(failure.code, 2, "{}", failure.message);
                failure.message
            }
        }
    }

    #[test]
    fn one_gpu_needs_no_launch_variables() {
        let run = check(false, 3, 2.5, "").unwrap();
        assert!(run.launch.is_none());
        assert_eq!(
            (run.gpu, run.host_timeout),
            (3, Duration::from_millis(2500))
        );
    }

    #[test]
    fn a_launch_reads_and_checks_the_variables() {
        let run = check(
            true,
            0,
            10.0,
            "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=h MASTER_PORT=29500",
        )
        .unwrap();
        let env = run.launch.unwrap();
        assert_eq!((env.rank, env.rendezvous_port), (1, 29501));
        let missing = usage(check(true, 0, 10.0, "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h"));
        assert!(
            missing.starts_with("--launch: MASTER_PORT is not set"),
            "{missing}"
        );
        let bad = usage(check(
            true,
            0,
            10.0,
            "RANK=x WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1",
        ));
        assert!(bad.starts_with("--launch: RANK=\"x\""), "{bad}");
        let world = usage(check(
            true,
            0,
            10.0,
            "RANK=0 WORLD_SIZE=4 MASTER_ADDR=h MASTER_PORT=1",
        ));
        assert!(
            world.starts_with("--launch: WORLD_SIZE is 4, but the schedule has 2 ranks"),
            "{world}"
        );
    }

    #[test]
    fn bad_gpu_options_are_usage_errors() {
        for timeout in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let message = usage(check(false, 0, timeout, ""));
            assert!(message.contains("--host-timeout"), "{message}");
        }
        let message = usage(check(
            true,
            1,
            10.0,
            "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1",
        ));
        assert!(
            message.starts_with("--gpu is for a run on one GPU"),
            "{message}"
        );
    }

    #[test]
    fn relative_differences() {
        assert_eq!(relative_difference(1.0, 1.0), 0.0);
        assert!((relative_difference(1.01, 1.0) - 0.01).abs() < 1e-6);
    }
}
