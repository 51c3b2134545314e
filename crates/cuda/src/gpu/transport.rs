//! The two GPU transports. Neither orders the rank's streams by itself: each commit issues
//! the rank's stream plan up to its batch (`ready` on main, comm's wait for it), posts the
//! batch on comm, and issues what closes it (`done` on comm; in the blocking model main's
//! wait for it), so a received buffer is read only after a wait the plan issues for it.
//!
//! - [`PeerTransport`]: virtual ranks in one process on one GPU. Buffers travel between the
//!   ranks' host threads through the CPU backend's in-process channels (which give matching,
//!   the blocking model, timeouts and aborts). The sender's batch records a *sent* event on
//!   its comm stream (after comm's wait for `ready`) that travels with the buffer; the
//!   receiver's batch waits for the buffer on the host, makes its comm stream wait for that
//!   event and copies the data device to device on comm. With [`CommMode::Move`] the copy is
//!   left out (communication as a no-op): the receiver's comm only waits for the event and the
//!   receiver reads the sender's buffer.
//! - [`NcclTransport`]: one process per GPU; every batch is one `ncclGroupStart` ...
//!   `ncclGroupEnd` on the rank's comm stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::CudaEvent;
use dualpipe_executor::{CommError, CommErrorKind, InProcess, InProcessTicket, Transport};
use dualpipe_schedule::ExecutionModel;

use super::raw::{self, Buf, NcclComm};
use super::{GpuError, RankDevice, Tensor};

pub(crate) use crate::api::CommMode;

fn backend(e: GpuError) -> CommError {
    CommError::new(CommErrorKind::Backend(e.to_string()))
}

/// A buffer between virtual ranks, with the event after which it may be read.
pub(crate) struct Parcel {
    tensor: Tensor,
    /// Set by the sender's batch on its comm stream, before the parcel leaves.
    sent: Arc<Mutex<Option<Arc<CudaEvent>>>>,
}

/// One virtual rank's end.
pub(crate) struct PeerTransport {
    dev: Arc<RankDevice>,
    inner: InProcess<Parcel>,
    mode: CommMode,
    /// The sent-event slot of the batch being queued.
    slot: Arc<Mutex<Option<Arc<CudaEvent>>>>,
    sends_queued: bool,
    recvs_queued: Vec<InProcessTicket>,
    /// Receives landed by their batch, by ticket, until the interpreter takes them.
    arrived: Vec<(InProcessTicket, Tensor)>,
}

impl PeerTransport {
    /// The transports of `devs.len()` virtual ranks, connected.
    pub fn network(
        devs: &[Arc<RankDevice>],
        mode: CommMode,
        model: ExecutionModel,
        timeout: Duration,
    ) -> Vec<Self> {
        InProcess::network(devs.len() as u32, model, timeout)
            .into_iter()
            .zip(devs)
            .map(|(inner, dev)| PeerTransport {
                dev: dev.clone(),
                inner,
                mode,
                slot: Arc::new(Mutex::new(None)),
                sends_queued: false,
                recvs_queued: Vec::new(),
                arrived: Vec::new(),
            })
            .collect()
    }

    /// Makes comm wait for the sender's event of `parcel`; returns its buffer, now freed
    /// through this rank's graveyard.
    fn await_parcel(&self, parcel: Parcel) -> Result<Tensor, GpuError> {
        let Parcel { mut tensor, sent } = parcel;
        let sent = sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = sent.ok_or_else(|| {
            GpuError::Shape("a message arrived before its sender's batch recorded it".into())
        })?;
        tensor.rehome(&self.dev);
        self.dev
            .comm
            .wait(&sent)
            .map_err(|e| GpuError::driver("waiting for the sender", e))?;
        Ok(tensor)
    }

    /// Lands a buffer on comm (after [`PeerTransport::await_parcel`]): a copy, or the
    /// sender's buffer itself with [`CommMode::Move`].
    fn land(&self, tensor: Tensor) -> Result<Tensor, GpuError> {
        match self.mode {
            CommMode::Move => Ok(tensor),
            CommMode::Copy => {
                let comm = &self.dev.comm;
                let mut copy = self.dev.alloc(comm, [tensor.rows(), tensor.cols()])?;
                match (copy.buf_mut(), tensor.buf()) {
                    (Buf::F32(d), Buf::F32(s)) => comm.memcpy_dtod(s, d),
                    (Buf::Bf16(d), Buf::Bf16(s)) => comm.memcpy_dtod(s, d),
                    _ => return Err(GpuError::Shape("a message of another element type".into())),
                }
                .map_err(|e| GpuError::driver("copying a message", e))?;
                // The sender's buffer goes to this rank's graveyard, freed once the copy on
                // comm is done.
                drop(tensor);
                Ok(copy)
            }
        }
    }
}

impl Transport for PeerTransport {
    type Buffer = Tensor;
    type Ticket = InProcessTicket;

    fn queue_send(&mut self, peer: u32, tensor: Tensor) -> Result<(), CommError> {
        self.sends_queued = true;
        self.inner.queue_send(
            peer,
            Parcel {
                tensor,
                sent: self.slot.clone(),
            },
        )
    }

    fn queue_recv(&mut self, peer: u32) -> Result<InProcessTicket, CommError> {
        let ticket = self.inner.queue_recv(peer)?;
        self.recvs_queued.push(ticket);
        Ok(ticket)
    }

    /// The plan's batch: after comm's wait for `ready`, the sends leave with a sent event
    /// recorded on comm, and every receive of the batch is waited for on the host (a valid
    /// schedule is free of deadlock even when every batch waits for its partners) and landed
    /// on comm, before the plan records `done`.
    fn commit(&mut self) -> Result<(), CommError> {
        let dev = self.dev.clone();
        dev.bind().map_err(backend)?;
        let index = dev.plan_batch().map_err(backend)?;
        if self.sends_queued {
            let sent = dev.record(&dev.comm).map_err(backend)?;
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent);
            self.slot = Arc::new(Mutex::new(None));
            self.sends_queued = false;
        }
        self.inner.commit()?;
        let mut landing = Vec::new();
        for ticket in std::mem::take(&mut self.recvs_queued) {
            let parcel = self.inner.wait(ticket)?;
            landing.push((ticket, self.await_parcel(parcel).map_err(backend)?));
        }
        // Timed after comm's waits for the senders, so the batch's span is its copies (empty
        // for a batch of sends only, or without copies).
        let start = dev.comm_mark().map_err(backend)?;
        for (ticket, tensor) in landing {
            let tensor = self.land(tensor).map_err(backend)?;
            self.arrived.push((ticket, tensor));
        }
        if let Some(start) = start {
            let end = dev.event(true).map_err(backend)?;
            end.record(&dev.comm)
                .map_err(|e| backend(GpuError::driver("recording", e)))?;
            dev.commit_times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((start, end));
        }
        dev.plan_close(index).map_err(backend)?;
        dev.seal_and_sweep().map_err(backend)
    }

    /// The buffer landed by its batch. The plan's waits before the compute that takes it are
    /// issued here, between the interpreter's start and ready marks, so the timeline shows
    /// them as waiting for data.
    fn wait(&mut self, ticket: InProcessTicket) -> Result<Tensor, CommError> {
        self.dev.bind().map_err(backend)?;
        self.dev.plan_leading().map_err(backend)?;
        let at = self
            .arrived
            .iter()
            .position(|(t, _)| *t == ticket)
            .ok_or_else(|| {
                CommError::new(CommErrorKind::Backend(
                    "a receive was taken before its batch landed it".into(),
                ))
            })?;
        Ok(self.arrived.swap_remove(at).1)
    }

    fn abort(&mut self, reason: &str) {
        self.inner.abort(reason);
    }
}

/// A queued NCCL op.
enum Queued {
    Send { peer: u32, tensor: Tensor },
    Recv { peer: u32, ticket: usize },
}

/// One process's end of an NCCL run.
pub(crate) struct NcclTransport {
    dev: Arc<RankDevice>,
    comm: NcclComm,
    message_shape: [usize; 2],
    queued: Vec<Queued>,
    next_ticket: usize,
    arrived: HashMap<usize, Tensor>,
    aborted: Option<String>,
}

impl NcclTransport {
    pub fn new(dev: Arc<RankDevice>, comm: NcclComm, message_shape: [usize; 2]) -> Self {
        NcclTransport {
            dev,
            comm,
            message_shape,
            queued: Vec::new(),
            next_ticket: 0,
            arrived: HashMap::new(),
            aborted: None,
        }
    }

    /// The communicator (for the gradient exchange between stage copies).
    pub fn comm(&self) -> &NcclComm {
        &self.comm
    }
}

impl Transport for NcclTransport {
    type Buffer = Tensor;
    type Ticket = usize;

    fn queue_send(&mut self, peer: u32, tensor: Tensor) -> Result<(), CommError> {
        self.queued.push(Queued::Send { peer, tensor });
        Ok(())
    }

    fn queue_recv(&mut self, peer: u32) -> Result<usize, CommError> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queued.push(Queued::Recv { peer, ticket });
        Ok(ticket)
    }

    fn commit(&mut self) -> Result<(), CommError> {
        if let Some(reason) = &self.aborted {
            return Err(CommError::new(CommErrorKind::Backend(format!(
                "the step was aborted: {reason}"
            ))));
        }
        let dev = self.dev.clone();
        dev.bind().map_err(backend)?;
        let queued = std::mem::take(&mut self.queued);
        // `ready` on main and comm's wait for it, as the plan has them before the batch.
        let index = dev.plan_batch().map_err(backend)?;
        let start = dev.comm_mark().map_err(backend)?;
        let mut received = Vec::new();
        let mut sent = Vec::new();
        // The group is ended even when an operation fails, so NCCL's per-thread group state is
        // not left open; the driver then aborts the step, which aborts the communicator.
        raw::nccl_group(backend, || {
            for (op, q) in queued.into_iter().enumerate() {
                match q {
                    Queued::Send { peer, tensor } => {
                        self.comm
                            .send(tensor.buf(), peer)
                            .map_err(|e| backend(e).at_op(op))?;
                        sent.push(tensor);
                    }
                    Queued::Recv { peer, ticket } => {
                        let mut tensor =
                            dev.alloc(&dev.comm, self.message_shape).map_err(backend)?;
                        self.comm
                            .recv(tensor.buf_mut(), peer)
                            .map_err(|e| backend(e).at_op(op))?;
                        received.push((ticket, tensor));
                    }
                }
            }
            Ok(())
        })?;
        if let Some(start) = start {
            let end = dev.event(true).map_err(backend)?;
            end.record(&dev.comm)
                .map_err(|e| backend(GpuError::driver("recording", e)))?;
            dev.commit_times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((start, end));
        }
        // `done` on comm and, in the blocking model, main's wait for it.
        dev.plan_close(index).map_err(backend)?;
        self.arrived.extend(received);
        // Freed once the group on comm is done (the graveyard's events).
        drop(sent);
        dev.seal_and_sweep().map_err(backend)
    }

    /// The buffer its batch received; the plan's waits before the compute that takes it are
    /// issued here (between the interpreter's start and ready marks).
    fn wait(&mut self, ticket: usize) -> Result<Tensor, CommError> {
        self.dev.bind().map_err(backend)?;
        self.dev.plan_leading().map_err(backend)?;
        self.arrived.remove(&ticket).ok_or_else(|| {
            CommError::new(CommErrorKind::Backend(format!(
                "receive {ticket} was never committed"
            )))
        })
    }

    fn abort(&mut self, reason: &str) {
        // `ncclCommAbort` ends this rank's part of every pending operation, so the other
        // processes' operations with it fail (or stop at their host timeout) instead of
        // waiting for it. The communicator is unusable afterwards: later commits fail.
        self.aborted = Some(reason.to_string());
        let _ = self.comm.abort();
    }
}

/// Exchanges the four gradient tensors of a stage with the rank holding its other copy and
/// adds them, so both copies hold the sum (DualPipe). Both ranks call it for the same stages
/// in the same order.
pub(crate) fn exchange_gradients(
    dev: &RankDevice,
    comm: &NcclComm,
    peer: u32,
    grads: &mut [cudarc::driver::CudaSlice<f32>; 4],
) -> Result<(), GpuError> {
    dev.bind()?;
    // The gradients are written on main; comm must see them.
    let ready = dev.record(&dev.main)?;
    dev.comm
        .wait(&ready)
        .map_err(|e| GpuError::driver("waiting for gradients", e))?;
    let mut theirs = Vec::with_capacity(4);
    for g in grads.iter() {
        theirs.push(raw::alloc(&dev.comm, crate::kernels::DType::F32, g.len())?);
    }
    raw::nccl_group(
        |e| e,
        || {
            for (mine, other) in grads.iter().zip(theirs.iter_mut()) {
                comm.send_f32(mine, peer)?;
                comm.recv(other, peer)?;
            }
            Ok(())
        },
    )?;
    let done = dev.record(&dev.comm)?;
    dev.main
        .wait(&done)
        .map_err(|e| GpuError::driver("waiting for gradients", e))?;
    for (mine, other) in grads.iter_mut().zip(&theirs) {
        dev.kernels.accumulate(&dev.main, mine, other)?;
    }
    // f32 addition commutes, so both copies get the same bits.
    for other in theirs {
        dev.graveyard.bury(other);
    }
    Ok(())
}
