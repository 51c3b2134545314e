//! Dispatch overhead per instruction: the interpreter alone (one rank, no communication),
//! and whole steps on CPU threads, with a stage that does no work.
//!
//! `cargo bench -p dualpipe-executor --bench dispatch`; divan's items/s column is
//! instructions per second (target: at most 1 us per instruction).

use std::time::Duration;

use divan::Bencher;
use divan::counter::ItemsCount;
use dualpipe_executor::{
    Backward, CpuPipeline, Executor, Feed, Forward, Forwarded, HostClock, InProcess, Options,
    Payload, Stage, StageError, Stages,
};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{ExecutionModel, ValidSchedule};

fn main() {
    divan::main();
}

/// A buffer with a shape and nothing in it.
struct Token([usize; 2]);

impl Payload for Token {
    fn shape(&self) -> &[usize] {
        &self.0
    }
}

/// A stage that passes its input on and computes nothing.
struct Trivial;

impl Stage for Trivial {
    type Buffer = Token;
    type Loss = ();

    fn forward(&mut self, f: Forward<Token>) -> Result<Forwarded<Token, ()>, StageError> {
        Ok(Forwarded {
            output: f.input,
            loss: f.target.map(drop),
        })
    }

    fn backward(&mut self, b: Backward<Token>) -> Result<Option<Token>, StageError> {
        Ok(Some(b.output_grad.unwrap_or(Token([1, 1]))))
    }

    fn backward_weight(&mut self, _mb: u32) -> Result<(), StageError> {
        Ok(())
    }

    fn sum_gradients(_copies: &mut [&mut Self]) -> Result<(), StageError> {
        Ok(())
    }
}

fn schedule(family: Family, n: u32, c: u32) -> ValidSchedule {
    plan(&PlanRequest::new(family, n, c)).unwrap()
}

fn options(model: ExecutionModel) -> Options {
    Options {
        message_shape: Some(vec![1, 1]),
        model,
        timeout: Duration::from_secs(60),
        ..Options::default()
    }
}

fn instructions(schedule: &ValidSchedule) -> usize {
    schedule.schedule().ranks.iter().map(Vec::len).sum()
}

/// The interpreter alone: DualPipeV on one rank (two stages, local hand-offs, FB, deferred
/// W), called directly on the current thread.
#[divan::bench(args = [16, 64, 256])]
fn interpreter(bencher: Bencher, microbatches: u32) {
    let schedule = schedule(Family::DualPipeV, 1, microbatches);
    let count = instructions(&schedule);
    let executor = Executor::new(schedule, options(ExecutionModel::Blocking));
    bencher
        .counter(ItemsCount::new(count))
        .with_inputs(|| {
            let mut feed = Feed::new(microbatches);
            for mb in 0..microbatches {
                feed.set_input(mb, Token([1, 1]));
                feed.set_target(mb, Token([1, 1]));
            }
            let stages = Stages::new([(0, Trivial), (1, Trivial)]);
            let transport = InProcess::network(1, ExecutionModel::Blocking, Duration::from_secs(1))
                .pop()
                .unwrap();
            (stages, transport, feed)
        })
        .bench_local_values(|(mut stages, mut transport, feed)| {
            executor
                .run_rank::<_, _, HostClock>(0, &mut stages, &mut transport, feed, None)
                .unwrap()
        });
}

/// Whole steps on CPU threads: thread start, channels and waiting included.
#[divan::bench(
    args = [
        (Family::DualPipeV, 1, 64),
        (Family::DualPipeV, 2, 64),
        (Family::DualPipeV, 4, 64),
        (Family::DualPipe, 4, 64),
        (Family::OneFOneB, 4, 64),
    ],
    consts = [false, true],
)]
fn threads<const ASYNC: bool>(bencher: Bencher, (family, n, c): (Family, u32, u32)) {
    let schedule = schedule(family, n, c);
    let count = instructions(&schedule);
    let model = if ASYNC {
        ExecutionModel::Async
    } else {
        ExecutionModel::Blocking
    };
    let mut pipeline = CpuPipeline::new(schedule, options(model), |_, _| Ok(Trivial)).unwrap();
    bencher
        .counter(ItemsCount::new(count))
        .with_inputs(|| {
            let tokens = || (0..c).map(|_| Token([1, 1])).collect::<Vec<_>>();
            (tokens(), tokens())
        })
        .bench_local_values(|(inputs, targets)| pipeline.step(inputs, targets).unwrap());
}
