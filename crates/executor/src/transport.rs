//! The interface a backend implements to move buffers between ranks.

use std::fmt;
use std::time::Duration;

/// One rank's end of the communication between ranks.
///
/// The interpreter queues sends and receives in instruction order and posts them as one batch
/// at each `commit`. Messages carry no tags: on every ordered pair of ranks, the k-th send
/// from one rank to the other pairs with the k-th receive the other rank queues from it, so a
/// transport must keep issue order per peer (as NCCL does).
///
/// The execution model (`Blocking` or `Async` in
/// [`ExecutionModel`](dualpipe_schedule::ExecutionModel)) is the transport's choice:
/// - blocking: [`commit`](Transport::commit) returns only when every op of its batch has met
///   its partner (each send's receive is posted, each receive's data has arrived);
/// - async: `commit` launches the batch and returns, and [`wait`](Transport::wait) makes the
///   compute that needs a received buffer wait for it (on a GPU, a stream wait rather than a
///   host wait).
///
/// Either way the interpreter gets a received buffer only through `wait`, after the commit
/// that posted its receive.
pub trait Transport {
    /// What moves: the stages' activations and gradients.
    type Buffer;
    /// A queued receive, redeemed by [`wait`](Transport::wait).
    type Ticket;

    /// Queues a send of `buffer` to `peer`, posted at the next commit.
    fn queue_send(&mut self, peer: u32, buffer: Self::Buffer) -> Result<(), CommError>;

    /// Queues a receive from `peer`, posted at the next commit.
    fn queue_recv(&mut self, peer: u32) -> Result<Self::Ticket, CommError>;

    /// Posts every queued send and receive as one batch. On failure, [`CommError::op`] says
    /// which queued op (counted from 0 in queue order) could not complete, where known.
    fn commit(&mut self) -> Result<(), CommError>;

    /// The buffer of a receive whose batch was committed, once it has arrived.
    fn wait(&mut self, ticket: Self::Ticket) -> Result<Self::Buffer, CommError>;

    /// Ends the step on every rank: this rank failed with `reason`. Every other rank's pending
    /// and later operations fail with [`CommErrorKind::Aborted`].
    fn abort(&mut self, reason: &str);
}

/// Why a communication op failed.
#[derive(Clone, Debug, PartialEq)]
pub struct CommError {
    /// The position of the failed op in the batch being committed (from 0, in queue order),
    /// when the failure belongs to one op of a commit.
    pub op: Option<usize>,
    /// What happened.
    pub kind: CommErrorKind,
}

/// What happened to a communication op.
#[derive(Clone, Debug, PartialEq)]
pub enum CommErrorKind {
    /// Nothing arrived from `peer` (a receive) or `peer` never posted the matching receive (a
    /// send under the blocking model) within the timeout.
    Timeout {
        /// The other rank.
        peer: u32,
        /// Whether the op was a send.
        send: bool,
        /// How long it waited.
        waited: Duration,
    },
    /// Another rank failed and ended the step.
    Aborted {
        /// The rank that failed.
        rank: u32,
        /// Its failure, in short.
        reason: String,
    },
    /// The backend failed in a way of its own.
    Backend(String),
}

impl CommError {
    /// An error of `kind` not tied to one op of a batch.
    pub fn new(kind: CommErrorKind) -> Self {
        CommError { op: None, kind }
    }

    /// The same error, tied to op `op` of the batch being committed.
    pub fn at_op(mut self, op: usize) -> Self {
        self.op = Some(op);
        self
    }
}

impl fmt::Display for CommErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommErrorKind::Timeout {
                peer,
                send: false,
                waited,
            } => write!(
                f,
                "no message arrived from rank {peer} within {}",
                show_duration(*waited)
            ),
            CommErrorKind::Timeout {
                peer,
                send: true,
                waited,
            } => write!(
                f,
                "rank {peer} did not post the matching receive within {}",
                show_duration(*waited)
            ),
            CommErrorKind::Aborted { rank, reason } => {
                write!(
                    f,
                    "the step was ended by rank {rank}, which failed: {reason}"
                )
            }
            CommErrorKind::Backend(message) => f.write_str(message),
        }
    }
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl std::error::Error for CommError {}

/// A transport borrowed for one step: a backend that keeps its transport between steps (one
/// process of a multi-process run) lends it to the driver.
impl<T: Transport + ?Sized> Transport for &mut T {
    type Buffer = T::Buffer;
    type Ticket = T::Ticket;

    fn queue_send(&mut self, peer: u32, buffer: Self::Buffer) -> Result<(), CommError> {
        (**self).queue_send(peer, buffer)
    }

    fn queue_recv(&mut self, peer: u32) -> Result<Self::Ticket, CommError> {
        (**self).queue_recv(peer)
    }

    fn commit(&mut self) -> Result<(), CommError> {
        (**self).commit()
    }

    fn wait(&mut self, ticket: Self::Ticket) -> Result<Self::Buffer, CommError> {
        (**self).wait(ticket)
    }

    fn abort(&mut self, reason: &str) {
        (**self).abort(reason);
    }
}

/// A duration as people read it: `250 ms`, `1.5 s`.
pub(crate) fn show_duration(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1e3;
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1e3)
    }
}
