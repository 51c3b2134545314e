//! The one issuing loop over a rank's [`RankPlan`]: every stream operation that orders a
//! rank's streams goes through [`Issuer`], onto a [`StreamDevice`].
//!
//! Two devices implement [`StreamDevice`]:
//! - the recording stand-in of [`crate::replay`], which queues each operation on its stream
//!   and then runs the queues on the CPU with values and vector clocks;
//! - the GPU backend (`gpu/`, feature `cuda`), which records and waits for CUDA events on the
//!   rank's real streams and synchronises the host at [`StreamOp::HostSync`].
//!
//! Replay issues a whole plan at once ([`issue`]). The GPU issues it piece by piece while the
//! executor's interpreter runs the rank's list, because the interpreter holds the data (which
//! buffer each compute takes, where its result goes): a [`Cursor`] issues the ordering
//! operations that lead up to a compute or a batch, hands the compute or batch to the caller
//! (a stage call or a transport commit, checked against the instruction the plan names), and
//! issues the operations that close it. On the GPU, [`StreamDevice::compute`] and
//! [`StreamDevice::batch`] issue nothing themselves: they mark where the stage's kernels or
//! the transport's batch go, which the caller issues at once on the stream the operation
//! names. Either way each operation of the plan is issued exactly once, in the plan's order,
//! through [`Issuer::issue_next`]; a stage call or a commit the plan does not expect next is
//! an [`IssueError::Mismatch`] naming both.

use std::borrow::Borrow;
use std::sync::Arc;

use dualpipe_schedule::{ExecutionModel, Instruction, Work};

use crate::plan::{Event, Part, RankPlan, Stream, StreamOp};

/// A device with one rank's three streams, as the plan addresses them. Every method issues
/// one operation; none waits for the device except [`StreamDevice::host_sync`].
pub trait StreamDevice {
    /// What a failed operation reports.
    type Error;

    /// Records `event` on `stream`, after everything issued to it so far.
    fn record(&mut self, stream: Stream, event: Event) -> Result<(), Self::Error>;

    /// Makes `stream` wait for `event` (recorded earlier by this rank's plan); the host goes
    /// on.
    fn wait(&mut self, stream: Stream, event: Event) -> Result<(), Self::Error>;

    /// The compute of instruction `index` (its `part`) goes to `stream` now.
    fn compute(&mut self, stream: Stream, index: usize, part: Part) -> Result<(), Self::Error>;

    /// The batch of the commit at `index` goes to comm now.
    fn batch(&mut self, commit: usize) -> Result<(), Self::Error>;

    /// The host waits for every stream of the rank.
    fn host_sync(&mut self) -> Result<(), Self::Error>;
}

/// A failure while issuing a rank's plan.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssueError<E> {
    /// The device failed to issue an operation.
    #[error("rank {rank}: issuing plan op {at} ({op}) failed: {error}")]
    Device {
        /// The rank.
        rank: u32,
        /// Position of the operation in the plan.
        at: usize,
        /// The operation.
        op: StreamOp,
        /// The device's error.
        error: E,
    },
    /// The caller asked for something other than what the plan issues next.
    #[error("rank {rank}: {wanted}, but the plan's next operation is {found}")]
    Mismatch {
        /// The rank.
        rank: u32,
        /// What was asked for.
        wanted: String,
        /// What the plan has next (or that it has ended).
        found: String,
    },
}

/// Where one rank's issuing stands: its plan and the position of the next operation.
/// `P` is how the plan is held: borrowed (`&RankPlan`) or shared (`Arc<RankPlan>`).
#[derive(Clone, Debug)]
pub struct Issuer<P> {
    plan: P,
    next: usize,
}

impl<P: Borrow<RankPlan>> Issuer<P> {
    /// At the start of `plan`.
    pub fn new(plan: P) -> Self {
        Issuer { plan, next: 0 }
    }

    /// The plan.
    pub fn plan(&self) -> &RankPlan {
        self.plan.borrow()
    }

    /// How many operations have been issued.
    pub fn position(&self) -> usize {
        self.next
    }

    /// The next operation, if any is left.
    pub fn peek(&self) -> Option<StreamOp> {
        self.plan().ops.get(self.next).copied()
    }

    /// Whether a compute or a batch is still to be issued (a rank that stopped early).
    pub fn work_left(&self) -> bool {
        self.plan().ops[self.next..]
            .iter()
            .any(|op| matches!(op, StreamOp::Compute(..) | StreamOp::Batch(_)))
    }

    /// Issues the next operation on `device` and returns it; `None` once the plan has ended.
    /// The only place an operation of the plan reaches a device.
    pub fn issue_next<D: StreamDevice>(
        &mut self,
        device: &mut D,
    ) -> Result<Option<StreamOp>, IssueError<D::Error>> {
        let Some(op) = self.peek() else {
            return Ok(None);
        };
        let issued = match op {
            StreamOp::Record(stream, event) => device.record(stream, event),
            StreamOp::Wait(stream, event) => device.wait(stream, event),
            StreamOp::Compute(stream, index, part) => device.compute(stream, index, part),
            StreamOp::Batch(commit) => device.batch(commit),
            StreamOp::HostSync => device.host_sync(),
        };
        let at = self.next;
        self.next += 1;
        issued.map_err(|error| IssueError::Device {
            rank: self.plan().rank,
            at,
            op,
            error,
        })?;
        Ok(Some(op))
    }

    /// Issues operations while `more` accepts the next one.
    pub fn issue_while<D: StreamDevice>(
        &mut self,
        device: &mut D,
        mut more: impl FnMut(&StreamOp) -> bool,
    ) -> Result<(), IssueError<D::Error>> {
        while self.peek().is_some_and(|op| more(&op)) {
            self.issue_next(device)?;
        }
        Ok(())
    }

    /// Issues every operation left: the issuing loop.
    pub fn issue_rest<D: StreamDevice>(
        &mut self,
        device: &mut D,
    ) -> Result<(), IssueError<D::Error>> {
        while self.issue_next(device)?.is_some() {}
        Ok(())
    }

    fn mismatch<E>(&self, wanted: String) -> IssueError<E> {
        IssueError::Mismatch {
            rank: self.plan().rank,
            wanted,
            found: match self.peek() {
                Some(op) => format!("op {} ({op})", self.next),
                None => "none: the plan has ended".into(),
            },
        }
    }
}

/// Issues the whole of `plan` on `device`, in order.
pub fn issue<D: StreamDevice>(plan: &RankPlan, device: &mut D) -> Result<(), IssueError<D::Error>> {
    Issuer::new(plan).issue_rest(device)
}

/// What a stage call of the interpreter computes, to be checked against the instruction the
/// plan's next compute names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// A forward (`F`) of this work item.
    Forward(Work),
    /// A backward (`B`) of this work item.
    Backward(Work),
    /// A weight gradient (`W`) of this work item.
    Weight(Work),
    /// An `FB` of these two work items (either half).
    ForwardBackward {
        /// The forward half.
        f: Work,
        /// The backward half.
        b: Work,
    },
}

impl Want {
    fn matches(self, instruction: &Instruction) -> bool {
        match (self, *instruction) {
            (Want::Forward(w), Instruction::Forward(x))
            | (Want::Weight(w), Instruction::Weight(x)) => w == x,
            (Want::Backward(w), Instruction::Backward { work, .. }) => w == work,
            (Want::ForwardBackward { f, b }, Instruction::ForwardBackward { f: x, b: y }) => {
                f == x && b == y
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Want {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Want::Forward(w) => write!(f, "a forward of stage {} micro-batch {}", w.stage, w.mb),
            Want::Backward(w) => write!(f, "a backward of stage {} micro-batch {}", w.stage, w.mb),
            Want::Weight(w) => write!(
                f,
                "a weight gradient of stage {} micro-batch {}",
                w.stage, w.mb
            ),
            Want::ForwardBackward { f: x, b } => write!(
                f,
                "an FB of stage {} micro-batch {} and stage {} micro-batch {}",
                x.stage, x.mb, b.stage, b.mb
            ),
        }
    }
}

/// One rank's plan issued alongside the interpreter running the rank's list: what the GPU
/// backend's stages and transports call, at fixed points, so that the device receives
/// exactly the plan's operations in the plan's order.
///
/// - [`Cursor::leading`]: a received buffer is taken (the interpreter's `Transport::wait`):
///   the waits that order the next compute after its data;
/// - [`Cursor::compute`]: a stage call, once per half of a split `FB`: issues what leads up
///   to the plan's next compute, checks that it is the instruction the call computes, and
///   returns the stream it goes to; [`Cursor::close`] after the call (an `FB`'s join);
/// - [`Cursor::batch`] and [`Cursor::close`]: a commit;
/// - [`Cursor::finish`]: the end of the step (the host sync).
#[derive(Clone, Debug)]
pub struct Cursor {
    issuer: Issuer<Arc<RankPlan>>,
    instructions: Arc<[Instruction]>,
    model: ExecutionModel,
}

impl Cursor {
    /// At the start of `plan`, for the rank whose list is `instructions`, run under `model`
    /// (the model the plan was made for).
    pub fn new(
        plan: Arc<RankPlan>,
        instructions: Arc<[Instruction]>,
        model: ExecutionModel,
    ) -> Self {
        Cursor {
            issuer: Issuer::new(plan),
            instructions,
            model,
        }
    }

    /// The issuer (position, what is left).
    pub fn issuer(&self) -> &Issuer<Arc<RankPlan>> {
        &self.issuer
    }

    /// Issues the ordering operations before the next compute, batch or host sync.
    pub fn leading<D: StreamDevice>(&mut self, device: &mut D) -> Result<(), IssueError<D::Error>> {
        self.issuer.issue_while(device, |op| {
            matches!(op, StreamOp::Record(..) | StreamOp::Wait(..))
        })
    }

    /// Issues up to and including the next compute, which must compute `want`; returns its
    /// stream, instruction and part.
    pub fn compute<D: StreamDevice>(
        &mut self,
        device: &mut D,
        want: Want,
    ) -> Result<(Stream, usize, Part), IssueError<D::Error>> {
        self.leading(device)?;
        match self.issuer.peek() {
            Some(StreamOp::Compute(stream, index, part))
                if self
                    .instructions
                    .get(index)
                    .is_some_and(|instruction| want.matches(instruction)) =>
            {
                self.issuer.issue_next(device)?;
                Ok((stream, index, part))
            }
            _ => Err(self
                .issuer
                .mismatch(format!("the interpreter computes {want}"))),
        }
    }

    /// Issues up to and including the next batch; returns its commit's index.
    pub fn batch<D: StreamDevice>(
        &mut self,
        device: &mut D,
    ) -> Result<usize, IssueError<D::Error>> {
        self.leading(device)?;
        match self.issuer.peek() {
            Some(StreamOp::Batch(commit)) => {
                self.issuer.issue_next(device)?;
                Ok(commit)
            }
            _ => Err(self
                .issuer
                .mismatch("the interpreter commits a batch".into())),
        }
    }

    /// Issues what closes instruction `index` (a compute or a commit just issued): an `FB`'s
    /// join on side and main's wait for it, a batch's `done` on comm and, in the blocking
    /// model, main's wait for it. What leads up to the next instruction stays for later.
    pub fn close<D: StreamDevice>(
        &mut self,
        device: &mut D,
        index: usize,
    ) -> Result<(), IssueError<D::Error>> {
        let blocking = self.model == ExecutionModel::Blocking;
        self.issuer.issue_while(device, |op| match *op {
            StreamOp::Record(_, Event::FbJoin(i) | Event::Done(i))
            | StreamOp::Wait(_, Event::FbJoin(i)) => i == index,
            StreamOp::Wait(Stream::Main, Event::Done(i)) => blocking && i == index,
            _ => false,
        })
    }

    /// The end of the step: issues what is left up to and including the host sync. A rank
    /// that stopped early (a compute or batch left) issues nothing and returns `Ok(false)`:
    /// its caller must still wait for the streams itself.
    pub fn finish<D: StreamDevice>(
        &mut self,
        device: &mut D,
    ) -> Result<bool, IssueError<D::Error>> {
        if self.issuer.work_left() {
            return Ok(false);
        }
        self.leading(device)?;
        match self.issuer.peek() {
            Some(StreamOp::HostSync) => {
                self.issuer.issue_next(device)?;
                // Nothing follows the host sync in a plan; anything that does is issued too.
                self.issuer.issue_rest(device)?;
                Ok(true)
            }
            _ => Err(self.issuer.mismatch("the step ends".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlanOptions, plan};
    use dualpipe_executor::{
        Backward, CommError, Executor, Feed, Forward, Forwarded, HostClock, InProcess,
        InProcessTicket, Kept, Options, Overlapped, Payload, RankParts, Stage, StageError, Stages,
        Transport, drive,
    };
    use dualpipe_planner::{Family, PlanRequest};
    use dualpipe_schedule::ValidSchedule;
    use std::sync::Mutex;

    /// Keeps every operation it is given, in order.
    #[derive(Default)]
    struct Recorder(Vec<StreamOp>);

    impl StreamDevice for Recorder {
        type Error = String;
        fn record(&mut self, stream: Stream, event: Event) -> Result<(), String> {
            self.0.push(StreamOp::Record(stream, event));
            Ok(())
        }
        fn wait(&mut self, stream: Stream, event: Event) -> Result<(), String> {
            self.0.push(StreamOp::Wait(stream, event));
            Ok(())
        }
        fn compute(&mut self, stream: Stream, index: usize, part: Part) -> Result<(), String> {
            self.0.push(StreamOp::Compute(stream, index, part));
            Ok(())
        }
        fn batch(&mut self, commit: usize) -> Result<(), String> {
            self.0.push(StreamOp::Batch(commit));
            Ok(())
        }
        fn host_sync(&mut self) -> Result<(), String> {
            self.0.push(StreamOp::HostSync);
            Ok(())
        }
    }

    fn schedules() -> Vec<ValidSchedule> {
        let mut out = Vec::new();
        for family in Family::ALL {
            for (n, c) in [(1, 2), (2, 4), (4, 8)] {
                for forward_only in [false, true] {
                    let mut request = PlanRequest::new(family, n, c);
                    request.forward_only = forward_only;
                    if let Ok(schedule) = dualpipe_planner::plan(&request) {
                        out.push(schedule);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_loop_issues_exactly_the_plan_in_order() {
        let schedule = dualpipe_planner::plan(&PlanRequest::new(Family::DualPipeV, 4, 10)).unwrap();
        for options in PlanOptions::ALL {
            for rank_plan in plan(&schedule, options) {
                let mut device = Recorder::default();
                issue(&rank_plan, &mut device).unwrap();
                assert_eq!(device.0, rank_plan.ops);
            }
        }
    }

    #[test]
    fn a_device_error_names_the_rank_and_the_operation() {
        struct Failing;
        impl StreamDevice for Failing {
            type Error = &'static str;
            fn record(&mut self, _: Stream, _: Event) -> Result<(), &'static str> {
                Err("no event left")
            }
            fn wait(&mut self, _: Stream, _: Event) -> Result<(), &'static str> {
                Ok(())
            }
            fn compute(&mut self, _: Stream, _: usize, _: Part) -> Result<(), &'static str> {
                Ok(())
            }
            fn batch(&mut self, _: usize) -> Result<(), &'static str> {
                Ok(())
            }
            fn host_sync(&mut self) -> Result<(), &'static str> {
                Ok(())
            }
        }
        let schedule = dualpipe_planner::plan(&PlanRequest::new(Family::OneFOneB, 2, 4)).unwrap();
        let plans = plan(&schedule, PlanOptions::ALL[0]);
        let error = issue(&plans[0], &mut Failing).unwrap_err();
        let at = plans[0]
            .ops
            .iter()
            .position(|op| matches!(op, StreamOp::Record(..)))
            .unwrap();
        assert_eq!(
            error.to_string(),
            format!(
                "rank 0: issuing plan op {at} ({}) failed: no event left",
                plans[0].ops[at]
            )
        );
    }

    // The GPU backend's call points, on the CPU: a stage and a transport that do what
    // `gpu/stage.rs` and `gpu/transport.rs` do with the cursor, under the executor's own
    // interpreter and driver, recording what reaches the device.

    /// A rank's cursor and what it issued, shared by the rank's stages and its transport.
    type Shared = Arc<Mutex<(Cursor, Recorder)>>;

    fn on<R>(
        shared: &Shared,
        f: impl FnOnce(&mut Cursor, &mut Recorder) -> Result<R, IssueError<String>>,
    ) -> Result<R, IssueError<String>> {
        let mut guard = shared.lock().unwrap();
        let (cursor, device) = &mut *guard;
        f(cursor, device)
    }

    struct Token;

    impl Payload for Token {
        fn shape(&self) -> &[usize] {
            &[1]
        }
    }

    struct MarkStage {
        index: u32,
        shared: Shared,
    }

    impl MarkStage {
        fn work(&self, mb: u32) -> Work {
            Work::new(self.index, mb)
        }
    }

    impl Stage for MarkStage {
        type Buffer = Token;
        type Loss = f32;

        fn forward(&mut self, f: Forward<Token>) -> Result<Forwarded<Token, f32>, StageError> {
            on(&self.shared, |c, d| {
                c.compute(d, Want::Forward(self.work(f.mb)))
            })?;
            Ok(Forwarded {
                output: Token,
                loss: f.target.map(|_| 0.0),
            })
        }

        fn backward(&mut self, b: Backward<Token>) -> Result<Option<Token>, StageError> {
            on(&self.shared, |c, d| {
                c.compute(d, Want::Backward(self.work(b.mb)))
            })?;
            Ok(Some(Token))
        }

        fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
            on(&self.shared, |c, d| {
                c.compute(d, Want::Weight(self.work(mb)))
            })?;
            Ok(())
        }

        /// As `GpuStage::forward_backward`: one compute on one stream, or the forward half
        /// and then the backward half, then the join.
        fn forward_backward(
            &mut self,
            forward: Forward<Token>,
            backward_stage: Option<&mut Self>,
            backward: Backward<Token>,
        ) -> Result<Overlapped<Token, f32>, StageError> {
            let b_stage = backward_stage.map_or(self.index, |s| s.index);
            let want = Want::ForwardBackward {
                f: self.work(forward.mb),
                b: Work::new(b_stage, backward.mb),
            };
            on(&self.shared, |c, d| {
                let (_, index, part) = c.compute(d, want)?;
                if part == Part::Forward {
                    let (_, second, part) = c.compute(d, want)?;
                    assert_eq!((second, part), (index, Part::Backward));
                }
                c.close(d, index)
            })?;
            Ok(Overlapped {
                forwarded: Forwarded {
                    output: Token,
                    loss: forward.target.map(|_| 0.0),
                },
                input_grad: Some(Token),
            })
        }

        fn sum_gradients(_: &mut [&mut Self]) -> Result<(), StageError> {
            Ok(())
        }
    }

    struct MarkTransport {
        inner: InProcess<Token>,
        shared: Shared,
    }

    fn comm(e: IssueError<String>) -> CommError {
        CommError::new(dualpipe_executor::CommErrorKind::Backend(e.to_string()))
    }

    impl Transport for MarkTransport {
        type Buffer = Token;
        type Ticket = InProcessTicket;

        fn queue_send(&mut self, peer: u32, buffer: Token) -> Result<(), CommError> {
            self.inner.queue_send(peer, buffer)
        }

        fn queue_recv(&mut self, peer: u32) -> Result<InProcessTicket, CommError> {
            self.inner.queue_recv(peer)
        }

        fn commit(&mut self) -> Result<(), CommError> {
            let index = on(&self.shared, |c, d| c.batch(d)).map_err(comm)?;
            self.inner.commit()?;
            on(&self.shared, |c, d| c.close(d, index)).map_err(comm)
        }

        fn wait(&mut self, ticket: InProcessTicket) -> Result<Token, CommError> {
            on(&self.shared, |c, d| c.leading(d)).map_err(comm)?;
            self.inner.wait(ticket)
        }

        fn abort(&mut self, reason: &str) {
            self.inner.abort(reason);
        }
    }

    /// Runs `schedule` under the interpreter with the GPU's call points; returns what each
    /// rank issued.
    fn run(schedule: &ValidSchedule, options: PlanOptions) -> Result<Vec<Vec<StreamOp>>, String> {
        let executor = Executor::new(
            schedule.clone(),
            Options {
                model: options.model,
                ..Options::default()
            },
        );
        let doc = schedule.schedule();
        let plans = plan(schedule, options);
        let shared: Vec<Shared> = plans
            .into_iter()
            .map(|p| {
                let list: Arc<[Instruction]> = doc.ranks[p.rank as usize].clone().into();
                Arc::new(Mutex::new((
                    Cursor::new(Arc::new(p), list, options.model),
                    Recorder::default(),
                )))
            })
            .collect();
        let mut ranks: Vec<Stages<MarkStage>> = shared
            .iter()
            .enumerate()
            .map(|(rank, s)| {
                Stages::new(executor.stages_of(rank as u32).iter().map(|&index| {
                    (
                        index,
                        MarkStage {
                            index,
                            shared: s.clone(),
                        },
                    )
                }))
            })
            .collect();
        let transports =
            InProcess::network(doc.num_ranks, options.model, executor.options().timeout);
        let mut inputs: Vec<Option<Token>> =
            (0..doc.num_microbatches).map(|_| Some(Token)).collect();
        let mut targets: Vec<Option<Token>> =
            (0..doc.num_microbatches).map(|_| Some(Token)).collect();
        let feeds: Vec<Feed<Token>> = executor.split_feed(&mut inputs, &mut targets);
        let parts = ranks
            .iter_mut()
            .zip(transports)
            .zip(feeds)
            .zip(&shared)
            .enumerate()
            .map(|(rank, (((stages, inner), feed), s))| RankParts {
                rank: rank as u32,
                stages,
                transport: MarkTransport {
                    inner,
                    shared: s.clone(),
                },
                feed,
                clock: None::<HostClock>,
            })
            .collect();
        drive(&executor, parts, &mut Kept).map_err(|e| e.to_string())?;
        let mut issued = Vec::new();
        for s in &shared {
            let mut guard = s.lock().unwrap();
            let (cursor, device) = &mut *guard;
            assert!(cursor.finish(device).map_err(|e| e.to_string())?);
            issued.push(std::mem::take(&mut device.0));
        }
        Ok(issued)
    }

    /// The GPU backend's call points under the real interpreter issue every operation of
    /// every rank's plan, in the plan's order, for every family and both models.
    #[test]
    fn the_interpreter_with_the_gpu_call_points_issues_exactly_the_plan() {
        let mut runs = 0;
        for schedule in schedules() {
            for options in PlanOptions::ALL {
                let issued = run(&schedule, options).unwrap_or_else(|e| {
                    panic!("{} {options:?}: {e}", schedule.schedule().schedule)
                });
                for (rank_plan, issued) in plan(&schedule, options).iter().zip(&issued) {
                    assert_eq!(
                        issued,
                        &rank_plan.ops,
                        "{} {options:?} rank {}",
                        schedule.schedule().schedule,
                        rank_plan.rank
                    );
                }
                runs += 1;
            }
        }
        assert!(runs > 50, "{runs}");
    }

    /// A plan that does not match the list fails the step, naming the rank and both sides.
    #[test]
    fn a_stage_call_the_plan_does_not_expect_is_a_mismatch() {
        let schedule = dualpipe_planner::plan(&PlanRequest::new(Family::OneFOneB, 2, 4)).unwrap();
        let plans = plan(&schedule, PlanOptions::ALL[0]);
        let list: Arc<[Instruction]> = schedule.schedule().ranks[0].clone().into();
        let mut cursor = Cursor::new(Arc::new(plans[0].clone()), list, ExecutionModel::Blocking);
        let error = cursor
            .compute(&mut Recorder::default(), Want::Backward(Work::new(0, 3)))
            .unwrap_err();
        assert!(
            matches!(error, IssueError::Mismatch { rank: 0, .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .starts_with("rank 0: the interpreter computes a backward of stage 0 micro-batch 3, but the plan's next operation is op 0 (main: compute 0)"),
            "{error}"
        );
    }
}
