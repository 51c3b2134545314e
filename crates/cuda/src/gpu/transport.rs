//! The two GPU transports.
//!
//! - [`PeerTransport`]: virtual ranks in one process on one GPU. Buffers travel between the
//!   ranks' host threads through the CPU backend's in-process channels (which give matching,
//!   the blocking model, timeouts and aborts); the data moves by a device-to-device copy on the
//!   receiving rank's comm stream, after an event the sender recorded on its main stream when
//!   it committed. With [`CommMode::Move`] the copy is left out (communication as a no-op) and
//!   the receiver waits for the sender's event directly.
//! - [`NcclTransport`]: one process per GPU; every commit is one `ncclGroupStart` ...
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
    /// Set by the sender at its commit, before the parcel leaves.
    ready: Arc<Mutex<Option<Arc<CudaEvent>>>>,
}

/// One virtual rank's end.
pub(crate) struct PeerTransport {
    dev: Arc<RankDevice>,
    inner: InProcess<Parcel>,
    mode: CommMode,
    model: ExecutionModel,
    /// The ready-event slot of the batch being queued.
    slot: Arc<Mutex<Option<Arc<CudaEvent>>>>,
    sends_queued: bool,
    recvs_queued: Vec<InProcessTicket>,
    /// Receives already copied at their commit (blocking model), by ticket.
    arrived: Vec<(InProcessTicket, Tensor)>,
    /// Commits issued so far in this step (the index of the next one's timing).
    commits: usize,
    /// Async model: the commit that posted each receive not yet taken.
    batch_of: Vec<(InProcessTicket, usize)>,
    /// Async model, profiling: whether a copy has already set the start of each commit's span.
    spanned: Vec<bool>,
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
                model,
                slot: Arc::new(Mutex::new(None)),
                sends_queued: false,
                recvs_queued: Vec::new(),
                arrived: Vec::new(),
                commits: 0,
                batch_of: Vec::new(),
                spanned: Vec::new(),
            })
            .collect()
    }

    /// Takes a parcel into this rank: copies it on comm (or adopts the sender's buffer) and
    /// returns the tensor with the event main must wait for. `batch`: in the async model, the
    /// commit that posted the receive, whose timed span (when profiling) is made to cover this
    /// copy: its copies are issued when a compute takes the data, after the commit itself.
    fn land(&mut self, parcel: Parcel, batch: Option<usize>) -> Result<Tensor, GpuError> {
        let Parcel { mut tensor, ready } = parcel;
        let sent = ready.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = sent.ok_or_else(|| {
            GpuError::Shape("a message arrived before its sender committed".into())
        })?;
        tensor.rehome(&self.dev);
        match self.mode {
            CommMode::Move => {
                tensor.ready = Some(sent);
                Ok(tensor)
            }
            CommMode::Copy => {
                let dev = self.dev.clone();
                let comm = &dev.comm;
                comm.wait(&sent)
                    .map_err(|e| GpuError::driver("waiting for the sender", e))?;
                // Taken after the wait for the sender, so the span is the copy itself.
                let timed = match batch {
                    Some(k) if self.dev.profile => {
                        let start = self.dev.event(true)?;
                        start
                            .record(comm)
                            .map_err(|e| GpuError::driver("recording", e))?;
                        Some((k, start))
                    }
                    _ => None,
                };
                let mut copy = self.dev.alloc(comm, [tensor.rows(), tensor.cols()])?;
                match (copy.buf_mut(), tensor.buf()) {
                    (Buf::F32(d), Buf::F32(s)) => comm.memcpy_dtod(s, d),
                    (Buf::Bf16(d), Buf::Bf16(s)) => comm.memcpy_dtod(s, d),
                    _ => return Err(GpuError::Shape("a message of another element type".into())),
                }
                .map_err(|e| GpuError::driver("copying a message", e))?;
                if let Some((k, start)) = timed {
                    let end = self.dev.event(true)?;
                    end.record(comm)
                        .map_err(|e| GpuError::driver("recording", e))?;
                    self.stretch(k, start, end);
                }
                copy.ready = Some(self.dev.record(comm)?);
                Ok(copy)
            }
        }
    }
}

impl PeerTransport {
    /// Makes commit `k`'s timed span run from its first copy's start to its latest copy's
    /// end (copies go in order on comm, so the latest issued ends last).
    fn stretch(&mut self, k: usize, start: CudaEvent, end: CudaEvent) {
        let mut times = self
            .dev
            .commit_times
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (Some(span), Some(spanned)) = (times.get_mut(k), self.spanned.get_mut(k)) else {
            return;
        };
        if !*spanned {
            span.0 = start;
            *spanned = true;
        }
        span.1 = end;
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
                ready: self.slot.clone(),
            },
        )
    }

    fn queue_recv(&mut self, peer: u32) -> Result<InProcessTicket, CommError> {
        let ticket = self.inner.queue_recv(peer)?;
        self.recvs_queued.push(ticket);
        Ok(ticket)
    }

    fn commit(&mut self) -> Result<(), CommError> {
        self.dev.bind().map_err(backend)?;
        let timed = self.dev.profile;
        let start = if timed {
            Some(self.dev.event(true).map_err(backend)?)
        } else {
            None
        };
        if self.sends_queued {
            let ready = self.dev.record(&self.dev.main).map_err(backend)?;
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(ready);
            self.slot = Arc::new(Mutex::new(None));
            self.sends_queued = false;
        }
        if let Some(start) = &start {
            start
                .record(&self.dev.comm)
                .map_err(|e| backend(GpuError::driver("recording", e)))?;
        }
        self.inner.commit()?;
        let batch = self.commits;
        self.commits += 1;
        self.spanned.push(false);
        let recvs = std::mem::take(&mut self.recvs_queued);
        if self.model == ExecutionModel::Async {
            self.batch_of.extend(recvs.iter().map(|&t| (t, batch)));
        }
        if self.model == ExecutionModel::Blocking {
            // Every message of the batch has arrived on the host: copy them now, and make
            // main wait for the batch as the reference's wait() does.
            for ticket in recvs {
                let parcel = self.inner.wait(ticket)?;
                let mut tensor = self.land(parcel, None).map_err(backend)?;
                if let Some(ev) = tensor.ready.take() {
                    self.dev
                        .main
                        .wait(&ev)
                        .map_err(|e| backend(GpuError::driver("waiting", e)))?;
                }
                self.arrived.push((ticket, tensor));
            }
        }
        if let Some(start) = start {
            let end = self.dev.event(true).map_err(backend)?;
            end.record(&self.dev.comm)
                .map_err(|e| backend(GpuError::driver("recording", e)))?;
            self.dev
                .commit_times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((start, end));
        }
        self.dev.seal_and_sweep().map_err(backend)
    }

    fn wait(&mut self, ticket: InProcessTicket) -> Result<Tensor, CommError> {
        let mut tensor = self.wait_beside(ticket)?;
        // The wait goes on main here, between the interpreter's start and ready marks, so
        // the timeline shows it as waiting for data.
        self.dev
            .make_ready(&mut tensor, &self.dev.main)
            .map_err(backend)?;
        Ok(tensor)
    }

    /// The tensor with its event still on it: the backward half of an `FB` waits for it on
    /// side (`GpuStage::forward_backward`), so main's forward half does not.
    fn wait_beside(&mut self, ticket: InProcessTicket) -> Result<Tensor, CommError> {
        let landed = self.arrived.iter().position(|(t, _)| *t == ticket);
        match landed {
            Some(at) => Ok(self.arrived.swap_remove(at).1),
            None => {
                let parcel = self.inner.wait(ticket)?;
                self.dev.bind().map_err(backend)?;
                let batch = self
                    .batch_of
                    .iter()
                    .position(|(t, _)| *t == ticket)
                    .map(|at| self.batch_of.swap_remove(at).1);
                self.land(parcel, batch).map_err(backend)
            }
        }
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
    model: ExecutionModel,
    message_shape: [usize; 2],
    queued: Vec<Queued>,
    next_ticket: usize,
    arrived: HashMap<usize, Tensor>,
    aborted: Option<String>,
}

impl NcclTransport {
    pub fn new(
        dev: Arc<RankDevice>,
        comm: NcclComm,
        model: ExecutionModel,
        message_shape: [usize; 2],
    ) -> Self {
        NcclTransport {
            dev,
            comm,
            model,
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
        if queued.iter().any(|q| matches!(q, Queued::Send { .. })) {
            let ready = dev.record(&dev.main).map_err(backend)?;
            dev.comm
                .wait(&ready)
                .map_err(|e| backend(GpuError::driver("waiting for sent data", e)))?;
        }
        let start = if dev.profile {
            let e = dev.event(true).map_err(backend)?;
            e.record(&dev.comm)
                .map_err(|e| backend(GpuError::driver("recording", e)))?;
            Some(e)
        } else {
            None
        };
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
        let done = dev.record(&dev.comm).map_err(backend)?;
        if let Some(start) = start {
            let end = dev.event(true).map_err(backend)?;
            end.record(&dev.comm)
                .map_err(|e| backend(GpuError::driver("recording", e)))?;
            dev.commit_times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((start, end));
        }
        if self.model == ExecutionModel::Blocking {
            dev.main
                .wait(&done)
                .map_err(|e| backend(GpuError::driver("waiting for the batch", e)))?;
        }
        for (ticket, mut tensor) in received {
            if self.model == ExecutionModel::Async {
                tensor.ready = Some(done.clone());
            }
            self.arrived.insert(ticket, tensor);
        }
        drop(sent);
        dev.seal_and_sweep().map_err(backend)
    }

    fn wait(&mut self, ticket: usize) -> Result<Tensor, CommError> {
        let mut tensor = self.wait_beside(ticket)?;
        self.dev
            .make_ready(&mut tensor, &self.dev.main)
            .map_err(backend)?;
        Ok(tensor)
    }

    /// The tensor with its batch's event still on it, for the backward half of an `FB`.
    fn wait_beside(&mut self, ticket: usize) -> Result<Tensor, CommError> {
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
