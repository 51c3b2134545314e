//! Virtual ranks on one GPU: [`CudaPipeline`].

use std::sync::Arc;

use dualpipe_executor::{Executor, Options, RankParts, Stages, StepError, drive};
use dualpipe_reference::Backend;
use dualpipe_reference::model::{Batch, ModelSpec, Parameters};
use dualpipe_schedule::{Instruction, ValidSchedule, Work};

use super::RankDevice;
use super::clock::EventClock;
use super::device::{Device, open};
use super::host::{DeviceHost, failure, instructions};
use super::stage::GpuStage;
use super::transport::PeerTransport;
use crate::api::{GpuConfig, GpuStep};
use crate::error::CudaError;
use crate::plan::{PlanOptions, RankPlan, plan};

/// The reference model under a schedule on one GPU, every rank a virtual rank: one context,
/// three streams per rank, one host thread per rank, sends as device-to-device copies, the
/// streams ordered by each rank's stream plan ([`crate::plan`]), lowered once here.
pub struct CudaPipeline {
    executor: Executor,
    config: GpuConfig,
    device: Device,
    devs: Vec<Arc<RankDevice>>,
    ranks: Vec<Stages<GpuStage>>,
    /// Each rank's plan and instruction list.
    plans: Vec<(Arc<RankPlan>, Arc<[Instruction]>)>,
}

impl CudaPipeline {
    /// Opens GPU `config.device` and builds every rank's stages of the model `spec` (initial
    /// parameters as the CPU model's).
    pub fn new(
        schedule: ValidSchedule,
        options: Options,
        spec: &ModelSpec,
        config: GpuConfig,
    ) -> Result<Self, CudaError> {
        let device = open(config.device)?;
        let executor = Executor::new(schedule, options);
        let num_ranks = executor.schedule().schedule().num_ranks;
        let mut devs = Vec::new();
        let mut ranks = Vec::new();
        for rank in 0..num_ranks {
            let dev = RankDevice::new(
                &device.ctx,
                &device.kernels,
                config.dtype,
                executor.options().profile,
            )?;
            let mut stages = Vec::new();
            for &stage in executor.stages_of(rank) {
                stages.push((stage, GpuStage::new(&dev, spec, stage)?));
            }
            ranks.push(Stages::new(stages));
            devs.push(dev);
        }
        device
            .ctx
            .synchronize()
            .map_err(|e| CudaError::Device(format!("setting up: {e:?}")))?;
        let plans = lower(&executor, config);
        Ok(CudaPipeline {
            executor,
            config,
            device,
            devs,
            ranks,
            plans,
        })
    }

    /// The GPU's name.
    pub fn device_name(&self) -> String {
        self.device
            .ctx
            .name()
            .unwrap_or_else(|_| "unknown GPU".into())
    }
}

/// Every rank's stream plan for `executor`'s schedule under its model and `config`, with the
/// rank's instruction list (which the plan's computes are checked against).
pub(crate) fn lower(
    executor: &Executor,
    config: GpuConfig,
) -> Vec<(Arc<RankPlan>, Arc<[Instruction]>)> {
    let schedule = executor.schedule();
    let options = PlanOptions {
        model: executor.options().model,
        fb_two_streams: config.fb_two_streams,
    };
    plan(schedule, options)
        .into_iter()
        .map(|rank_plan| {
            let list: Arc<[Instruction]> = schedule.schedule().ranks[rank_plan.rank as usize]
                .clone()
                .into();
            (Arc::new(rank_plan), list)
        })
        .collect()
}

impl Backend for CudaPipeline {
    type Error = CudaError;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn ranks(&self) -> Vec<u32> {
        (0..self.executor.schedule().schedule().num_ranks).collect()
    }

    /// The prepared schedule and options.
    fn executor(&self) -> &Executor {
        &self.executor
    }

    /// One step over `batch`. After a training step the copies of every stage held by two
    /// ranks hold the sum of their gradients.
    fn step(&mut self, batch: &Batch) -> Result<GpuStep, StepError> {
        let schedule = self.executor.schedule().clone();
        let doc = schedule.schedule();
        let topology = schedule.topology();
        let last = doc.num_stages - 1;
        let shape = |m: &dualpipe_reference::model::Matrix| [m.rows(), m.cols()];
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for (mb, (x, t)) in batch.inputs.iter().zip(&batch.targets).enumerate() {
            let mb = mb as u32;
            let first = &self.devs[topology.rank_of(Work::new(0, mb)) as usize];
            let at_last = &self.devs[topology.rank_of(Work::new(last, mb)) as usize];
            inputs.push(Some(
                first
                    .upload(x.data(), shape(x))
                    .map_err(|e| failure(0, e))?,
            ));
            targets.push(Some(
                at_last
                    .upload(t.data(), shape(t))
                    .map_err(|e| failure(0, e))?,
            ));
        }
        self.device
            .ctx
            .synchronize()
            .map_err(|e| failure(0, format!("{e:?}")))?;
        let profile = self.executor.options().profile;
        let origin = Arc::new(self.devs[0].event(true).map_err(|e| failure(0, e))?);
        origin
            .record(&self.devs[0].main)
            .map_err(|e| failure(0, format!("{e:?}")))?;
        let clocks: Vec<Option<EventClock>> = self
            .devs
            .iter()
            .map(|dev| {
                dev.commit_times
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                profile.then(|| EventClock::new(dev.clone(), origin.clone()))
            })
            .collect();
        let feeds = self.executor.split_feed(&mut inputs, &mut targets);
        let options = self.executor.options();
        let transports =
            PeerTransport::network(&self.devs, self.config.comm, options.model, options.timeout);
        for (dev, (plan, list)) in self.devs.iter().zip(&self.plans) {
            dev.begin_plan(plan.clone(), list.clone(), options.model);
        }
        let mut host = DeviceHost::new((0..doc.num_ranks).zip(self.devs.iter().cloned()).collect())
            .with_timeout(self.config.host_timeout, None);
        let parts = self
            .ranks
            .iter_mut()
            .zip(transports)
            .zip(feeds)
            .zip(clocks)
            .enumerate()
            .map(|(rank, (((stages, transport), feed), clock))| RankParts {
                rank: rank as u32,
                stages,
                transport,
                feed,
                clock,
            })
            .collect();
        let step = drive(&self.executor, parts, &mut host)?;
        Ok(GpuStep {
            losses: step.losses,
            outputs: step.outputs,
            profile: step.profile,
            dispatch_us: host.dispatch_us,
            step_us: host.step_us,
            instructions: instructions(&schedule, 0..doc.num_ranks),
        })
    }

    /// The gradients of stage `stage` (its first copy), on the host.
    fn gradients(&self, stage: u32) -> Result<Option<Parameters>, CudaError> {
        self.ranks
            .iter()
            .find_map(|s| s.get(stage))
            .map(|copy| copy.gradients().map_err(CudaError::from))
            .transpose()
    }

    /// Saved activations or pending weight gradients left on any stage.
    fn leftover(&self) -> usize {
        self.ranks
            .iter()
            .flat_map(|s| s.iter().map(|(_, st)| st.pending()))
            .sum()
    }

    /// Plain gradient descent on every stage copy; clears the gradients.
    fn sgd(&mut self, lr: f32) -> Result<(), CudaError> {
        for stages in &mut self.ranks {
            for (_, stage) in stages.iter_mut() {
                stage.sgd(lr)?;
            }
        }
        for dev in &self.devs {
            dev.synchronize()?;
        }
        Ok(())
    }
}
