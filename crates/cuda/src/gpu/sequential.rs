//! The single-stream reference ([`GpuSequential`]) and the backend under the shared test
//! bodies ([`CudaReference`]).

use std::sync::Arc;
use std::time::Instant;

use dualpipe_executor::{Backward, Forward, Options, Stage, StepError};
use dualpipe_reference::Backend;
use dualpipe_reference::conformance::{ReferenceBackend, ReferenceRun};
use dualpipe_reference::model::{Batch, ModelSpec, Parameters};
use dualpipe_schedule::ValidSchedule;

use super::RankDevice;
use super::device::{Device, open, probe};
use super::host::failure;
use super::pipeline::CudaPipeline;
use super::stage::GpuStage;
use crate::api::{GpuConfig, GpuStep};
use crate::error::CudaError;

/// The reference model in one stream, micro-batch after micro-batch: every stage's forward,
/// the loss, every stage's full backward. The GPU's numerical reference for any schedule.
pub struct GpuSequential {
    _device: Device,
    dev: Arc<RankDevice>,
    stages: Vec<GpuStage>,
}

impl GpuSequential {
    /// The model `spec` on GPU `config.device`.
    pub fn new(spec: &ModelSpec, config: GpuConfig) -> Result<Self, CudaError> {
        let device = open(config.device)?;
        let dev = RankDevice::new(&device.ctx, &device.kernels, config.dtype, false)?;
        let stages = (0..spec.stages)
            .map(|s| GpuStage::new(&dev, spec, s))
            .collect::<Result<_, _>>()?;
        Ok(GpuSequential {
            _device: device,
            dev,
            stages,
        })
    }

    /// One step; losses and outputs on the host. Like the pipelined backends, every
    /// micro-batch is uploaded before the clock starts, and losses and outputs are downloaded
    /// after the device has finished: the time is the device work and its dispatch only, with
    /// no copy to or from the host (and no wait for one) between micro-batches.
    pub fn step(&mut self, batch: &Batch, training: bool) -> Result<GpuStep, CudaError> {
        let last = self.stages.len() - 1;
        let stage_error = |e: dualpipe_executor::StageError| CudaError::Device(e.to_string());
        let mut uploaded = Vec::with_capacity(batch.inputs.len());
        for (input, target) in batch.inputs.iter().zip(&batch.targets) {
            let x = self
                .dev
                .upload(input.data(), [input.rows(), input.cols()])?;
            let t = self
                .dev
                .upload(target.data(), [target.rows(), target.cols()])?;
            uploaded.push((x, t));
        }
        self.dev.synchronize()?;
        let started = Instant::now();
        let mut results = Vec::with_capacity(uploaded.len());
        for (mb, (input, target)) in uploaded.into_iter().enumerate() {
            let mb = mb as u32;
            let mut x = input;
            let mut target = Some(target);
            let mut loss = None;
            for (s, stage) in self.stages.iter_mut().enumerate() {
                let forwarded = stage
                    .forward(Forward {
                        mb,
                        input: x,
                        target: if s == last { target.take() } else { None },
                        training,
                    })
                    .map_err(stage_error)?;
                x = forwarded.output;
                loss = loss.or(forwarded.loss);
            }
            let loss =
                loss.ok_or_else(|| CudaError::Device("the last stage computed no loss".into()))?;
            if training {
                let mut grad = None;
                for stage in self.stages.iter_mut().rev() {
                    grad = stage
                        .backward(Backward {
                            mb,
                            output_grad: grad,
                            defer_w: false,
                        })
                        .map_err(stage_error)?;
                }
            }
            results.push((loss, x));
        }
        let dispatch_us = started.elapsed().as_secs_f64() * 1e6;
        self.dev.synchronize()?;
        let step_us = started.elapsed().as_secs_f64() * 1e6;
        let mut losses = Vec::with_capacity(results.len());
        let mut outputs = Vec::with_capacity(results.len());
        for (loss, x) in results {
            losses.push(self.dev.download(loss.buf())?.first().copied());
            outputs.push(Some(self.dev.download(x.buf())?));
        }
        Ok(GpuStep {
            losses,
            outputs,
            profile: None,
            dispatch_us,
            step_us,
            instructions: 0,
        })
    }

    /// The gradients of stage `stage`, on the host.
    pub fn gradients(&self, stage: u32) -> Result<Parameters, CudaError> {
        let copy = self
            .stages
            .get(stage as usize)
            .ok_or_else(|| CudaError::Usage(format!("no stage {stage}")))?;
        Ok(copy.gradients()?)
    }

    /// Saved activations or pending weight gradients left on any stage.
    pub fn leftover(&self) -> usize {
        self.stages.iter().map(GpuStage::pending).sum()
    }
}

/// The GPU backend as a [`ReferenceBackend`]:
/// the shared test bodies run on it unchanged.
pub struct CudaReference {
    config: GpuConfig,
}

impl CudaReference {
    /// Checks that GPU `config.device` can be used.
    pub fn new(config: GpuConfig) -> Result<Self, CudaError> {
        probe(config.device)?;
        Ok(CudaReference { config })
    }
}

impl ReferenceBackend for CudaReference {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn pipelined(
        &mut self,
        schedule: ValidSchedule,
        spec: &ModelSpec,
        batch: &Batch,
        options: Options,
    ) -> Result<ReferenceRun, StepError> {
        let mut pipeline =
            CudaPipeline::new(schedule, options, spec, self.config).map_err(|e| failure(0, e))?;
        let step = pipeline.step(batch)?;
        pipeline.reference_run(step).map_err(|e| failure(0, e))
    }

    fn sequential(
        &mut self,
        spec: &ModelSpec,
        batch: &Batch,
        training: bool,
    ) -> Result<ReferenceRun, dualpipe_executor::StageError> {
        let mut model = GpuSequential::new(spec, self.config)?;
        let step = model.step(batch, training)?;
        let gradients = if training {
            (0..spec.stages)
                .map(|s| model.gradients(s))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(ReferenceRun {
            losses: step.losses,
            outputs: step.outputs,
            gradients,
            leftover: model.leftover(),
        })
    }
}
