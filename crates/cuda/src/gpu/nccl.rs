//! One process per GPU over NCCL: [`NcclRank`].

use std::sync::Arc;
use std::time::Duration;

use dualpipe_executor::{Executor, Options, RankParts, Stages, StepError, drive};
use dualpipe_reference::Backend;
use dualpipe_reference::model::{Batch, ModelSpec, Parameters};
use dualpipe_schedule::{Instruction, ValidSchedule, Work};

use super::clock::EventClock;
use super::device::{Device, open, probe};
use super::host::{DeviceHost, failure, instructions};
use super::pipeline::lower;
use super::raw::{self, NcclComm};
use super::stage::GpuStage;
use super::transport::{NcclTransport, exchange_gradients};
use super::{GpuError, RankDevice};
use crate::api::{GpuConfig, GpuStep};
use crate::detect::Lib;
use crate::error::CudaError;
use crate::launch::LaunchEnv;
use crate::plan::RankPlan;

/// This process's rank of a multi-process run: one GPU (`LOCAL_RANK`), NCCL to the others.
pub struct NcclRank {
    env: LaunchEnv,
    _device: Device,
    executor: Executor,
    dev: Arc<RankDevice>,
    stages: Stages<GpuStage>,
    transport: NcclTransport,
    host_timeout: Option<Duration>,
    /// This rank's stream plan and instruction list, lowered once.
    plan: Arc<RankPlan>,
    list: Arc<[Instruction]>,
}

impl NcclRank {
    /// Joins the run described by `env`: checks that `WORLD_SIZE` is the schedule's number of
    /// ranks, opens GPU `LOCAL_RANK`, takes the NCCL id from rank 0 through the rendezvous
    /// (waiting at most `rendezvous_timeout`) and builds this rank's stages.
    pub fn new(
        env: &LaunchEnv,
        schedule: ValidSchedule,
        options: Options,
        spec: &ModelSpec,
        config: GpuConfig,
        rendezvous_timeout: Duration,
    ) -> Result<Self, CudaError> {
        let ranks = schedule.schedule().num_ranks;
        if env.world_size != ranks {
            return Err(CudaError::Usage(format!(
                "WORLD_SIZE is {}, but the schedule has {ranks} ranks: start one process per rank",
                env.world_size
            )));
        }
        let Some(shape) = options.message_shape.clone() else {
            return Err(CudaError::Usage(
                "an NCCL run needs Options::message_shape (receive buffers are allocated from it)"
                    .into(),
            ));
        };
        let message_shape: [usize; 2] = shape.try_into().map_err(|s: Vec<usize>| {
            CudaError::Usage(format!("messages must be matrices, not of shape {s:?}"))
        })?;
        probe(env.local_rank as usize)?;
        if let Some(problem) = raw::libraries()
            .iter()
            .find(|s| s.lib == Lib::Nccl)
            .and_then(|s| s.problem())
        {
            return Err(CudaError::Library(problem));
        }
        let device = open(env.local_rank as usize)?;
        let blob = crate::rendezvous::exchange(
            env,
            || raw::nccl_unique_id().map(Vec::from).unwrap_or_default(),
            rendezvous_timeout,
        )?;
        let id: [u8; 128] = blob.as_slice().try_into().map_err(|_| {
            CudaError::Device(format!(
                "rank 0 could not make an NCCL id (got {} bytes)",
                blob.len()
            ))
        })?;
        let executor = Executor::new(schedule, options);
        let dev = RankDevice::new(
            &device.ctx,
            &device.kernels,
            config.dtype,
            executor.options().profile,
        )?;
        dev.bind()?;
        let comm = NcclComm::init_rank(
            dev.comm.clone(),
            env.rank as usize,
            env.world_size as usize,
            id,
        )?;
        let mut stages = Vec::new();
        for &stage in executor.stages_of(env.rank) {
            stages.push((stage, GpuStage::new(&dev, spec, stage)?));
        }
        let (plan, list) = lower(&executor, config).swap_remove(env.rank as usize);
        Ok(NcclRank {
            env: env.clone(),
            _device: device,
            transport: NcclTransport::new(dev.clone(), comm, message_shape),
            plan,
            list,
            executor,
            dev,
            stages: Stages::new(stages),
            host_timeout: config.host_timeout,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> u32 {
        self.env.rank
    }

    /// DualPipe keeps two copies of each stage on ranks s and N-1-s: each pair exchanges and
    /// adds gradients, stage by stage in ascending order on both sides.
    fn sum_copies(&mut self) -> Result<(), GpuError> {
        let schedule = self.executor.schedule();
        let topology = schedule.topology();
        for stage in self.stages.indices().collect::<Vec<_>>() {
            let holders: Vec<u32> = (0..topology.num_pipelines())
                .map(|p| topology.route(p)[stage as usize])
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let Some(&peer) = holders.iter().find(|&&r| r != self.env.rank) else {
                continue;
            };
            let Some(copy) = self.stages.get_mut(stage) else {
                continue;
            };
            exchange_gradients(
                &self.dev,
                self.transport.comm(),
                peer,
                copy.gradient_buffers_mut(),
            )?;
        }
        let waited = self.dev.synchronize_within(self.host_timeout);
        if let Err(GpuError::Timeout(_)) = &waited {
            let _ = self.transport.comm().abort();
        }
        waited
    }

    /// The stages this rank holds.
    pub fn stages(&self) -> Vec<u32> {
        self.stages.indices().collect()
    }
}

impl Backend for NcclRank {
    type Error = CudaError;

    fn name(&self) -> &'static str {
        "nccl"
    }

    fn executor(&self) -> &Executor {
        &self.executor
    }

    fn ranks(&self) -> Vec<u32> {
        vec![self.env.rank]
    }

    /// One step over `batch` (every process passes the same batch; each takes what its rank
    /// needs). Returns the losses this rank computed.
    fn step(&mut self, batch: &Batch) -> Result<GpuStep, StepError> {
        let rank = self.env.rank;
        let schedule = self.executor.schedule().clone();
        let doc = schedule.schedule();
        let topology = schedule.topology();
        let last = doc.num_stages - 1;
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for (mb, (x, t)) in batch.inputs.iter().zip(&batch.targets).enumerate() {
            let mb = mb as u32;
            let upload = |m: &dualpipe_reference::model::Matrix, stage: u32| {
                (topology.rank_of(Work::new(stage, mb)) == rank)
                    .then(|| self.dev.upload(m.data(), [m.rows(), m.cols()]))
                    .transpose()
            };
            inputs.push(upload(x, 0).map_err(|e| failure(rank, e))?);
            targets.push(upload(t, last).map_err(|e| failure(rank, e))?);
        }
        self.dev.synchronize().map_err(|e| failure(rank, e))?;
        let profile = self.executor.options().profile;
        self.dev
            .commit_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let clock = if profile {
            let origin = Arc::new(self.dev.event(true).map_err(|e| failure(rank, e))?);
            origin
                .record(&self.dev.main)
                .map_err(|e| failure(rank, format!("{e:?}")))?;
            Some(EventClock::new(self.dev.clone(), origin))
        } else {
            None
        };
        let feed = self
            .executor
            .split_feed(&mut inputs, &mut targets)
            .swap_remove(rank as usize);
        self.dev.begin_plan(
            self.plan.clone(),
            self.list.clone(),
            self.executor.options().model,
        );
        let mut host = DeviceHost::new(vec![(rank, self.dev.clone())]).with_timeout(
            self.host_timeout,
            Some(self.transport.comm().abort_handle()),
        );
        let parts = vec![RankParts {
            rank,
            stages: &mut self.stages,
            transport: &mut self.transport,
            feed,
            clock,
        }];
        // The copies of a stage live in different processes: the driver sums none of them
        // here, and each pair exchanges its gradients over NCCL after the step.
        let step = drive(&self.executor, parts, &mut host)?;
        if !doc.forward_only {
            self.sum_copies().map_err(|e| failure(rank, e))?;
        }
        Ok(GpuStep {
            losses: step.losses,
            outputs: step.outputs,
            profile: step.profile,
            dispatch_us: host.dispatch_us,
            step_us: host.step_us,
            instructions: instructions(&schedule, std::iter::once(rank)),
        })
    }

    /// The gradients of stage `stage` if this rank holds it, on the host.
    fn gradients(&self, stage: u32) -> Result<Option<Parameters>, CudaError> {
        self.stages
            .get(stage)
            .map(|s| s.gradients().map_err(CudaError::from))
            .transpose()
    }

    fn leftover(&self) -> usize {
        self.stages.iter().map(|(_, stage)| stage.pending()).sum()
    }

    /// Plain gradient descent on this rank's stages; clears the gradients.
    fn sgd(&mut self, lr: f32) -> Result<(), CudaError> {
        for (_, stage) in self.stages.iter_mut() {
            stage.sgd(lr)?;
        }
        Ok(self.dev.synchronize()?)
    }
}
