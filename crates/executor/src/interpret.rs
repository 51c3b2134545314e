//! The interpreter: replays one rank's instruction list against the rank's stages, a
//! transport and a clock. It knows nothing of threads, CPUs or GPUs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use dualpipe_schedule::{ExecutionModel, Instruction, Kind, Lane, ValidSchedule, Work};

use crate::error::{Cause, RankFailure};
use crate::profile::{Clock, Timing};
use crate::program::{BackwardOp, ForwardOp, Op, Program, Sink, Source};
use crate::stage::{Backward, Forward, Forwarded, Overlapped, Payload, Stage, StageError};
use crate::transport::{CommError, Transport};

/// How a step runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// The shape of every activation and gradient between stages (the reference's P2P
    /// shape); every such buffer is checked against it. `None` checks nothing.
    pub message_shape: Option<Vec<usize>>,
    /// Return the last stage's outputs (the model outputs) from the step.
    pub keep_outputs: bool,
    /// Blocking (a commit waits until its whole batch has met its partners, as in the
    /// reference implementation) or async (a compute waits only for the data it needs).
    /// Backends implement it in their transport.
    pub model: ExecutionModel,
    /// How long any rank waits for a message or a matching receive before it ends the step.
    pub timeout: Duration,
    /// Record the start and end of every instruction.
    pub profile: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            message_shape: None,
            keep_outputs: false,
            model: ExecutionModel::Blocking,
            timeout: Duration::from_secs(60),
            profile: false,
        }
    }
}

/// A validated schedule prepared to run: every rank's list with its data routes resolved.
///
/// Backends call [`Executor::run_rank`] once per rank and step, each with that rank's stages
/// and transport; the CPU backend ([`CpuPipeline`](crate::CpuPipeline)) does it on one thread
/// per rank.
#[derive(Clone, Debug)]
pub struct Executor {
    schedule: ValidSchedule,
    programs: Vec<Program>,
    options: Options,
}

/// The stages one rank holds, by stage index.
#[derive(Debug)]
pub struct Stages<S> {
    entries: Vec<(u32, S)>,
}

impl<S> Stages<S> {
    /// The stages, given as `(stage index, stage)`.
    pub fn new(stages: impl IntoIterator<Item = (u32, S)>) -> Self {
        let mut entries: Vec<(u32, S)> = stages.into_iter().collect();
        entries.sort_by_key(|&(index, _)| index);
        Stages { entries }
    }

    /// The stage with index `stage`, if held.
    pub fn get(&self, stage: u32) -> Option<&S> {
        self.position(stage).map(|p| &self.entries[p].1)
    }

    /// The stage with index `stage`, if held.
    pub fn get_mut(&mut self, stage: u32) -> Option<&mut S> {
        self.position(stage).map(|p| &mut self.entries[p].1)
    }

    /// The stage indices held, ascending.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().map(|&(index, _)| index)
    }

    /// Every `(stage index, stage)`, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &S)> {
        self.entries.iter().map(|(index, stage)| (*index, stage))
    }

    /// Every `(stage index, stage)`, ascending.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut S)> {
        self.entries
            .iter_mut()
            .map(|(index, stage)| (*index, stage))
    }

    fn position(&self, stage: u32) -> Option<usize> {
        self.entries
            .binary_search_by_key(&stage, |&(index, _)| index)
            .ok()
    }

    /// The stages of an FB: `a` runs the forward, the backward runs on the second one, or on
    /// `a` too when `b == a`.
    fn pair_mut(&mut self, a: u32, b: u32) -> Option<(&mut S, Option<&mut S>)> {
        let pa = self.position(a)?;
        let pb = self.position(b)?;
        if pa == pb {
            return Some((&mut self.entries[pa].1, None));
        }
        let (low, high) = self.entries.split_at_mut(pa.max(pb));
        let (x, y) = (&mut low[pa.min(pb)].1, &mut high[0].1);
        Some(if pa < pb { (x, Some(y)) } else { (y, Some(x)) })
    }
}

/// One rank's inputs for a step: the inputs of the micro-batches whose first stage it runs and
/// the targets of those whose last stage it runs.
#[derive(Debug)]
pub struct Feed<B> {
    inputs: Vec<Option<B>>,
    targets: Vec<Option<B>>,
}

impl<B> Feed<B> {
    /// An empty feed for a step of `num_microbatches` micro-batches.
    pub fn new(num_microbatches: u32) -> Self {
        Feed {
            inputs: (0..num_microbatches).map(|_| None).collect(),
            targets: (0..num_microbatches).map(|_| None).collect(),
        }
    }

    /// Sets the input of micro-batch `mb` (ignored if out of range).
    pub fn set_input(&mut self, mb: u32, input: B) {
        if let Some(slot) = self.inputs.get_mut(mb as usize) {
            *slot = Some(input);
        }
    }

    /// Sets the target of micro-batch `mb` (ignored if out of range).
    pub fn set_target(&mut self, mb: u32, target: B) {
        if let Some(slot) = self.targets.get_mut(mb as usize) {
            *slot = Some(target);
        }
    }
}

/// What one rank returns from a step.
#[derive(Debug)]
pub struct RankRun<B, L> {
    /// The losses of the micro-batches whose last stage this rank ran, as `(mb, loss)` in the
    /// order computed.
    pub losses: Vec<(u32, L)>,
    /// The model outputs of those micro-batches, when [`Options::keep_outputs`] is set.
    pub outputs: Vec<(u32, B)>,
    /// Start and end of every compute and commit, when a clock was given.
    pub timings: Vec<Timing>,
}

impl Executor {
    /// Prepares `schedule` to run with `options`. Only a [`ValidSchedule`] can be run: a
    /// schedule that was never validated does not compile.
    ///
    /// ```compile_fail
    /// use dualpipe_executor::{Executor, Options};
    /// let schedule = dualpipe_planner::plan(&dualpipe_planner::PlanRequest::new(
    ///     dualpipe_planner::Family::OneFOneB, 2, 2)).unwrap().into_inner();
    /// Executor::new(schedule, Options::default()); // a `Schedule`, not a `ValidSchedule`
    /// ```
    ///
    /// ```
    /// use dualpipe_executor::{Executor, Options};
    /// let schedule = dualpipe_planner::plan(&dualpipe_planner::PlanRequest::new(
    ///     dualpipe_planner::Family::OneFOneB, 2, 2)).unwrap();
    /// let executor = Executor::new(schedule, Options::default());
    /// assert_eq!(executor.stages_of(1), &[1]);
    /// ```
    pub fn new(schedule: ValidSchedule, options: Options) -> Self {
        let programs = (0..schedule.schedule().num_ranks)
            .map(|rank| Program::compile(&schedule, rank))
            .collect();
        Executor {
            schedule,
            programs,
            options,
        }
    }

    /// The schedule.
    pub fn schedule(&self) -> &ValidSchedule {
        &self.schedule
    }

    /// The options.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The stage indices that `rank` must hold, ascending.
    pub fn stages_of(&self, rank: u32) -> &[u32] {
        &self.programs[rank as usize].stages
    }

    /// The feed of `rank` for a step, taking from `inputs` and `targets` (indexed by
    /// micro-batch) what that rank needs.
    pub fn split_feed<B>(
        &self,
        inputs: &mut [Option<B>],
        targets: &mut [Option<B>],
    ) -> Vec<Feed<B>> {
        let topology = self.schedule.topology();
        let last = topology.num_stages() - 1;
        let mut feeds: Vec<Feed<B>> = (0..topology.num_ranks())
            .map(|_| Feed::new(topology.num_microbatches()))
            .collect();
        for mb in 0..topology.num_microbatches() {
            if let Some(input) = inputs.get_mut(mb as usize).and_then(Option::take) {
                feeds[topology.rank_of(Work::new(0, mb)) as usize].set_input(mb, input);
            }
            if let Some(target) = targets.get_mut(mb as usize).and_then(Option::take) {
                feeds[topology.rank_of(Work::new(last, mb)) as usize].set_target(mb, target);
            }
        }
        feeds
    }

    /// Runs rank `rank`'s instruction list once. On failure, tells every other rank through
    /// [`Transport::abort`] (unless it failed because another rank did) and returns where and
    /// why it stopped.
    pub fn run_rank<S, T, C>(
        &self,
        rank: u32,
        stages: &mut Stages<S>,
        transport: &mut T,
        feed: Feed<S::Buffer>,
        clock: Option<&mut C>,
    ) -> Result<RankRun<S::Buffer, S::Loss>, RankFailure>
    where
        S: Stage,
        T: Transport<Buffer = S::Buffer>,
        C: Clock,
    {
        let program = &self.programs[rank as usize];
        let result = Interpreter {
            program,
            instructions: &self.schedule.schedule().ranks[rank as usize],
            options: &self.options,
            training: !self.schedule.schedule().forward_only,
            stages,
            transport,
            state: State::new(program.slots, feed),
        }
        .run(clock);
        if let Err(failure) = &result {
            if !failure.cause.is_abort() {
                transport.abort(&failure.to_string());
            }
        }
        result
    }

    /// [`Executor::run_rank`] with the clock's marks left unresolved (`timings` empty), for
    /// the driver to resolve once the host has waited for the devices.
    #[allow(clippy::type_complexity)] // the result spells out the stage's associated types
    pub(crate) fn run_rank_marked<S, T, C>(
        &self,
        rank: u32,
        stages: &mut Stages<S>,
        transport: &mut T,
        feed: Feed<S::Buffer>,
        clock: Option<&mut C>,
    ) -> Result<MarkedRun<S::Buffer, S::Loss, C::Mark>, RankFailure>
    where
        S: Stage,
        T: Transport<Buffer = S::Buffer>,
        C: Clock,
    {
        let program = &self.programs[rank as usize];
        let result = Interpreter {
            program,
            instructions: &self.schedule.schedule().ranks[rank as usize],
            options: &self.options,
            training: !self.schedule.schedule().forward_only,
            stages,
            transport,
            state: State::new(program.slots, feed),
        }
        .run_marked(clock);
        if let Err(failure) = &result {
            if !failure.cause.is_abort() {
                transport.abort(&failure.to_string());
            }
        }
        result
    }
}

/// A received buffer not yet taken: the transport's ticket and the recv's instruction index.
struct Pending<K> {
    ticket: K,
    recv: usize,
    commit: usize,
}

struct State<B, K, L> {
    feed: Feed<B>,
    /// Hand-offs between stages of this rank, under the consumer's slot; [0] activations,
    /// [1] gradients.
    local: [Vec<Option<B>>; 2],
    /// Results waiting for their `send`, under the producer's slot.
    outgoing: [Vec<Option<B>>; 2],
    /// Queued or posted receives, under the consumer's slot.
    received: [Vec<Option<Pending<K>>>; 2],
    /// Instruction indices of the sends and receives queued since the last commit.
    batch: Vec<usize>,
    losses: Vec<(u32, L)>,
    outputs: Vec<(u32, B)>,
}

fn none<T>(n: usize) -> Vec<Option<T>> {
    (0..n).map(|_| None).collect()
}

impl<B, K, L> State<B, K, L> {
    fn new(slots: usize, feed: Feed<B>) -> Self {
        State {
            feed,
            local: [none(slots), none(slots)],
            outgoing: [none(slots), none(slots)],
            received: [none(slots), none(slots)],
            batch: Vec::with_capacity(8),
            losses: Vec::new(),
            outputs: Vec::new(),
        }
    }
}

fn lane(kind: Kind) -> usize {
    match kind {
        Kind::Act => 0,
        Kind::Grad => 1,
    }
}

struct Interpreter<'a, S: Stage, T: Transport> {
    program: &'a Program,
    instructions: &'a [Instruction],
    options: &'a Options,
    training: bool,
    stages: &'a mut Stages<S>,
    transport: &'a mut T,
    state: State<S::Buffer, T::Ticket, S::Loss>,
}

impl<S, T> Interpreter<'_, S, T>
where
    S: Stage,
    T: Transport<Buffer = S::Buffer>,
{
    fn run<C: Clock>(
        self,
        mut clock: Option<&mut C>,
    ) -> Result<RankRun<S::Buffer, S::Loss>, RankFailure> {
        let (mut run, marks) = self.run_marked(clock.as_deref_mut())?;
        if let Some(clock) = clock {
            run.timings = marks.resolve(clock);
        }
        Ok(run)
    }

    /// [`Interpreter::run`] with the marks left unresolved (`timings` empty).
    #[allow(clippy::type_complexity)] // the result spells out the stage's associated types
    fn run_marked<C: Clock>(
        mut self,
        mut clock: Option<&mut C>,
    ) -> Result<MarkedRun<S::Buffer, S::Loss, C::Mark>, RankFailure> {
        let rank = self.program.rank;
        for &stage in &self.program.stages {
            if self.stages.get(stage).is_none() {
                return Err(RankFailure::on_rank(
                    rank,
                    Cause::Contract(format!(
                        "the schedule runs stage {stage} on this rank, but the rank was given no such stage"
                    )),
                ));
            }
        }
        let mut marks = Vec::new();
        for (index, op) in self.program.ops.iter().enumerate() {
            let fail = |cause| RankFailure::at(rank, index, self.instructions[index], cause);
            match *op {
                Op::Send { kind, slot, peer } => {
                    let buffer = self.state.outgoing[lane(kind)][slot]
                        .take()
                        .ok_or_else(|| {
                            fail(Cause::Contract(
                                "nothing to send: the buffer was never produced".into(),
                            ))
                        })?;
                    self.state.batch.push(index);
                    self.transport
                        .queue_send(peer, buffer)
                        .map_err(|error| fail(self.comm(error, Some(index))))?;
                }
                Op::Recv {
                    kind,
                    slot,
                    peer,
                    commit,
                } => {
                    self.state.batch.push(index);
                    let ticket = self
                        .transport
                        .queue_recv(peer)
                        .map_err(|error| fail(self.comm(error, Some(index))))?;
                    self.state.received[lane(kind)][slot] = Some(Pending {
                        ticket,
                        recv: index,
                        commit,
                    });
                }
                Op::Commit => {
                    let start = clock.as_deref_mut().map(|c| c.mark(Lane::Comm));
                    let result = self.transport.commit();
                    let end = clock.as_deref_mut().map(|c| c.mark(Lane::Comm));
                    if let (Some(start), Some(end)) = (start, end) {
                        marks.push((index, start, None, end, None));
                    }
                    if let Err(error) = result {
                        let op = error.op.and_then(|op| self.state.batch.get(op).copied());
                        return Err(fail(self.comm(error, op)));
                    }
                    self.state.batch.clear();
                }
                _ => {
                    let start = clock.as_deref_mut().map(|c| c.mark(Lane::Compute));
                    let (ready, waited_on) = self.compute(op, &mut clock).map_err(fail)?;
                    let end = clock.as_deref_mut().map(|c| c.mark(Lane::Compute));
                    if let (Some(start), Some(end)) = (start, end) {
                        marks.push((index, start, ready, end, waited_on));
                    }
                }
            }
        }
        Ok((
            RankRun {
                losses: std::mem::take(&mut self.state.losses),
                outputs: std::mem::take(&mut self.state.outputs),
                timings: Vec::new(),
            },
            Marks(marks),
        ))
    }
}

/// A rank's clock marks of one step, not yet resolved: every compute and commit as (index,
/// start, ready, end, the commit it waited on). Resolving may wait for the device (a GPU
/// clock's events), so the driver resolves them after its host has waited for every rank.
pub(crate) struct Marks<M>(Vec<Marked<M>>);

/// One compute's or commit's marks: (index, start, ready, end, the commit it waited on).
type Marked<M> = (usize, M, Option<M>, M, Option<usize>);

/// A rank's run with its marks unresolved.
pub(crate) type MarkedRun<B, L, M> = (RankRun<B, L>, Marks<M>);

impl<M> Marks<M> {
    /// The timings, read from `clock` (the clock that made the marks).
    pub(crate) fn resolve<C: Clock<Mark = M>>(self, clock: &mut C) -> Vec<Timing> {
        self.0
            .into_iter()
            .map(|(index, start, ready, end, waited_on)| {
                let start_us = clock.micros(&start);
                Timing {
                    index,
                    start_us,
                    ready_us: ready.map_or(start_us, |r| clock.micros(&r)),
                    end_us: clock.micros(&end),
                    waited_on,
                }
            })
            .collect()
    }
}

/// The mark taken when a compute's inputs are in hand, and the commit whose batch it waited
/// for, if it took a received buffer.
type Ready<M> = (Option<M>, Option<usize>);

impl<S, T> Interpreter<'_, S, T>
where
    S: Stage,
    T: Transport<Buffer = S::Buffer>,
{
    fn compute<C: Clock>(
        &mut self,
        op: &Op,
        clock: &mut Option<&mut C>,
    ) -> Result<Ready<C::Mark>, Cause> {
        let mut mark = || clock.as_deref_mut().map(|c| c.mark(Lane::Compute));
        match *op {
            Op::Forward(f) => {
                let (forward, waited) = self.forward_args(&f)?;
                let ready = mark();
                let stage = self.stages.get_mut(f.work.stage).expect("checked at start");
                let forwarded = guarded(|| stage.forward(forward))?;
                self.place_forward(&f, forwarded)?;
                Ok((ready, waited))
            }
            Op::Backward(b) => {
                let (backward, waited) = self.backward_args(&b)?;
                let ready = mark();
                let stage = self.stages.get_mut(b.work.stage).expect("checked at start");
                let input_grad = guarded(|| stage.backward(backward))?;
                self.place_input_grad(&b, input_grad)?;
                Ok((ready, waited))
            }
            Op::Weight(work) => {
                let ready = mark();
                let stage = self.stages.get_mut(work.stage).expect("checked at start");
                guarded(|| stage.backward_weight(work.mb))?;
                Ok((ready, None))
            }
            Op::ForwardBackward(f, b) => {
                let (forward, waited_f) = self.forward_args(&f)?;
                let (backward, waited_b) = self.backward_args(&b)?;
                let ready = mark();
                let (forward_stage, backward_stage) = self
                    .stages
                    .pair_mut(f.work.stage, b.work.stage)
                    .expect("checked at start");
                let Overlapped {
                    forwarded,
                    input_grad,
                } = guarded(|| forward_stage.forward_backward(forward, backward_stage, backward))?;
                self.place_forward(&f, forwarded)?;
                self.place_input_grad(&b, input_grad)?;
                Ok((ready, waited_f.max(waited_b)))
            }
            Op::Send { .. } | Op::Recv { .. } | Op::Commit => unreachable!("not a compute"),
        }
    }

    fn forward_args(
        &mut self,
        f: &ForwardOp,
    ) -> Result<(Forward<S::Buffer>, Option<usize>), Cause> {
        let mb = f.work.mb;
        let (input, waited) = match f.input {
            Source::Feed => {
                let input = self.state.feed.inputs[mb as usize].take().ok_or_else(|| {
                    Cause::Contract(format!(
                        "no input was given for micro-batch {mb}, whose first stage runs on this rank"
                    ))
                })?;
                (input, None)
            }
            Source::Local => (self.take_local(Kind::Act, f.slot, f.work)?, None),
            Source::Received => {
                let (buffer, commit) = self.take_received(Kind::Act, f.slot)?;
                (buffer, Some(commit))
            }
            Source::Loss => unreachable!("a forward has an input"),
        };
        let target = if f.last {
            let target = self.state.feed.targets[mb as usize].take();
            if target.is_none() && self.training {
                return Err(Cause::Contract(format!(
                    "no target was given for micro-batch {mb}, whose last stage runs on this rank"
                )));
            }
            target
        } else {
            None
        };
        Ok((
            Forward {
                mb,
                input,
                target,
                training: self.training,
            },
            waited,
        ))
    }

    /// The arguments of a backward.
    fn backward_args(
        &mut self,
        b: &BackwardOp,
    ) -> Result<(Backward<S::Buffer>, Option<usize>), Cause> {
        let (output_grad, waited) = match b.grad {
            Source::Loss => (None, None),
            Source::Local => (Some(self.take_local(Kind::Grad, b.slot, b.work)?), None),
            Source::Received => {
                let (buffer, commit) = self.take_received(Kind::Grad, b.slot)?;
                (Some(buffer), Some(commit))
            }
            Source::Feed => unreachable!("gradients are not fed"),
        };
        Ok((
            Backward {
                mb: b.work.mb,
                output_grad,
                defer_w: b.defer_w,
            },
            waited,
        ))
    }

    fn take_local(&mut self, kind: Kind, slot: usize, work: Work) -> Result<S::Buffer, Cause> {
        self.state.local[lane(kind)][slot].take().ok_or_else(|| {
            Cause::Contract(format!(
                "no {} was handed over for {work}: the stage that produces it has not run",
                what(kind)
            ))
        })
    }

    /// Waits for a received buffer and checks its shape. Returns it with the index of the
    /// commit that posted its receive.
    fn take_received(&mut self, kind: Kind, slot: usize) -> Result<(S::Buffer, usize), Cause> {
        let pending = self.state.received[lane(kind)][slot]
            .take()
            .ok_or_else(|| {
                Cause::Contract(format!("no receive was posted for this {}", what(kind)))
            })?;
        let waited = self.transport.wait(pending.ticket);
        let buffer = waited.map_err(|error| self.comm(error, Some(pending.recv)))?;
        self.check_shape(
            match kind {
                Kind::Act => "the received activation",
                Kind::Grad => "the received gradient",
            },
            &buffer,
        )?;
        Ok((buffer, pending.commit))
    }

    fn place_forward(
        &mut self,
        f: &ForwardOp,
        forwarded: Forwarded<S::Buffer, S::Loss>,
    ) -> Result<(), Cause> {
        let Forwarded { output, loss } = forwarded;
        match (f.last, loss) {
            (true, Some(loss)) => self.state.losses.push((f.work.mb, loss)),
            (true, None) if self.training => {
                return Err(Cause::Contract(
                    "the last stage returned no loss although it was given a target".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(Cause::Contract(format!(
                    "stage {} returned a loss, but only the last stage computes one",
                    f.work.stage
                )));
            }
            _ => {}
        }
        match f.output {
            Sink::Output => {
                if self.options.keep_outputs {
                    self.state.outputs.push((f.work.mb, output));
                }
            }
            Sink::Local(slot) => {
                self.check_shape("the output", &output)?;
                self.state.local[0][slot] = Some(output);
            }
            Sink::Outgoing => {
                self.check_shape("the output", &output)?;
                self.state.outgoing[0][f.slot] = Some(output);
            }
            Sink::Discard => {}
        }
        Ok(())
    }

    fn place_input_grad(&mut self, b: &BackwardOp, grad: Option<S::Buffer>) -> Result<(), Cause> {
        let slot = match b.input_grad {
            Sink::Discard | Sink::Output => return Ok(()),
            Sink::Local(slot) => slot,
            Sink::Outgoing => b.slot,
        };
        let grad = grad.ok_or_else(|| {
            Cause::Contract(format!(
                "the backward returned no input gradient, but stage {} needs it",
                b.work.stage - 1
            ))
        })?;
        self.check_shape("the input gradient", &grad)?;
        let held = match b.input_grad {
            Sink::Local(_) => &mut self.state.local[1],
            _ => &mut self.state.outgoing[1],
        };
        held[slot] = Some(grad);
        Ok(())
    }

    fn check_shape(&self, what: &'static str, buffer: &S::Buffer) -> Result<(), Cause> {
        match &self.options.message_shape {
            Some(expected) if buffer.shape() != expected.as_slice() => Err(Cause::Shape {
                what,
                expected: expected.clone(),
                found: buffer.shape().to_vec(),
            }),
            _ => Ok(()),
        }
    }

    fn comm(&self, error: CommError, op: Option<usize>) -> Cause {
        Cause::Comm {
            op: op.map(|index| (index, self.instructions[index])),
            error,
        }
    }
}

fn what(kind: Kind) -> &'static str {
    match kind {
        Kind::Act => "activation",
        Kind::Grad => "gradient",
    }
}

/// Runs a stage method, turning its error or panic into a [`Cause`].
fn guarded<R>(call: impl FnOnce() -> Result<R, StageError>) -> Result<R, Cause> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Cause::Stage(error)),
        Err(panic) => Err(Cause::Panic(
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into()),
        )),
    }
}
