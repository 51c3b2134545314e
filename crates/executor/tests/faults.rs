//! Faults end the step on every rank with an error that names the rank, the instruction and
//! the cause: a stage that fails or panics, a message that never arrives, a buffer of the
//! wrong shape, missing inputs. Every step here runs under a guard that fails the test if
//! the step does not end.

use std::sync::mpsc;
use std::time::Duration;

use dualpipe_executor::{
    Backward, Cause, CommError, CpuPipeline, Executor, Forward, Forwarded, InProcess,
    InProcessTicket, Options, Stage, StageError, Stages, StepError, Transport, run_on_threads,
};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_reference::model::{Batch, Matrix, ModelSpec, ReferenceStage};
use dualpipe_schedule::{ExecutionModel, Instruction, Location, ValidSchedule, Work};

const MODELS: [ExecutionModel; 2] = [ExecutionModel::Blocking, ExecutionModel::Async];

/// Runs `step` on its own thread and fails the test if it has not returned after 30 s.
fn within<R: Send + 'static>(step: impl FnOnce() -> R + Send + 'static) -> R {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(step());
    });
    result
        .recv_timeout(Duration::from_secs(30))
        .expect("the step did not end within 30 s")
}

fn schedule(family: Family, n: u32, c: u32, forward_only: bool) -> ValidSchedule {
    let mut request = PlanRequest::new(family, n, c);
    request.forward_only = forward_only;
    if family == Family::Interleaved1F1B {
        request.chunks_per_rank = Some(2);
    }
    plan(&request).unwrap()
}

fn spec(schedule: &ValidSchedule) -> ModelSpec {
    ModelSpec {
        hidden: 8,
        rows: 4,
        stages: schedule.schedule().num_stages,
        seed: 9,
    }
}

/// Long enough that a rank stopped by another's failure is stopped by the abort, not by
/// its own timeout; tests of lost messages use [`SHORT`].
const LONG: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(100);

fn options(spec: &ModelSpec, model: ExecutionModel, timeout: Duration) -> Options {
    Options {
        message_shape: Some(spec.message_shape()),
        model,
        timeout,
        ..Options::default()
    }
}

/// Which stage method a fault hits.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    Forward,
    Backward,
    Weight,
}

/// What goes wrong there.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Error,
    Panic,
    WrongShape,
}

/// The reference stage with one fault injected at one call of one micro-batch.
struct Faulty {
    inner: ReferenceStage,
    fault: Option<(Call, u32, Fault)>,
}

impl Faulty {
    fn hit(&self, call: Call, mb: u32) -> Option<Fault> {
        self.fault
            .filter(|&(c, m, _)| c == call && m == mb)
            .map(|(_, _, fault)| fault)
    }
}

/// Keeps the injected panics out of the test output; every other panic prints as usual.
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&"injected panic") {
                default(info);
            }
        }));
    });
}

/// A buffer one column too narrow.
fn narrower(m: Matrix) -> Matrix {
    let (rows, cols) = (m.rows(), m.cols() - 1);
    Matrix::new(rows, cols, m.into_data()[..rows * cols].to_vec())
}

fn fail(fault: Fault) -> StageError {
    match fault {
        Fault::Panic => {
            quiet_injected_panics();
            panic!("injected panic")
        }
        _ => "injected fault".into(),
    }
}

impl Stage for Faulty {
    type Buffer = Matrix;
    type Loss = f32;

    fn forward(&mut self, f: Forward<Matrix>) -> Result<Forwarded<Matrix, f32>, StageError> {
        match self.hit(Call::Forward, f.mb) {
            None => self.inner.forward(f),
            Some(Fault::WrongShape) => {
                let out = self.inner.forward(f)?;
                Ok(Forwarded {
                    output: narrower(out.output),
                    loss: out.loss,
                })
            }
            Some(fault) => Err(fail(fault)),
        }
    }

    fn backward(&mut self, b: Backward<Matrix>) -> Result<Option<Matrix>, StageError> {
        match self.hit(Call::Backward, b.mb) {
            None => self.inner.backward(b),
            Some(Fault::WrongShape) => Ok(self.inner.backward(b)?.map(narrower)),
            Some(fault) => Err(fail(fault)),
        }
    }

    fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
        match self.hit(Call::Weight, mb) {
            None => self.inner.backward_weight(mb),
            Some(fault) => Err(fail(fault)),
        }
    }

    fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError> {
        let mut inner: Vec<&mut ReferenceStage> = copies.iter_mut().map(|c| &mut c.inner).collect();
        ReferenceStage::sum_gradients(&mut inner)
    }
}

/// One step of `schedule` with `fault` injected into `stage` on every rank that holds it.
fn run_with_fault(
    schedule: ValidSchedule,
    model: ExecutionModel,
    fault: Option<(u32, Call, u32, Fault)>,
    drop_targets: bool,
) -> Result<(), StepError> {
    within(move || {
        let spec = spec(&schedule);
        let c = schedule.schedule().num_microbatches;
        let mut pipeline = CpuPipeline::new(schedule, options(&spec, model, LONG), |_, stage| {
            Ok(Faulty {
                inner: ReferenceStage::new(&spec, stage),
                fault: fault
                    .filter(|&(s, ..)| s == stage)
                    .map(|(_, call, mb, fault)| (call, mb, fault)),
            })
        })
        .unwrap();
        let batch = Batch::synthetic(&spec, c, 0);
        let targets = if drop_targets {
            Vec::new()
        } else {
            batch.targets
        };
        pipeline.step(batch.inputs, targets).map(drop)
    })
}

/// The rank and instruction that run `call` of `(stage, mb)`.
fn where_runs(schedule: &ValidSchedule, stage: u32, call: Call, mb: u32) -> Location {
    let work = Work::new(stage, mb);
    let rank = schedule.topology().rank_of(work);
    let list = &schedule.schedule().ranks[rank as usize];
    let index = list
        .iter()
        .position(|i| match (*i, call) {
            (Instruction::Forward(w), Call::Forward) => w == work,
            (Instruction::ForwardBackward { f, .. }, Call::Forward) => f == work,
            (Instruction::Backward { work: w, .. }, Call::Backward) => w == work,
            (Instruction::ForwardBackward { b, .. }, Call::Backward) => b == work,
            (Instruction::Weight(w), Call::Weight) => w == work,
            _ => false,
        })
        .unwrap_or_else(|| panic!("no {call:?} of {work} on rank {rank}"));
    Location::Instruction {
        rank,
        index,
        instruction: list[index],
    }
}

/// Every rank is either the cause, stopped by the cause, or finished.
fn assert_every_rank_ended(error: &StepError, ranks: u32) {
    assert_eq!(
        error.failures.len() + error.finished.len(),
        ranks as usize,
        "{error}"
    );
    for other in &error.failures[1..] {
        assert!(other.cause.is_abort(), "{error}");
    }
}

/// (family, ranks, micro-batches, stage, call, micro-batch).
const STAGE_FAULTS: &[(Family, u32, u32, u32, Call, u32)] = &[
    (Family::DualPipeV, 4, 10, 5, Call::Forward, 3),
    (Family::DualPipeV, 2, 6, 0, Call::Backward, 5),
    (Family::DualPipe, 4, 8, 1, Call::Backward, 6),
    (Family::DualPipe, 4, 8, 3, Call::Weight, 0),
    (Family::Zb1p, 4, 8, 2, Call::Weight, 1),
    (Family::OneFOneB, 3, 6, 2, Call::Forward, 0),
    (Family::Interleaved1F1B, 2, 4, 3, Call::Backward, 2),
    (Family::Zbv, 3, 6, 4, Call::Weight, 2),
];

#[test]
fn a_failing_stage_ends_the_step_on_every_rank() {
    for &(family, n, c, stage, call, mb) in STAGE_FAULTS {
        for model in MODELS {
            for (fault, says) in [
                (Fault::Error, "the stage failed: injected fault"),
                (Fault::Panic, "the stage panicked: injected panic"),
            ] {
                let schedule = schedule(family, n, c, false);
                let at = where_runs(&schedule, stage, call, mb);
                let error = run_with_fault(schedule, model, Some((stage, call, mb, fault)), false)
                    .expect_err("the step must fail");
                let label = format!("{family} {n}x{c} {model} {call:?} s{stage} m{mb} {fault:?}");
                assert_eq!(error.cause().location, at, "{label}: {error}");
                assert_eq!(
                    error.cause().to_string(),
                    format!("{at}: {says}"),
                    "{label}"
                );
                assert_every_rank_ended(&error, n);
            }
        }
    }
}

#[test]
fn a_buffer_of_the_wrong_shape_is_caught_where_it_is_made() {
    // (family, ranks, micro-batches, stage, call, micro-batch, what is wrong)
    let cases = [
        (Family::DualPipeV, 2, 4, 1, Call::Forward, 2, "the output"),
        (
            Family::DualPipeV,
            2,
            4,
            2,
            Call::Backward,
            0,
            "the input gradient",
        ),
        (Family::OneFOneB, 1, 2, 0, Call::Forward, 1, "the output"),
        (
            Family::DualPipe,
            2,
            4,
            1,
            Call::Backward,
            3,
            "the input gradient",
        ),
    ];
    for (family, n, c, stage, call, mb, what) in cases {
        for model in MODELS {
            // One rank holds two stages in 1F1B on one rank: give it two to hand over.
            let schedule = if n == 1 {
                let mut request = PlanRequest::new(Family::Interleaved1F1B, 1, c);
                request.chunks_per_rank = Some(2);
                plan(&request).unwrap()
            } else {
                schedule(family, n, c, false)
            };
            let at = where_runs(&schedule, stage, call, mb);
            let error = run_with_fault(
                schedule,
                model,
                Some((stage, call, mb, Fault::WrongShape)),
                false,
            )
            .expect_err("the step must fail");
            assert_eq!(
                error.cause().to_string(),
                format!(
                    "{at}: {what} has shape [4, 7], but messages between stages have shape [4, 8]"
                ),
                "{family} {model}"
            );
            assert_every_rank_ended(&error, n);
        }
    }
}

#[test]
fn missing_targets_and_inputs_are_named() {
    let schedule = schedule(Family::OneFOneB, 2, 2, false);
    let at = where_runs(&schedule, 1, Call::Forward, 0);
    let error = run_with_fault(schedule, ExecutionModel::Async, None, true).unwrap_err();
    assert_eq!(
        error.cause().to_string(),
        format!("{at}: no target was given for micro-batch 0, whose last stage runs on this rank")
    );
    assert_every_rank_ended(&error, 2);

    let schedule = schedule_fo();
    let spec = spec(&schedule);
    let error = within(move || {
        let mut pipeline = CpuPipeline::new(
            schedule,
            options(&spec, ExecutionModel::Blocking, LONG),
            |_, s| Ok(ReferenceStage::new(&spec, s)),
        )
        .unwrap();
        let batch = Batch::synthetic(&spec, 2, 0);
        pipeline
            .step(batch.inputs[..1].to_vec(), Vec::new())
            .map(drop)
    })
    .unwrap_err();
    assert_eq!(
        error.cause().to_string(),
        "rank 0, instruction 3 `F s0 m1`: no input was given for micro-batch 1, whose first stage runs on this rank"
    );
}

fn schedule_fo() -> ValidSchedule {
    schedule(Family::OneFOneB, 2, 2, true)
}

/// What a [`Tampering`] transport does to one of its rank's sends.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// The message is lost.
    Drop,
    /// The message arrives one column wider.
    Widen,
}

/// The in-process transport, except that the `nth` send of its rank is tampered with.
struct Tampering {
    inner: InProcess<Matrix>,
    sends: u32,
    nth: Option<(u32, Tamper)>,
}

impl Transport for Tampering {
    type Buffer = Matrix;
    type Ticket = InProcessTicket;

    fn queue_send(&mut self, peer: u32, buffer: Matrix) -> Result<(), CommError> {
        let this = self.sends;
        self.sends += 1;
        match self.nth {
            Some((n, Tamper::Drop)) if n == this => Ok(()),
            Some((n, Tamper::Widen)) if n == this => {
                let (rows, cols) = (buffer.rows(), buffer.cols() + 1);
                self.inner
                    .queue_send(peer, Matrix::new(rows, cols, vec![0.0; rows * cols]))
            }
            _ => self.inner.queue_send(peer, buffer),
        }
    }

    fn queue_recv(&mut self, peer: u32) -> Result<InProcessTicket, CommError> {
        self.inner.queue_recv(peer)
    }

    fn commit(&mut self) -> Result<(), CommError> {
        self.inner.commit()
    }

    fn wait(&mut self, ticket: InProcessTicket) -> Result<Matrix, CommError> {
        self.inner.wait(ticket)
    }

    fn abort(&mut self, reason: &str) {
        self.inner.abort(reason);
    }
}

/// One step of `schedule` on threads with rank `rank`'s `nth` send tampered with.
fn run_tampered(
    schedule: ValidSchedule,
    model: ExecutionModel,
    rank: u32,
    nth: u32,
    tamper: Tamper,
) -> Result<(), StepError> {
    within(move || {
        let spec = spec(&schedule);
        let executor = Executor::new(schedule, options(&spec, model, SHORT));
        let doc = executor.schedule().schedule();
        let mut ranks: Vec<Stages<ReferenceStage>> = (0..doc.num_ranks)
            .map(|r| {
                Stages::new(
                    executor
                        .stages_of(r)
                        .iter()
                        .map(|&s| (s, ReferenceStage::new(&spec, s))),
                )
            })
            .collect();
        let transports = InProcess::network(doc.num_ranks, model, SHORT)
            .into_iter()
            .enumerate()
            .map(|(r, inner)| Tampering {
                inner,
                sends: 0,
                nth: (r as u32 == rank).then_some((nth, tamper)),
            })
            .collect();
        let batch = Batch::synthetic(&spec, doc.num_microbatches, 0);
        let mut inputs: Vec<Option<Matrix>> = batch.inputs.into_iter().map(Some).collect();
        let mut targets: Vec<Option<Matrix>> = batch.targets.into_iter().map(Some).collect();
        let feeds = executor.split_feed(&mut inputs, &mut targets);
        run_on_threads(&executor, &mut ranks, transports, feeds).map(drop)
    })
}

#[test]
fn a_message_that_never_arrives_times_out_where_it_is_awaited() {
    // Forward only, one micro-batch, two ranks: rank 0's only send is lost.
    let expected = [
        (
            ExecutionModel::Blocking,
            "rank 1, instruction 1 `commit`: `recv act s1 m0 <- r0` (instruction 0): no message arrived from rank 0 within 100 ms",
        ),
        (
            ExecutionModel::Async,
            "rank 1, instruction 2 `F s1 m0`: `recv act s1 m0 <- r0` (instruction 0): no message arrived from rank 0 within 100 ms",
        ),
    ];
    for (model, says) in expected {
        let error = run_tampered(
            schedule(Family::OneFOneB, 2, 1, true),
            model,
            0,
            0,
            Tamper::Drop,
        )
        .unwrap_err();
        assert_eq!(error.to_string(), format!("{says}\n  rank 0 had finished"));
    }
}

#[test]
fn the_last_gradient_lost_stops_its_receiver() {
    let schedule = schedule(Family::OneFOneB, 2, 2, false);
    let list = &schedule.schedule().ranks[1];
    let last_send = list
        .iter()
        .rposition(|i| matches!(i, Instruction::Send(_)))
        .unwrap();
    let sends = list
        .iter()
        .filter(|i| matches!(i, Instruction::Send(_)))
        .count() as u32;
    let recv = schedule.links().partner(1, last_send).unwrap();
    let recv_text = schedule.schedule().ranks[0][recv].to_string();
    assert_eq!(recv_text, "recv grad s0 m1 <- r1");
    for model in MODELS {
        let error = run_tampered(schedule.clone(), model, 1, sends - 1, Tamper::Drop).unwrap_err();
        let cause = error.cause();
        assert_eq!(cause.rank(), 0, "{error}");
        let at = match model {
            ExecutionModel::Blocking => schedule.links().commit_of(0, recv).unwrap(),
            ExecutionModel::Async => match where_runs(&schedule, 0, Call::Backward, 1) {
                Location::Instruction { index, .. } => index,
                other => panic!("{other}"),
            },
        };
        assert_eq!(cause.index(), Some(at), "{model}: {error}");
        assert!(
            cause.to_string().ends_with(&format!(
                "`{recv_text}` (instruction {recv}): no message arrived from rank 1 within 100 ms"
            )),
            "{model}: {error}"
        );
        assert_eq!(error.finished, vec![1]);
    }
}

#[test]
fn a_message_lost_mid_step_ends_every_rank() {
    for model in MODELS {
        let error = run_tampered(
            schedule(Family::DualPipe, 4, 8, false),
            model,
            1,
            3,
            Tamper::Drop,
        )
        .unwrap_err();
        let cause = error.cause();
        assert!(
            matches!(
                &cause.cause,
                Cause::Comm {
                    error: CommError {
                        kind: dualpipe_executor::CommErrorKind::Timeout { .. },
                        ..
                    },
                    ..
                }
            ),
            "{error}"
        );
        assert!(cause.index().is_some(), "{error}");
        assert_every_rank_ended(&error, 4);
    }
}

#[test]
fn a_buffer_reshaped_in_flight_is_caught_on_arrival() {
    for model in MODELS {
        let schedule = schedule(Family::OneFOneB, 2, 2, false);
        let at = where_runs(&schedule, 1, Call::Forward, 0);
        let error = run_tampered(schedule, model, 0, 0, Tamper::Widen).unwrap_err();
        assert_eq!(
            error.cause().to_string(),
            format!(
                "{at}: the received activation has shape [4, 9], but messages between stages have shape [4, 8]"
            )
        );
        assert_every_rank_ended(&error, 2);
    }
}

#[test]
fn a_rank_without_its_stage_is_refused() {
    let schedule = schedule(Family::OneFOneB, 2, 1, true);
    let spec = spec(&schedule);
    let error = within(move || {
        let executor = Executor::new(schedule, options(&spec, ExecutionModel::Blocking, LONG));
        let mut ranks = vec![
            Stages::new([(0, ReferenceStage::new(&spec, 0))]),
            Stages::new(Vec::<(u32, ReferenceStage)>::new()),
        ];
        let transports = InProcess::network(2, ExecutionModel::Blocking, LONG);
        let batch = Batch::synthetic(&spec, 1, 0);
        let feeds = executor.split_feed(&mut [Some(batch.inputs[0].clone())], &mut []);
        run_on_threads(&executor, &mut ranks, transports, feeds).map(drop)
    })
    .unwrap_err();
    assert_eq!(
        error.cause().to_string(),
        "rank 1: the schedule runs stage 1 on this rank, but the rank was given no such stage"
    );
    assert_every_rank_ended(&error, 2);
}
