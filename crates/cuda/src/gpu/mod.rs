//! The GPU backend proper (the `cuda` feature): device resources of a rank, device tensors,
//! the reference model's stages on cuBLAS and NVRTC kernels, the transports and the pipelines.
//!
//! - `device.rs`: finding (`probe`, `report`) and opening a GPU;
//! - `raw.rs`: every `unsafe` call; `memory.rs`: freeing dropped buffers;
//! - `stage.rs`: the reference model's stages; `transport.rs`: the two transports;
//! - `clock.rs`: the CUDA-event clock; `host.rs`: the step driver's host hook;
//! - here: a rank's device resources ([`RankDevice`]), which issue the rank's stream plan
//!   ([`crate::plan`]) through the shared issuing loop ([`crate::issue`]) as its stages and
//!   transport run: the plan's events are the only ordering between the rank's streams;
//! - `pipeline.rs` (virtual ranks), `nccl.rs` (one process per GPU), `sequential.rs` (the
//!   single-stream reference and the backend under the shared test bodies).

mod clock;
pub(crate) mod device;
mod host;
mod memory;
pub(crate) mod nccl;
pub(crate) mod pipeline;
pub(crate) mod raw;
#[cfg(test)]
mod reduce_check;
pub(crate) mod sequential;
mod stage;
mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError};
use dualpipe_executor::Payload;
use dualpipe_schedule::{ExecutionModel, Instruction};

use crate::error::CudaError;
use crate::issue::{Cursor, IssueError, StreamDevice, Want};
use crate::kernels::DType;
use crate::plan::{Event, Part, RankPlan, Stream, StreamOp};
use memory::Graveyard;
use raw::{Buf, Kernels};

/// A failure inside the GPU backend; becomes a [`CudaError::Device`] or a stage error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GpuError {
    #[error("{what}: CUDA driver error {code:?}")]
    Driver { what: String, code: DriverError },
    #[error("{0}")]
    Library(String),
    #[error("{0}")]
    Shape(String),
    /// The host timeout passed before the device finished.
    #[error("{}", crate::watchdog::timeout_message(*.0))]
    Timeout(std::time::Duration),
    /// The stream plan could not be issued, or does not match what the interpreter runs.
    #[error("{0}")]
    Plan(String),
}

impl GpuError {
    pub fn driver(what: &str, code: DriverError) -> Self {
        GpuError::Driver {
            what: what.to_string(),
            code,
        }
    }
}

impl From<IssueError<GpuError>> for GpuError {
    /// A timeout stays a timeout (an NCCL run aborts its communicator on it); anything else
    /// names the rank and the plan's operation.
    fn from(e: IssueError<GpuError>) -> Self {
        match e {
            IssueError::Device {
                error: GpuError::Timeout(limit),
                ..
            } => GpuError::Timeout(limit),
            other => GpuError::Plan(other.to_string()),
        }
    }
}

impl From<GpuError> for CudaError {
    fn from(e: GpuError) -> Self {
        CudaError::Device(e.to_string())
    }
}

/// One rank's device resources: its three streams (see `plan`), a cuBLAS handle for each
/// compute stream, the compiled kernels, where its dropped buffers wait to be freed, and
/// during a step the rank's stream plan with the events it recorded so far.
pub(crate) struct RankDevice {
    pub ctx: Arc<CudaContext>,
    pub main: Arc<CudaStream>,
    pub side: Arc<CudaStream>,
    pub comm: Arc<CudaStream>,
    pub blas_main: CudaBlas,
    pub blas_side: CudaBlas,
    pub kernels: Arc<Kernels>,
    pub graveyard: Arc<Graveyard>,
    pub dtype: DType,
    /// Timed start and end events of each commit's batch on comm, when profiling.
    pub commit_times: Mutex<Vec<(CudaEvent, CudaEvent)>>,
    pub profile: bool,
    /// Untimed events for [`RankDevice::record`], reused once nothing else holds them.
    events: Mutex<EventPool>,
    /// The step's plan, from [`RankDevice::begin_plan`] to [`RankDevice::finish_plan`].
    plan: Mutex<Option<PlanState>>,
}

/// A step's plan on one rank: where issuing stands and the events its records made (held
/// until the host has waited for the streams at the end of the step).
struct PlanState {
    cursor: Cursor,
    events: HashMap<Event, Arc<CudaEvent>>,
}

/// The rank's streams as the plan's [`StreamDevice`]: records and waits are CUDA events on
/// the real streams; a compute or a batch issues nothing here (the stage call or transport
/// commit that asked for it issues its kernels or its batch right after, on the stream the
/// plan names); the host sync waits for the three streams, within `limit`.
struct GpuStreams<'a> {
    dev: &'a RankDevice,
    events: &'a mut HashMap<Event, Arc<CudaEvent>>,
    limit: Option<std::time::Duration>,
}

impl StreamDevice for GpuStreams<'_> {
    type Error = GpuError;

    fn record(&mut self, stream: Stream, event: Event) -> Result<(), GpuError> {
        let recorded = self.dev.record(self.dev.stream(stream))?;
        if self.events.insert(event, recorded).is_some() {
            return Err(GpuError::Plan(format!("{event} recorded twice")));
        }
        Ok(())
    }

    fn wait(&mut self, stream: Stream, event: Event) -> Result<(), GpuError> {
        let recorded = self.events.get(&event).ok_or_else(|| {
            GpuError::Plan(format!(
                "{stream} waits for {event}, which was never recorded"
            ))
        })?;
        self.dev
            .stream(stream)
            .wait(recorded)
            .map_err(|e| GpuError::driver(&format!("{stream} waiting for {event}"), e))
    }

    fn compute(&mut self, _: Stream, _: usize, _: Part) -> Result<(), GpuError> {
        Ok(())
    }

    fn batch(&mut self, _: usize) -> Result<(), GpuError> {
        Ok(())
    }

    fn host_sync(&mut self) -> Result<(), GpuError> {
        self.dev.synchronize_within(self.limit)
    }
}

/// The most events a rank keeps for reuse; more are made and dropped as needed.
const EVENT_POOL_LIMIT: usize = 512;

#[derive(Default)]
struct EventPool {
    events: Vec<Arc<CudaEvent>>,
    /// Where the next search starts (round robin, so a free event is usually found at once).
    next: usize,
}

impl RankDevice {
    pub fn new(
        ctx: &Arc<CudaContext>,
        kernels: &Arc<Kernels>,
        dtype: DType,
        profile: bool,
    ) -> Result<Arc<Self>, GpuError> {
        let stream = || {
            ctx.new_stream()
                .map_err(|e| GpuError::driver("creating a stream", e))
        };
        let (main, side, comm) = (stream()?, stream()?, stream()?);
        let blas = |s: &Arc<CudaStream>| {
            CudaBlas::new(s.clone())
                .map_err(|e| GpuError::Library(format!("creating a cuBLAS handle failed: {e:?}")))
        };
        Ok(Arc::new(RankDevice {
            blas_main: blas(&main)?,
            blas_side: blas(&side)?,
            graveyard: Arc::new(Graveyard::new(ctx.clone())),
            ctx: ctx.clone(),
            main,
            side,
            comm,
            kernels: kernels.clone(),
            dtype,
            commit_times: Mutex::new(Vec::new()),
            profile,
            events: Mutex::new(EventPool::default()),
            plan: Mutex::new(None),
        }))
    }

    /// The CUDA stream of one of the plan's streams.
    pub fn stream(&self, stream: Stream) -> &Arc<CudaStream> {
        match stream {
            Stream::Main => &self.main,
            Stream::Side => &self.side,
            Stream::Comm => &self.comm,
        }
    }

    /// Starts a step under `plan`, the plan of the rank whose list is `instructions`, made
    /// for `model`. From now on the stages and the transport issue the plan's operations
    /// ([`RankDevice::plan_compute`] and the others) until [`RankDevice::finish_plan`].
    pub fn begin_plan(
        &self,
        plan: Arc<RankPlan>,
        instructions: Arc<[Instruction]>,
        model: ExecutionModel,
    ) {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = Some(PlanState {
            cursor: Cursor::new(plan, instructions, model),
            events: HashMap::new(),
        });
    }

    /// Runs `f` on the step's cursor with this rank's streams as the device; `None` when no
    /// plan is running (the single-stream reference, work between steps).
    fn with_plan<R>(
        &self,
        f: impl FnOnce(&mut Cursor, &mut GpuStreams<'_>) -> Result<R, IssueError<GpuError>>,
    ) -> Result<Option<R>, GpuError> {
        let mut guard = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = guard.as_mut() else {
            return Ok(None);
        };
        let mut device = GpuStreams {
            dev: self,
            events: &mut state.events,
            limit: None,
        };
        Ok(Some(f(&mut state.cursor, &mut device)?))
    }

    /// The waits the plan issues before its next compute (a received buffer is being taken).
    pub fn plan_leading(&self) -> Result<(), GpuError> {
        self.with_plan(|cursor, device| cursor.leading(device))
            .map(|_| ())
    }

    /// Issues the plan up to its next compute, which must be `want`, and returns the stream
    /// it goes to, its instruction and part; `(main, None)` when no plan is running.
    pub fn plan_compute(&self, want: Want) -> Result<(Stream, Option<(usize, Part)>), GpuError> {
        Ok(self
            .with_plan(|cursor, device| cursor.compute(device, want))?
            .map_or((Stream::Main, None), |(stream, index, part)| {
                (stream, Some((index, part)))
            }))
    }

    /// Issues the plan up to its next batch (the ready event and comm's wait for it) and
    /// returns its commit's index. Only during a step.
    pub fn plan_batch(&self) -> Result<usize, GpuError> {
        self.with_plan(|cursor, device| cursor.batch(device))?
            .ok_or_else(|| GpuError::Plan("a batch was committed outside a step's plan".into()))
    }

    /// Issues what closes instruction `index` (an `FB`'s join, a batch's done event and, in
    /// the blocking model, main's wait for it).
    pub fn plan_close(&self, index: usize) -> Result<(), GpuError> {
        self.with_plan(|cursor, device| cursor.close(device, index))
            .map(|_| ())
    }

    /// The end of a step: issues the rest of the plan up to its host sync, which waits for the
    /// rank's three streams within `limit`, and ends the plan (its events are released). A
    /// rank that stopped early, or no plan, still waits for the streams.
    pub fn finish_plan(&self, limit: Option<std::time::Duration>) -> Result<(), GpuError> {
        let mut guard = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        let finished = match guard.as_mut() {
            Some(state) => {
                let mut device = GpuStreams {
                    dev: self,
                    events: &mut state.events,
                    limit,
                };
                state.cursor.finish(&mut device)
            }
            None => Ok(false),
        };
        let waited = match finished {
            Ok(true) => Ok(()),
            // The rank stopped early, or no plan ran: nothing was issued, wait here.
            Ok(false) => self.synchronize_within(limit),
            // The host sync itself failed (a timeout, a driver error): do not wait again.
            Err(
                e @ IssueError::Device {
                    op: StreamOp::HostSync,
                    ..
                },
            ) => Err(e.into()),
            // An operation before it failed: still wait for the streams, then report it.
            Err(e) => self.synchronize_within(limit).and(Err(e.into())),
        };
        // Released only after the host has waited (or gave up waiting): the events may
        // still be waited for on the device until then.
        *guard = None;
        waited
    }

    /// Makes this rank's context current on the calling thread (cuBLAS calls need it).
    pub fn bind(&self) -> Result<(), GpuError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| GpuError::driver("binding the context", e))
    }

    /// A tensor over `buf` whose memory goes back through this rank's graveyard.
    pub fn tensor(&self, buf: Buf, shape: [usize; 2]) -> Tensor {
        Tensor {
            buf: Some(buf),
            shape,
            home: self.graveyard.clone(),
        }
    }

    /// `len` uninitialised elements of the model's type on `stream`, as a tensor.
    pub fn alloc(&self, stream: &Arc<CudaStream>, shape: [usize; 2]) -> Result<Tensor, GpuError> {
        Ok(self.tensor(raw::alloc(stream, self.dtype, shape[0] * shape[1])?, shape))
    }

    /// Host `f32` values onto the device in the model's type, on main.
    pub fn upload(&self, values: &[f32], shape: [usize; 2]) -> Result<Tensor, GpuError> {
        let host = self
            .main
            .clone_htod(values)
            .map_err(|e| GpuError::driver("copying to the device", e))?;
        let buf = match self.dtype {
            DType::F32 => Buf::F32(host),
            DType::Bf16 => {
                let mut out = raw::alloc(&self.main, DType::Bf16, values.len())?;
                self.kernels.convert_from_f32(&self.main, &mut out, &host)?;
                self.graveyard.bury(Buf::F32(host));
                out
            }
        };
        Ok(self.tensor(buf, shape))
    }

    /// Device values as host `f32`, after everything issued on main (waits for main).
    pub fn download(&self, buf: &Buf) -> Result<Vec<f32>, GpuError> {
        let copy = |e| GpuError::driver("copying to the host", e);
        match buf {
            Buf::F32(s) => self.main.clone_dtoh(s).map_err(copy),
            Buf::Bf16(_) => {
                let mut wide: CudaSlice<f32> = self.main.alloc_zeros(buf.len()).map_err(copy)?;
                self.kernels.convert_to_f32(&self.main, &mut wide, buf)?;
                self.main.clone_dtoh(&wide).map_err(copy)
            }
        }
    }

    /// Closes the batch of buffers dropped so far (events on all three streams) and frees
    /// the batches already finished with.
    pub fn seal_and_sweep(&self) -> Result<(), GpuError> {
        self.graveyard.seal(&[&self.main, &self.side, &self.comm])?;
        self.graveyard.sweep()
    }

    /// Waits on the host for the rank's streams (the end of a step) and frees every dropped
    /// buffer.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        for stream in [&self.main, &self.side, &self.comm] {
            stream
                .synchronize()
                .map_err(|e| GpuError::driver("synchronizing a stream", e))?;
        }
        self.graveyard.clear_after_sync();
        Ok(())
    }

    /// [`RankDevice::synchronize`] within `limit` (no limit: `None`): polls events recorded
    /// on the three streams instead of blocking, so a stalled NCCL operation becomes
    /// [`GpuError::Timeout`] instead of a wait without end.
    pub fn synchronize_within(&self, limit: Option<std::time::Duration>) -> Result<(), GpuError> {
        let Some(limit) = limit else {
            return self.synchronize();
        };
        let marks = [
            self.record(&self.main)?,
            self.record(&self.side)?,
            self.record(&self.comm)?,
        ];
        crate::watchdog::wait_within(limit, || {
            for mark in &marks {
                let done = mark
                    .try_is_complete()
                    .map_err(|e| GpuError::driver("querying an event", e))?;
                if !done {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .map_err(|wait| match wait {
            crate::watchdog::Wait::Failed(e) => e,
            crate::watchdog::Wait::TimedOut(limit) => GpuError::Timeout(limit),
        })?;
        self.graveyard.clear_after_sync();
        Ok(())
    }

    /// A fresh event; timed when `timed`.
    pub fn event(&self, timed: bool) -> Result<CudaEvent, GpuError> {
        let flags = timed.then_some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        self.ctx
            .new_event(flags)
            .map_err(|e| GpuError::driver("creating an event", e))
    }

    /// When profiling, a timed event recorded on comm now (the start of a batch's span);
    /// `None` otherwise.
    pub fn comm_mark(&self) -> Result<Option<CudaEvent>, GpuError> {
        if !self.profile {
            return Ok(None);
        }
        let event = self.event(true)?;
        event
            .record(&self.comm)
            .map_err(|e| GpuError::driver("recording", e))?;
        Ok(Some(event))
    }

    /// Records a fresh event on `stream`.
    pub fn record(&self, stream: &CudaStream) -> Result<Arc<CudaEvent>, GpuError> {
        let event = self.pooled_event()?;
        event
            .record(stream)
            .map_err(|e| GpuError::driver("recording an event", e))?;
        Ok(event)
    }

    /// An untimed event from the rank's pool: one that only the pool holds (so no wait or
    /// query can still refer to its last recording; waits already issued keep the recording
    /// they saw), or a new one.
    fn pooled_event(&self) -> Result<Arc<CudaEvent>, GpuError> {
        let mut pool = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let n = pool.events.len();
        for step in 0..n {
            let at = (pool.next + step) % n;
            if Arc::strong_count(&pool.events[at]) == 1 {
                pool.next = (at + 1) % n;
                return Ok(pool.events[at].clone());
            }
        }
        let event = Arc::new(self.event(false)?);
        if n < EVENT_POOL_LIMIT {
            pool.events.push(event.clone());
        }
        Ok(event)
    }
}

/// A row-major matrix on the device: an activation, a gradient, a loss (`[1, 1]`), or a
/// temporary. It carries no event: the rank's stream plan orders its producer before its
/// readers. Dropping it hands the memory to its rank's graveyard.
pub(crate) struct Tensor {
    buf: Option<Buf>,
    shape: [usize; 2],
    home: Arc<Graveyard>,
}

impl Tensor {
    pub fn buf(&self) -> &Buf {
        self.buf
            .as_ref()
            .expect("a tensor holds its buffer until dropped")
    }

    pub fn buf_mut(&mut self) -> &mut Buf {
        self.buf
            .as_mut()
            .expect("a tensor holds its buffer until dropped")
    }

    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    pub fn cols(&self) -> usize {
        self.shape[1]
    }

    /// The buffer itself, taken out of the graveyard's care: it is freed when the `Buf` is
    /// dropped (a parameter, which lives as long as its stage). `None` only for a tensor
    /// already emptied, which never happens outside `Drop`.
    pub fn into_buf(mut self) -> Option<Buf> {
        self.buf.take()
    }

    /// From now on, freed through `dev`'s graveyard (a buffer moving to another rank).
    pub fn rehome(&mut self, dev: &RankDevice) {
        self.home = dev.graveyard.clone();
    }
}

impl Payload for Tensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.home.bury(buf);
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {:?})",
            self.shape,
            self.buf.as_ref().map(Buf::dtype)
        )
    }
}
