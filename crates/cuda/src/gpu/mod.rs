//! The GPU backend proper (the `cuda` feature): device resources of a rank, device tensors,
//! the reference model's stages on cuBLAS and NVRTC kernels, the transports and the pipelines.
//!
//! - `device.rs`: finding (`probe`, `report`) and opening a GPU;
//! - `raw.rs`: every `unsafe` call; `memory.rs`: freeing dropped buffers;
//! - `stage.rs`: the reference model's stages; `transport.rs`: the two transports;
//! - `clock.rs`: the CUDA-event clock; `host.rs`: the step driver's host hook;
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

use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError};
use dualpipe_executor::Payload;

use crate::error::CudaError;
use crate::kernels::DType;
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
}

impl GpuError {
    pub fn driver(what: &str, code: DriverError) -> Self {
        GpuError::Driver {
            what: what.to_string(),
            code,
        }
    }
}

impl From<GpuError> for CudaError {
    fn from(e: GpuError) -> Self {
        CudaError::Device(e.to_string())
    }
}

/// One rank's device resources: its three streams (see `plan`), a cuBLAS handle for each
/// compute stream, the compiled kernels, and where its dropped buffers wait to be freed.
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
    pub fb_two_streams: bool,
    /// Timed start and end events of each commit's batch on comm, when profiling.
    pub commit_times: Mutex<Vec<(CudaEvent, CudaEvent)>>,
    pub profile: bool,
    /// Untimed events for [`RankDevice::record`], reused once nothing else holds them.
    events: Mutex<EventPool>,
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
        fb_two_streams: bool,
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
            fb_two_streams,
            commit_times: Mutex::new(Vec::new()),
            profile,
            events: Mutex::new(EventPool::default()),
        }))
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
            ready: None,
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

    /// Makes `stream` wait until `tensor` is ready, once.
    pub fn make_ready(&self, tensor: &mut Tensor, stream: &CudaStream) -> Result<(), GpuError> {
        if let Some(event) = tensor.ready.take() {
            stream
                .wait(&event)
                .map_err(|e| GpuError::driver("waiting for an event", e))?;
        }
        Ok(())
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
/// temporary. `ready`, when set, is the event every stream must wait for before reading it
/// (a received buffer in the async model). Dropping it hands the memory to its rank's
/// graveyard.
pub(crate) struct Tensor {
    buf: Option<Buf>,
    shape: [usize; 2],
    pub ready: Option<Arc<CudaEvent>>,
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
