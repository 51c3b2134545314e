//! Opening the GPU, the CUDA-event clock, and the three ways to run the reference model:
//! virtual ranks on one GPU ([`CudaPipeline`]), one process per GPU over NCCL ([`NcclRank`]),
//! and the single-stream reference ([`GpuSequential`]).

use std::panic::catch_unwind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent};
use dualpipe_executor::{
    Backward, Cause, Clock, Executor, Forward, Host, Options, RankFailure, RankParts, Stage,
    Stages, StepError, drive,
};
use dualpipe_reference::Backend;
use dualpipe_reference::conformance::{ReferenceBackend, ReferenceRun};
use dualpipe_reference::model::{Batch, ModelSpec, Parameters};
use dualpipe_schedule::{Lane, ValidSchedule, Work};

use super::raw::{self, Kernels, NcclComm};
use super::stage::GpuStage;
use super::transport::{NcclTransport, PeerTransport, exchange_gradients};
use super::{GpuError, RankDevice, Tensor};
use crate::api::{GpuConfig, GpuInfo, GpuStep};
use crate::detect::{DeviceQueryError, Lib, Report, diagnose};
use crate::error::CudaError;
use crate::launch::LaunchEnv;

/// See [`crate::probe`].
pub(crate) fn probe(ordinal: usize) -> Result<GpuInfo, CudaError> {
    let libraries = raw::libraries();
    // Belt and braces: cudarc panics when a library it needs cannot be loaded; the checks
    // above should make that impossible, and a panic here still becomes an error.
    let answer = catch_unwind(|| -> Result<GpuInfo, CudaError> {
        let devices = diagnose(
            libraries,
            || {
                CudaContext::device_count()
                    .map(|n| n.max(0) as usize)
                    .map_err(device_query_error)
            },
            ordinal,
        )?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::Device(format!("opening GPU {ordinal}: {e:?}")))?;
        let device =
            |e| CudaError::Device(format!("reading the properties of GPU {ordinal}: {e:?}"));
        let nccl = libraries
            .iter()
            .any(|s| s.lib == Lib::Nccl && s.problem().is_none());
        Ok(GpuInfo {
            ordinal,
            devices,
            name: ctx.name().map_err(device)?,
            compute_capability: ctx.compute_capability().map_err(device)?,
            memory_bytes: ctx.total_mem().map_err(device)?,
            nccl,
        })
    });
    answer.unwrap_or_else(|_| {
        Err(CudaError::Device(
            "a CUDA library could not be used (see the message above)".into(),
        ))
    })
}

/// No device (or a stub driver library) means no GPU; any other driver error is a GPU
/// machine whose driver does not work.
fn device_query_error(e: cudarc::driver::DriverError) -> DeviceQueryError {
    use cudarc::driver::sys::cudaError_enum as E;
    let text = format!("{e:?}");
    match e.0 {
        E::CUDA_ERROR_NO_DEVICE | E::CUDA_ERROR_STUB_LIBRARY => DeviceQueryError::Absent(text),
        _ => DeviceQueryError::Failed(text),
    }
}

/// See [`crate::detect::report`].
pub(crate) fn report() -> Report {
    let libraries = raw::libraries().to_vec();
    let first = probe(0);
    let driver_version = match &first {
        Err(CudaError::NoGpu(_)) if libraries.first().is_none_or(|d| d.problem().is_some()) => None,
        _ => catch_unwind(raw::driver_version).ok().and_then(Result::ok),
    };
    let devices = first.and_then(|info| {
        let mut all = vec![info.clone()];
        for ordinal in 1..info.devices {
            all.push(probe(ordinal)?);
        }
        Ok(all)
    });
    Report {
        libraries,
        driver_version,
        devices,
    }
}

/// A context on one GPU with the kernels compiled, stream ordering owned by the backend.
struct Device {
    ctx: Arc<CudaContext>,
    kernels: Arc<Kernels>,
}

fn open(ordinal: usize) -> Result<Device, CudaError> {
    probe(ordinal)?;
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| CudaError::NoGpu(format!("opening GPU {ordinal}: {e:?}")))?;
    // Before the first allocation: buffers made from here on carry no cudarc events.
    raw::own_stream_ordering(&ctx);
    let kernels = Arc::new(Kernels::compile(&ctx)?);
    Ok(Device { ctx, kernels })
}

/// Marks on CUDA events: computes on main, commits from the transport's own timed events
/// (recorded after the comm stream's wait for the data to send, so a commit's span is the
/// batch itself). Resolved against one origin event after the step.
struct EventClock {
    dev: Arc<RankDevice>,
    origin: Arc<CudaEvent>,
    events: Vec<CudaEvent>,
    comm_marks: usize,
}

#[derive(Clone, Copy)]
enum Mark {
    Event(usize),
    CommitStart(usize),
    CommitEnd(usize),
    Missing,
}

impl Clock for EventClock {
    type Mark = Mark;

    fn mark(&mut self, lane: Lane) -> Mark {
        match lane {
            Lane::Compute => {
                let Ok(event) = self.dev.event(true) else {
                    return Mark::Missing;
                };
                if event.record(&self.dev.main).is_err() {
                    return Mark::Missing;
                }
                self.events.push(event);
                Mark::Event(self.events.len() - 1)
            }
            Lane::Comm => {
                // The interpreter marks before and after every commit.
                let n = self.comm_marks;
                self.comm_marks += 1;
                if n % 2 == 0 {
                    Mark::CommitStart(n / 2)
                } else {
                    Mark::CommitEnd(n / 2)
                }
            }
        }
    }

    fn micros(&mut self, mark: &Mark) -> f64 {
        let since = |event: &CudaEvent| {
            self.origin
                .elapsed_ms(event)
                .map_or(0.0, |ms| f64::from(ms) * 1e3)
        };
        match *mark {
            Mark::Event(i) => since(&self.events[i]),
            Mark::CommitStart(k) | Mark::CommitEnd(k) => {
                let times = self
                    .dev
                    .commit_times
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match times.get(k) {
                    Some((start, end)) => since(if matches!(mark, Mark::CommitStart(_)) {
                        start
                    } else {
                        end
                    }),
                    None => 0.0,
                }
            }
            Mark::Missing => 0.0,
        }
    }
}

fn failure(rank: u32, e: impl std::fmt::Display) -> StepError {
    StepError::new(
        vec![RankFailure::on_rank(rank, Cause::Contract(e.to_string()))],
        Vec::new(),
    )
}

fn instructions(schedule: &ValidSchedule, ranks: impl Iterator<Item = u32>) -> usize {
    ranks
        .map(|r| schedule.schedule().ranks[r as usize].len())
        .sum()
}

/// Brings a step's losses and outputs from the devices of the ranks run here to the host,
/// after waiting for every one of their streams.
struct DeviceHost {
    /// The ranks run here with their devices.
    devs: Vec<(u32, Arc<RankDevice>)>,
    /// When issuing began.
    started: Instant,
    /// Host time spent issuing, set when every rank's list has been issued.
    dispatch_us: f64,
    /// Host time from the start of issuing to the end of the devices' work.
    step_us: f64,
}

impl DeviceHost {
    fn device(&self, rank: u32) -> Result<&RankDevice, RankFailure> {
        self.devs
            .iter()
            .find(|(r, _)| *r == rank)
            .map(|(_, dev)| dev.as_ref())
            .ok_or_else(|| {
                RankFailure::on_rank(rank, Cause::Contract(format!("no device for rank {rank}")))
            })
    }
}

fn device_failure(rank: u32, e: impl std::fmt::Display) -> RankFailure {
    RankFailure::on_rank(rank, Cause::Contract(e.to_string()))
}

impl Host<GpuStage> for DeviceHost {
    type Buffer = Vec<f32>;
    type Loss = f32;

    fn settle(&mut self) -> Result<(), RankFailure> {
        self.dispatch_us = self.started.elapsed().as_secs_f64() * 1e6;
        for (rank, dev) in &self.devs {
            dev.synchronize().map_err(|e| device_failure(*rank, e))?;
        }
        self.step_us = self.started.elapsed().as_secs_f64() * 1e6;
        Ok(())
    }

    fn loss(&mut self, rank: u32, loss: Tensor) -> Result<Option<f32>, RankFailure> {
        let values = self
            .device(rank)?
            .download(loss.buf())
            .map_err(|e| device_failure(rank, e))?;
        Ok(values.first().copied())
    }

    fn output(&mut self, rank: u32, output: Tensor) -> Result<Vec<f32>, RankFailure> {
        self.device(rank)?
            .download(output.buf())
            .map_err(|e| device_failure(rank, e))
    }
}

/// The reference model under a schedule on one GPU, every rank a virtual rank: one context,
/// three streams per rank, one host thread per rank, sends as device-to-device copies ordered
/// by events.
pub struct CudaPipeline {
    executor: Executor,
    config: GpuConfig,
    device: Device,
    devs: Vec<Arc<RankDevice>>,
    ranks: Vec<Stages<GpuStage>>,
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
                config.fb_two_streams,
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
        Ok(CudaPipeline {
            executor,
            config,
            device,
            devs,
            ranks,
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
                profile.then(|| EventClock {
                    dev: dev.clone(),
                    origin: origin.clone(),
                    events: Vec::new(),
                    comm_marks: 0,
                })
            })
            .collect();
        let feeds = self.executor.split_feed(&mut inputs, &mut targets);
        let options = self.executor.options();
        let transports =
            PeerTransport::network(&self.devs, self.config.comm, options.model, options.timeout);
        let mut host = DeviceHost {
            devs: (0..doc.num_ranks).zip(self.devs.iter().cloned()).collect(),
            started: Instant::now(),
            dispatch_us: 0.0,
            step_us: 0.0,
        };
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
        let dev = RankDevice::new(&device.ctx, &device.kernels, config.dtype, false, false)?;
        let stages = (0..spec.stages)
            .map(|s| GpuStage::new(&dev, spec, s))
            .collect::<Result<_, _>>()?;
        Ok(GpuSequential {
            _device: device,
            dev,
            stages,
        })
    }

    /// One step; losses and outputs on the host.
    pub fn step(&mut self, batch: &Batch, training: bool) -> Result<GpuStep, CudaError> {
        let started = Instant::now();
        let mut losses = Vec::new();
        let mut outputs = Vec::new();
        let last = self.stages.len() - 1;
        let stage_error = |e: dualpipe_executor::StageError| CudaError::Device(e.to_string());
        for (mb, (input, target)) in batch.inputs.iter().zip(&batch.targets).enumerate() {
            let mb = mb as u32;
            let mut x = self
                .dev
                .upload(input.data(), [input.rows(), input.cols()])?;
            let mut loss = None;
            for (s, stage) in self.stages.iter_mut().enumerate() {
                let target = if s == last {
                    Some(
                        self.dev
                            .upload(target.data(), [target.rows(), target.cols()])?,
                    )
                } else {
                    None
                };
                let forwarded = stage
                    .forward(Forward {
                        mb,
                        input: x,
                        target,
                        training,
                    })
                    .map_err(stage_error)?;
                x = forwarded.output;
                loss = loss.or(forwarded.loss);
            }
            let loss =
                loss.ok_or_else(|| CudaError::Device("the last stage computed no loss".into()))?;
            losses.push(self.dev.download(loss.buf())?.first().copied());
            outputs.push(Some(self.dev.download(x.buf())?));
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
        }
        self.dev.synchronize()?;
        let step_us = started.elapsed().as_secs_f64() * 1e6;
        Ok(GpuStep {
            losses,
            outputs,
            profile: None,
            dispatch_us: step_us,
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

/// This process's rank of a multi-process run: one GPU (`LOCAL_RANK`), NCCL to the others.
pub struct NcclRank {
    env: LaunchEnv,
    _device: Device,
    executor: Executor,
    dev: Arc<RankDevice>,
    stages: Stages<GpuStage>,
    transport: NcclTransport,
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
            config.fb_two_streams,
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
        let model = executor.options().model;
        Ok(NcclRank {
            env: env.clone(),
            _device: device,
            transport: NcclTransport::new(dev.clone(), comm, model, message_shape),
            executor,
            dev,
            stages: Stages::new(stages),
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
        self.dev.synchronize()
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
            Some(EventClock {
                dev: self.dev.clone(),
                origin,
                events: Vec::new(),
                comm_marks: 0,
            })
        } else {
            None
        };
        let feed = self
            .executor
            .split_feed(&mut inputs, &mut targets)
            .swap_remove(rank as usize);
        let mut host = DeviceHost {
            devs: vec![(rank, self.dev.clone())],
            started: Instant::now(),
            dispatch_us: 0.0,
            step_us: 0.0,
        };
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
