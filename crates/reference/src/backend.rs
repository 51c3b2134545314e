//! The [`Backend`] trait: what every backend that runs the reference model offers (the CPU
//! backend here, the CUDA backend's virtual ranks and NCCL ranks, and its stand-in built
//! without CUDA), and the CPU backend as one.

use std::convert::Infallible;
use std::time::Instant;

use dualpipe_executor::{CpuPipeline, Executor, Options, Profile, RankFailure, StepError};
use dualpipe_schedule::ValidSchedule;

use crate::conformance::ReferenceRun;
use crate::model::{Batch, ModelSpec, Parameters, ReferenceStage};

/// What one step returns, on the host.
#[derive(Clone, Debug, Default)]
pub struct HostStep {
    /// The loss of each micro-batch (`None` where this process did not compute it).
    pub losses: Vec<Option<f32>>,
    /// The model output of each micro-batch, when outputs were kept.
    pub outputs: Vec<Option<Vec<f32>>>,
    /// The measured timeline, when profiling.
    pub profile: Option<Profile>,
    /// Host time spent issuing the step's work (before waiting for a device), microseconds.
    pub dispatch_us: f64,
    /// Host time from the start of issuing to the end of the step's work, microseconds.
    pub step_us: f64,
    /// Instructions issued (computes, sends, receives and commits of every rank run here).
    pub instructions: usize,
}

/// A backend running the reference model under a schedule, over the ranks it holds (every
/// rank of the schedule, or this process's rank of a multi-process run).
///
/// Implemented by [`CpuBackend`], and in `dualpipe-cuda` by `CudaPipeline` (virtual ranks on
/// one GPU), `NcclRank` (one process per GPU) and, without the `cuda` feature, by their
/// stand-ins, so the compiler holds the stand-ins to the same interface.
pub trait Backend {
    /// What the calls other than [`Backend::step`] fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A short name for messages (`cpu`, `cuda`, `nccl`).
    fn name(&self) -> &'static str;

    /// The prepared schedule and options.
    fn executor(&self) -> &Executor;

    /// The ranks of the schedule run here, ascending.
    fn ranks(&self) -> Vec<u32>;

    /// One step over `batch` (each rank takes what it needs). After a training step the
    /// copies of every stage hold the sum of their gradients.
    fn step(&mut self, batch: &Batch) -> Result<HostStep, StepError>;

    /// The accumulated gradients of stage `stage` (its first copy held here), on the host;
    /// `None` when no rank run here holds it.
    fn gradients(&self, stage: u32) -> Result<Option<Parameters>, Self::Error>;

    /// Saved activations or pending weight gradients left on the stages held here.
    fn leftover(&self) -> usize;

    /// One step of plain gradient descent on every stage copy held here; clears the
    /// gradients.
    fn sgd(&mut self, lr: f32) -> Result<(), Self::Error>;

    /// `step` as a [`ReferenceRun`] to hold against the single-process run: its losses and
    /// outputs, and after a training step the gradients of every stage held here, in stage
    /// order (every stage for a backend that runs every rank).
    fn reference_run(&self, step: HostStep) -> Result<ReferenceRun, Self::Error> {
        let schedule = self.executor().schedule().schedule();
        let mut gradients = Vec::new();
        if !schedule.forward_only {
            for stage in 0..schedule.num_stages {
                if let Some(held) = self.gradients(stage)? {
                    gradients.push(held);
                }
            }
        }
        Ok(ReferenceRun {
            losses: step.losses,
            outputs: step.outputs,
            gradients,
            leftover: self.leftover(),
        })
    }
}

/// The reference model on the CPU backend: one thread per rank, the in-process transport.
pub struct CpuBackend {
    pipeline: CpuPipeline<ReferenceStage>,
}

impl CpuBackend {
    /// Prepares `schedule` and builds every rank's stages of the model `spec` (every copy of
    /// a stage from the same seed, so copies start identical).
    pub fn new(
        schedule: ValidSchedule,
        options: Options,
        spec: &ModelSpec,
    ) -> Result<Self, RankFailure> {
        let pipeline = CpuPipeline::new(schedule, options, |_, stage| {
            Ok(ReferenceStage::new(spec, stage))
        })?;
        Ok(CpuBackend { pipeline })
    }

    /// The pipeline and its stages.
    pub fn pipeline(&self) -> &CpuPipeline<ReferenceStage> {
        &self.pipeline
    }

    /// The pipeline and its stages, to update or inspect between steps.
    pub fn pipeline_mut(&mut self) -> &mut CpuPipeline<ReferenceStage> {
        &mut self.pipeline
    }
}

impl Backend for CpuBackend {
    type Error = Infallible;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn executor(&self) -> &Executor {
        self.pipeline.executor()
    }

    fn ranks(&self) -> Vec<u32> {
        (0..self.executor().schedule().schedule().num_ranks).collect()
    }

    fn step(&mut self, batch: &Batch) -> Result<HostStep, StepError> {
        let started = Instant::now();
        let step = self
            .pipeline
            .step(batch.inputs.clone(), batch.targets.clone())?;
        let step_us = started.elapsed().as_secs_f64() * 1e6;
        Ok(HostStep {
            losses: step.losses,
            outputs: step
                .outputs
                .into_iter()
                .map(|output| output.map(|m| m.into_data()))
                .collect(),
            profile: step.profile,
            dispatch_us: step_us,
            step_us,
            instructions: self
                .executor()
                .schedule()
                .schedule()
                .ranks
                .iter()
                .map(Vec::len)
                .sum(),
        })
    }

    fn gradients(&self, stage: u32) -> Result<Option<Parameters>, Infallible> {
        Ok(self
            .pipeline
            .copies(stage)
            .first()
            .map(|copy| copy.gradients().clone()))
    }

    fn leftover(&self) -> usize {
        self.ranks()
            .into_iter()
            .flat_map(|rank| self.pipeline.stages(rank).iter().map(|(_, s)| s.pending()))
            .sum()
    }

    fn sgd(&mut self, lr: f32) -> Result<(), Infallible> {
        for rank in self.ranks() {
            for (_, stage) in self.pipeline.stages_mut(rank).iter_mut() {
                stage.sgd(lr);
            }
        }
        Ok(())
    }
}
