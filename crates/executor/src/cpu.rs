//! The CPU backend: one thread per rank in one process, an in-process transport, and the
//! host clock.
//!
//! Buffers move between ranks by value through one FIFO channel per ordered pair of ranks,
//! so nothing is copied; hand-offs between stages of one rank stay inside the interpreter.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use dualpipe_schedule::{ExecutionModel, Lane, ValidSchedule};

use crate::driver::{Kept, RankParts, StepOutput, drive};
use crate::error::{Cause, RankFailure, StepError};
use crate::interpret::{Executor, Feed, Options, Stages};
use crate::profile::Clock;
use crate::stage::{Stage, StageError};
use crate::transport::{CommError, CommErrorKind, Transport};

/// Wall-clock time from a shared origin, for the ranks of one process.
#[derive(Clone, Copy, Debug)]
pub struct HostClock {
    origin: Instant,
}

impl HostClock {
    /// A clock whose zero is `origin`.
    pub fn new(origin: Instant) -> Self {
        HostClock { origin }
    }
}

impl Clock for HostClock {
    type Mark = Instant;

    fn mark(&mut self, _lane: Lane) -> Instant {
        Instant::now()
    }

    fn micros(&mut self, mark: &Instant) -> f64 {
        mark.saturating_duration_since(self.origin).as_secs_f64() * 1e6
    }
}

/// The messages from one rank to another, in send order. Receives take them by position.
///
/// The two counters mirror the state for waiters that poll without the lock; they only
/// grow, and change only under the lock, so a waiter that checks them under the lock before
/// sleeping cannot miss a wake-up.
struct Channel<B> {
    state: Mutex<ChannelState<B>>,
    changed: Condvar,
    /// Messages sent so far.
    sent: AtomicU64,
    /// Receives the receiving rank has posted so far.
    recvs_posted: AtomicU64,
    /// Threads asleep on `changed` (under the lock): nobody to wake, no system call.
    sleepers: AtomicUsize,
}

struct ChannelState<B> {
    /// Messages from position `base` on; taken ones are `None` until the front is trimmed.
    messages: VecDeque<Option<B>>,
    base: u64,
}

/// What a wait waits for on a channel.
#[derive(Clone, Copy)]
enum Until {
    /// The message at this position has been sent.
    Sent(u64),
    /// The receive at this position has been posted.
    Posted(u64),
}

impl<B> Channel<B> {
    fn new() -> Self {
        Channel {
            state: Mutex::new(ChannelState {
                messages: VecDeque::new(),
                base: 0,
            }),
            changed: Condvar::new(),
            sent: AtomicU64::new(0),
            recvs_posted: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
        }
    }

    fn reached(&self, until: Until) -> bool {
        match until {
            Until::Sent(position) => self.sent.load(Ordering::Acquire) > position,
            Until::Posted(position) => self.recvs_posted.load(Ordering::Acquire) > position,
        }
    }

    fn send(&self, buffer: B) {
        let mut state = lock(&self.state);
        state.messages.push_back(Some(buffer));
        self.sent.fetch_add(1, Ordering::Release);
        self.wake(state);
    }

    fn post_recv(&self) {
        let state = lock(&self.state);
        self.recvs_posted.fetch_add(1, Ordering::Release);
        self.wake(state);
    }

    fn wake(&self, state: MutexGuard<'_, ChannelState<B>>) {
        let sleeping = self.sleepers.load(Ordering::Relaxed) > 0;
        drop(state);
        if sleeping {
            self.changed.notify_all();
        }
    }
}

/// Everything the ranks of one step share.
struct Network<B> {
    ranks: usize,
    channels: Vec<Channel<B>>,
    model: ExecutionModel,
    timeout: Duration,
    /// How long a wait polls before it sleeps.
    spin: Duration,
    /// More ranks than cores: poll by yielding the core, not by spinning.
    oversubscribed: bool,
    aborted: AtomicBool,
    abort: Mutex<Option<(u32, String)>>,
}

impl<B> Network<B> {
    fn new(ranks: usize, model: ExecutionModel, timeout: Duration) -> Self {
        Network {
            ranks,
            channels: (0..ranks * ranks).map(|_| Channel::new()).collect(),
            model,
            timeout,
            spin: Duration::from_micros(200),
            oversubscribed: ranks > cores(),
            aborted: AtomicBool::new(false),
            abort: Mutex::new(None),
        }
    }

    fn channel(&self, from: u32, to: u32) -> &Channel<B> {
        &self.channels[from as usize * self.ranks + to as usize]
    }

    fn aborted_error(&self) -> CommError {
        let (rank, reason) = lock(&self.abort)
            .clone()
            .unwrap_or((u32::MAX, "unknown".into()));
        CommError::new(CommErrorKind::Aborted { rank, reason })
    }

    fn abort(&self, rank: u32, reason: &str) {
        {
            let mut abort = lock(&self.abort);
            if abort.is_none() {
                *abort = Some((rank, reason.to_string()));
            }
        }
        self.aborted.store(true, Ordering::SeqCst);
        for channel in &self.channels {
            // Taking the lock orders the flag before any waiter's next check.
            drop(lock(&channel.state));
            channel.changed.notify_all();
        }
    }

    /// Waits on `channel` until `until`, the step is aborted, or the timeout passes; returns
    /// the channel's state, locked.
    fn wait_for<'a>(
        &self,
        channel: &'a Channel<B>,
        peer: u32,
        until: Until,
    ) -> Result<MutexGuard<'a, ChannelState<B>>, CommError> {
        if !channel.reached(until) {
            // A partner on another core is usually microseconds away: waiting for it awake
            // is much cheaper than sleeping and being woken.
            let deadline = Instant::now() + self.spin;
            while !channel.reached(until) && Instant::now() < deadline {
                if self.oversubscribed {
                    std::thread::yield_now();
                } else {
                    for _ in 0..32 {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut state = lock(&channel.state);
        loop {
            if channel.reached(until) {
                return Ok(state);
            }
            if self.aborted.load(Ordering::SeqCst) {
                return Err(self.aborted_error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::new(CommErrorKind::Timeout {
                    peer,
                    send: matches!(until, Until::Posted(_)),
                    waited: self.timeout,
                }));
            }
            channel.sleepers.fetch_add(1, Ordering::Relaxed);
            state = channel
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            channel.sleepers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The cores this process may use, asked once (the answer can take tens of microseconds).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A queued op: the peer and its position on the channel.
enum Queued<B> {
    Send { peer: u32, buffer: B },
    Recv { peer: u32, position: u64 },
}

/// One rank's end of the in-process network.
pub struct InProcess<B> {
    rank: u32,
    network: Arc<Network<B>>,
    queued: Vec<Queued<B>>,
    /// Per peer: sends queued so far (the position of the next one).
    sends: Vec<u64>,
    /// Per peer: receives queued so far.
    recvs: Vec<u64>,
    /// Positions of the sends of the batch being committed (blocking model).
    posted_sends: Vec<(usize, u32, u64)>,
}

/// A receive: from which peer, at which position of that channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InProcessTicket {
    peer: u32,
    position: u64,
}

impl<B> InProcess<B> {
    /// The transports of `ranks` ranks of one step, connected to each other, running
    /// `model` and waiting at most `timeout` for any message or matching receive.
    pub fn network(ranks: u32, model: ExecutionModel, timeout: Duration) -> Vec<InProcess<B>> {
        let network = Arc::new(Network::new(ranks as usize, model, timeout));
        (0..ranks)
            .map(|rank| InProcess {
                rank,
                network: Arc::clone(&network),
                queued: Vec::new(),
                sends: vec![0; ranks as usize],
                recvs: vec![0; ranks as usize],
                posted_sends: Vec::new(),
            })
            .collect()
    }

    fn check_abort(&self) -> Result<(), CommError> {
        if self.network.aborted.load(Ordering::SeqCst) {
            return Err(self.network.aborted_error());
        }
        Ok(())
    }
}

impl<B> Transport for InProcess<B> {
    type Buffer = B;
    type Ticket = InProcessTicket;

    fn queue_send(&mut self, peer: u32, buffer: B) -> Result<(), CommError> {
        if peer as usize >= self.network.ranks {
            return Err(CommError::new(CommErrorKind::Backend(format!(
                "no rank {peer} in a network of {} ranks",
                self.network.ranks
            ))));
        }
        self.queued.push(Queued::Send { peer, buffer });
        Ok(())
    }

    fn queue_recv(&mut self, peer: u32) -> Result<InProcessTicket, CommError> {
        let Some(count) = self.recvs.get_mut(peer as usize) else {
            return Err(CommError::new(CommErrorKind::Backend(format!(
                "no rank {peer} in a network of {} ranks",
                self.network.ranks
            ))));
        };
        let position = *count;
        *count += 1;
        self.queued.push(Queued::Recv { peer, position });
        Ok(InProcessTicket { peer, position })
    }

    fn commit(&mut self) -> Result<(), CommError> {
        self.check_abort()?;
        let network = Arc::clone(&self.network);
        let me = self.rank;
        self.posted_sends.clear();
        let mut recvs = Vec::new();
        for (op, queued) in self.queued.drain(..).enumerate() {
            match queued {
                Queued::Send { peer, buffer } => {
                    network.channel(me, peer).send(buffer);
                    let position = self.sends[peer as usize];
                    self.sends[peer as usize] += 1;
                    self.posted_sends.push((op, peer, position));
                }
                Queued::Recv { peer, position } => {
                    network.channel(peer, me).post_recv();
                    recvs.push((op, peer, position));
                }
            }
        }
        if network.model == ExecutionModel::Blocking {
            // The batch completes when every send's receive is posted and every receive's
            // message has arrived.
            for &(op, peer, position) in &self.posted_sends {
                let _matched = network
                    .wait_for(network.channel(me, peer), peer, Until::Posted(position))
                    .map_err(|e| e.at_op(op))?;
            }
            for (op, peer, position) in recvs {
                let _arrived = network
                    .wait_for(network.channel(peer, me), peer, Until::Sent(position))
                    .map_err(|e| e.at_op(op))?;
            }
        }
        Ok(())
    }

    fn wait(&mut self, ticket: InProcessTicket) -> Result<B, CommError> {
        let InProcessTicket { peer, position } = ticket;
        let network = &self.network;
        let mut state = network.wait_for(
            network.channel(peer, self.rank),
            peer,
            Until::Sent(position),
        )?;
        let at = (position - state.base) as usize;
        let buffer = state.messages[at].take().ok_or_else(|| {
            CommError::new(CommErrorKind::Backend(format!(
                "message {position} from rank {peer} was taken twice"
            )))
        })?;
        while let Some(None) = state.messages.front() {
            state.messages.pop_front();
            state.base += 1;
        }
        Ok(buffer)
    }

    fn abort(&mut self, reason: &str) {
        self.network.abort(self.rank, reason);
    }
}

/// A schedule running on CPU threads: one thread per rank, each replaying its rank's list
/// with the interpreter, connected by the in-process transport.
///
/// ```
/// use dualpipe_executor::{CpuPipeline, Options};
/// use dualpipe_reference::model::{Batch, ModelSpec, ReferenceStage};
/// use dualpipe_planner::{plan, Family, PlanRequest};
/// use dualpipe_schedule::ValidSchedule;
///
/// let schedule = plan(&PlanRequest::new(Family::DualPipeV, 2, 4)).unwrap();
/// let spec = ModelSpec { hidden: 8, rows: 4, stages: 4, seed: 1 };
/// let options = Options { message_shape: Some(spec.message_shape()), ..Options::default() };
/// let mut pipeline = CpuPipeline::new(schedule, options, |_rank, stage| Ok(ReferenceStage::new(&spec, stage))).unwrap();
/// let batch = Batch::synthetic(&spec, 4, 0);
/// let step = pipeline.step(batch.inputs, batch.targets).unwrap();
/// assert!(step.losses.iter().all(|loss| loss.is_some()));
/// ```
pub struct CpuPipeline<S: Stage> {
    executor: Executor,
    ranks: Vec<Stages<S>>,
}

impl<S> CpuPipeline<S>
where
    S: Stage + Send,
    S::Buffer: Send,
    S::Loss: Send,
{
    /// Prepares `schedule` and builds every rank's stages with `make_stage(rank, stage)`. A
    /// stage the schedule places on two ranks (DualPipe) is built twice, once per rank: build
    /// both copies with the same parameters.
    pub fn new(
        schedule: ValidSchedule,
        options: Options,
        mut make_stage: impl FnMut(u32, u32) -> Result<S, StageError>,
    ) -> Result<Self, RankFailure> {
        let executor = Executor::new(schedule, options);
        let mut ranks = Vec::new();
        for rank in 0..executor.schedule().schedule().num_ranks {
            let mut stages = Vec::new();
            for &stage in executor.stages_of(rank) {
                let built = make_stage(rank, stage).map_err(|e| {
                    RankFailure::on_rank(
                        rank,
                        Cause::Contract(format!("building stage {stage} failed: {e}")),
                    )
                })?;
                stages.push((stage, built));
            }
            ranks.push(Stages::new(stages));
        }
        Ok(CpuPipeline { executor, ranks })
    }

    /// The prepared schedule and options.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// The stages of `rank`.
    pub fn stages(&self, rank: u32) -> &Stages<S> {
        &self.ranks[rank as usize]
    }

    /// The stages of `rank`, to update or inspect between steps.
    pub fn stages_mut(&mut self, rank: u32) -> &mut Stages<S> {
        &mut self.ranks[rank as usize]
    }

    /// Every copy of stage `stage`, in ascending rank order.
    pub fn copies(&self, stage: u32) -> Vec<&S> {
        self.ranks.iter().filter_map(|s| s.get(stage)).collect()
    }

    /// Runs one step over the micro-batches `inputs` with their `targets` (indexed by
    /// micro-batch; `targets` may be empty for a forward-only step). After a training step,
    /// the copies of every stage held by several ranks hold the sum of their gradients.
    pub fn step(
        &mut self,
        inputs: Vec<S::Buffer>,
        targets: Vec<S::Buffer>,
    ) -> Result<StepOutput<S::Buffer, S::Loss>, StepError> {
        let num_ranks = self.executor.schedule().schedule().num_ranks;
        let options = self.executor.options();
        let mut inputs: Vec<Option<S::Buffer>> = inputs.into_iter().map(Some).collect();
        let mut targets: Vec<Option<S::Buffer>> = targets.into_iter().map(Some).collect();
        let feeds = self.executor.split_feed(&mut inputs, &mut targets);
        let transports = InProcess::network(num_ranks, options.model, options.timeout);
        let clock = HostClock::new(Instant::now());
        let parts = self
            .ranks
            .iter_mut()
            .zip(transports)
            .zip(feeds)
            .enumerate()
            .map(|(rank, ((stages, transport), feed))| RankParts {
                rank: rank as u32,
                stages,
                transport,
                feed,
                clock: Some(clock),
            })
            .collect();
        drive(&self.executor, parts, &mut Kept)
    }
}

/// Runs one step of every rank of `executor`, each on its own thread with its stages,
/// transport and feed (all indexed by rank) and the host clock, through [`drive`]: after a
/// training step the copies of a stage hold the sum of their gradients. [`CpuPipeline::step`]
/// runs on it with the in-process transport; another transport (a network one, or one that
/// injects faults in tests) plugs in here.
pub fn run_on_threads<S, T>(
    executor: &Executor,
    ranks: &mut [Stages<S>],
    transports: Vec<T>,
    feeds: Vec<Feed<S::Buffer>>,
) -> Result<StepOutput<S::Buffer, S::Loss>, StepError>
where
    S: Stage + Send,
    S::Buffer: Send,
    S::Loss: Send,
    T: Transport<Buffer = S::Buffer> + Send,
{
    let clock = HostClock::new(Instant::now());
    let parts = ranks
        .iter_mut()
        .zip(transports)
        .zip(feeds)
        .enumerate()
        .map(|(rank, ((stages, transport), feed))| RankParts {
            rank: rank as u32,
            stages,
            transport,
            feed,
            clock: Some(clock),
        })
        .collect();
    drive(executor, parts, &mut Kept)
}
