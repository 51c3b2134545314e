//! Checks that only a GPU can answer: the GPU model against the CPU model, bf16 against f32,
//! copies against no-op communication, NCCL at world size 1 against virtual ranks. Without a GPU the runner prints "skipped: no GPU" and
//! counts nothing as passed (docs/gpu.md).

use std::process::ExitCode;
use std::time::Duration;

mod runner;

use dualpipe_cuda::{
    CommMode, CudaPipeline, DType, GpuConfig, GpuSequential, LaunchEnv, NcclRank, probe,
};
use dualpipe_executor::Options;
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_reference::Backend;
use dualpipe_reference::conformance::cal_diff;
use dualpipe_reference::model::{Batch, ModelSpec, Sequential};
use dualpipe_schedule::{ExecutionModel, ValidSchedule};

fn schedule(family: Family, n: u32, c: u32) -> ValidSchedule {
    plan(&PlanRequest::new(family, n, c)).unwrap()
}

fn options(spec: &ModelSpec) -> Options {
    Options {
        message_shape: Some(spec.message_shape()),
        keep_outputs: true,
        model: ExecutionModel::Async,
        timeout: Duration::from_secs(60),
        profile: true,
    }
}

/// The largest relative difference of `x` from `y`, over the largest magnitude of `y`.
fn relative(x: &[f32], y: &[f32]) -> f64 {
    let scale = y.iter().fold(0.0f64, |m, &v| m.max(f64::from(v.abs())));
    let worst = x
        .iter()
        .zip(y)
        .fold(0.0f64, |m, (&a, &b)| m.max(f64::from((a - b).abs())));
    worst / scale.max(f64::MIN_POSITIVE)
}

fn gpu_fp32_matches_the_cpu_model() {
    let schedule = schedule(Family::DualPipeV, 2, 6);
    let spec = ModelSpec {
        hidden: 64,
        rows: 48,
        stages: 4,
        seed: 233,
    };
    let batch = Batch::synthetic(&spec, 6, 0);
    let mut gpu = CudaPipeline::new(schedule, options(&spec), &spec, GpuConfig::default()).unwrap();
    let step = gpu.step(&batch).unwrap();
    let mut cpu = Sequential::new(&spec);
    let reference = cpu.step(&batch, true).unwrap();
    for (mb, (ours, theirs)) in step.losses.iter().zip(&reference.losses).enumerate() {
        let ours = ours.expect("a loss");
        assert!(
            ((ours - theirs) / theirs).abs() < 1e-5,
            "micro-batch {mb}: {ours} against {theirs}"
        );
    }
    for stage in 0..spec.stages {
        let ours = gpu.gradients(stage).unwrap().expect("every stage is held");
        let theirs = cpu.stages[stage as usize].gradients();
        for ((name, a), (_, b)) in ours.tensors().into_iter().zip(theirs.tensors()) {
            let diff = cal_diff(a, b);
            assert!(diff < 1e-10, "stage {stage} {name}: cal_diff {diff:e}");
        }
    }
    let profile = step.profile.expect("profiled");
    assert!(profile.makespan_us() > 0.0);
}

fn gpu_bf16_is_within_a_percent_of_fp32() {
    let spec = ModelSpec {
        hidden: 64,
        rows: 48,
        stages: 2,
        seed: 233,
    };
    let batch = Batch::synthetic(&spec, 4, 0);
    let run = |dtype| {
        let mut model = GpuSequential::new(
            &spec,
            GpuConfig {
                dtype,
                ..GpuConfig::default()
            },
        )
        .unwrap();
        let step = model.step(&batch, true).unwrap();
        (step, model.gradients(1).unwrap())
    };
    let (full, full_grads) = run(DType::F32);
    let (half, half_grads) = run(DType::Bf16);
    for (a, b) in half.outputs.iter().zip(&full.outputs) {
        let r = relative(a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(r < 1e-2, "bf16 output off by {r:e} relative");
    }
    for ((name, a), (_, b)) in half_grads.tensors().into_iter().zip(full_grads.tensors()) {
        let r = relative(a, b);
        assert!(r < 1e-2, "bf16 gradient {name} off by {r:e} relative");
    }
}

fn copies_and_no_op_communication_give_the_same_bits() {
    let spec = ModelSpec {
        hidden: 32,
        rows: 16,
        stages: 8,
        seed: 7,
    };
    let batch = Batch::synthetic(&spec, 10, 0);
    let run = |comm| {
        let config = GpuConfig {
            comm,
            ..GpuConfig::default()
        };
        let mut gpu = CudaPipeline::new(
            schedule(Family::DualPipeV, 4, 10),
            options(&spec),
            &spec,
            config,
        )
        .unwrap();
        let step = gpu.step(&batch).unwrap();
        (
            step.losses,
            gpu.gradients(0).unwrap().expect("stage 0 is held"),
        )
    };
    assert_eq!(run(CommMode::Copy), run(CommMode::Move));
}

/// NCCL loaded from wherever it was found (PyTorch's wheel names it `libnccl.so.2`): one
/// process at world size 1 gives the same bits as the virtual-rank pipeline.
fn nccl_at_world_size_1_matches_virtual_ranks() {
    let spec = ModelSpec {
        hidden: 64,
        rows: 48,
        stages: 2,
        seed: 233,
    };
    let batch = Batch::synthetic(&spec, 4, 0);
    let env = LaunchEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 29500,
        rendezvous_port: 29501,
    };
    let mut nccl = NcclRank::new(
        &env,
        schedule(Family::DualPipeV, 1, 4),
        options(&spec),
        &spec,
        GpuConfig::default(),
        Duration::from_secs(10),
    )
    .unwrap();
    let ours = nccl.step(&batch).unwrap();
    let mut gpu = CudaPipeline::new(
        schedule(Family::DualPipeV, 1, 4),
        options(&spec),
        &spec,
        GpuConfig::default(),
    )
    .unwrap();
    let theirs = gpu.step(&batch).unwrap();
    assert_eq!(ours.losses, theirs.losses);
    for stage in 0..spec.stages {
        assert_eq!(
            nccl.gradients(stage).unwrap(),
            gpu.gradients(stage).unwrap(),
            "stage {stage}"
        );
    }
}

fn main() -> ExitCode {
    let checks = vec![
        runner::Check {
            name: "gpu_fp32_matches_the_cpu_model",
            run: Box::new(gpu_fp32_matches_the_cpu_model),
        },
        runner::Check {
            name: "gpu_bf16_is_within_a_percent_of_fp32",
            run: Box::new(gpu_bf16_is_within_a_percent_of_fp32),
        },
        runner::Check {
            name: "copies_and_no_op_communication_give_the_same_bits",
            run: Box::new(copies_and_no_op_communication_give_the_same_bits),
        },
        runner::Check {
            name: "nccl_at_world_size_1_matches_virtual_ranks",
            run: Box::new(nccl_at_world_size_1_matches_virtual_ranks),
        },
    ];
    runner::run(checks, probe(0).map(|_| ()))
}
