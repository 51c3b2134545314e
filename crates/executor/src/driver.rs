//! The step driver every backend runs on: each rank's list on its own thread (a single rank
//! on the calling thread), a panic caught and turned into an abort of the step, every rank
//! joined and gathered, the copies of a stage summed through [`Stage::sum_gradients`], and
//! the results brought to the host by the backend's [`Host`].

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::{Cause, RankFailure, StepError};
use crate::interpret::{Executor, Feed, Marks, RankRun, Stages};
use crate::profile::{Clock, Profile};
use crate::stage::Stage;
use crate::transport::Transport;

/// What a step returns: per micro-batch losses and outputs, and the measured timeline.
#[derive(Debug)]
pub struct StepOutput<B, L> {
    /// The loss of each micro-batch, by micro-batch index (`None` where no loss was
    /// computed here, e.g. no targets were given, or another process ran the last stage).
    pub losses: Vec<Option<L>>,
    /// The model output of each micro-batch, when
    /// [`Options::keep_outputs`](crate::Options::keep_outputs) is set.
    pub outputs: Vec<Option<B>>,
    /// The timeline (one entry per rank of the schedule, empty for ranks run elsewhere), when
    /// [`Options::profile`](crate::Options::profile) is set.
    pub profile: Option<Profile>,
}

/// What one rank brings to a step: its index, its stages, its end of the transport, its feed
/// and its clock (`None` when not profiling).
pub struct RankParts<'a, S: Stage, T, C> {
    /// The rank.
    pub rank: u32,
    /// The stages it holds.
    pub stages: &'a mut Stages<S>,
    /// Its end of the transport.
    pub transport: T,
    /// Its inputs and targets.
    pub feed: Feed<S::Buffer>,
    /// Its clock; used only when [`Options::profile`](crate::Options::profile) is set.
    pub clock: Option<C>,
}

/// How a backend brings the results of a step to the host once every rank has run.
pub trait Host<S: Stage> {
    /// A model output on the host.
    type Buffer;
    /// A loss on the host.
    type Loss;

    /// Called once every rank's list has been issued, whether or not a rank failed, before
    /// anything is read: a GPU backend waits for its streams here. Its failure ends the step.
    fn settle(&mut self) -> Result<(), RankFailure> {
        Ok(())
    }

    /// The loss that `rank` computed, on the host (`None` when the device gave none).
    fn loss(&mut self, rank: u32, loss: S::Loss) -> Result<Option<Self::Loss>, RankFailure>;

    /// A model output that `rank` returned, on the host.
    fn output(&mut self, rank: u32, output: S::Buffer) -> Result<Self::Buffer, RankFailure>;
}

/// The [`Host`] of a backend whose results are on the host already: keeps them as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kept;

impl<S: Stage> Host<S> for Kept {
    type Buffer = S::Buffer;
    type Loss = S::Loss;

    fn loss(&mut self, _rank: u32, loss: S::Loss) -> Result<Option<S::Loss>, RankFailure> {
        Ok(Some(loss))
    }

    fn output(&mut self, _rank: u32, output: S::Buffer) -> Result<S::Buffer, RankFailure> {
        Ok(output)
    }
}

/// Runs one step of `executor` over the ranks in `parts` (ascending, any subset of the
/// schedule's ranks: all of them for a backend that runs every rank in one process, one for
/// a process of a multi-process run). Then, after a training step, makes the copies of every
/// stage held by several of these ranks hold the sum of their gradients
/// ([`Stage::sum_gradients`], copies in ascending rank order), and brings losses and outputs
/// to the host through `host`.
///
/// On failure, returns the step's error with every rank's state: a rank that fails aborts
/// the step on every rank through its transport, and a panic of the interpreter itself
/// becomes a failure too.
#[allow(clippy::type_complexity)] // the result spells out the host's associated types
pub fn drive<S, T, C, H>(
    executor: &Executor,
    parts: Vec<RankParts<'_, S, T, C>>,
    host: &mut H,
) -> Result<StepOutput<H::Buffer, H::Loss>, StepError>
where
    S: Stage + Send,
    S::Buffer: Send,
    S::Loss: Send,
    T: Transport<Buffer = S::Buffer> + Send,
    C: Clock + Send,
    C::Mark: Send,
    H: Host<S>,
{
    let schedule = executor.schedule().schedule();
    let results = run_ranks(executor, parts);
    let settled = host.settle();
    let mut held = Vec::with_capacity(results.len());
    let mut outcomes = Vec::with_capacity(results.len());
    let mut unresolved = Vec::new();
    for (rank, stages, result, marks) in results {
        if let Some(stages) = stages {
            held.push((rank, stages));
        }
        if let Some(marks) = marks {
            unresolved.push((rank, marks));
        }
        outcomes.push(result.map(|run| (rank, run)));
    }
    settled.map_err(|failure| StepError::new(vec![failure], Vec::new()))?;
    let mut runs = StepError::gather(outcomes)?;
    // Resolved only now, after the host has waited for every rank: a device clock's marks are
    // events, and reading them earlier would wait for the device inside the step.
    for (rank, (mut clock, marks)) in unresolved {
        if let Some((_, run)) = runs.iter_mut().find(|(r, _)| *r == rank) {
            run.timings = marks.resolve(&mut clock);
        }
    }
    if !schedule.forward_only {
        sum_copies(schedule.num_stages, &mut held)?;
    }
    let microbatches = schedule.num_microbatches as usize;
    let mut losses: Vec<Option<H::Loss>> = (0..microbatches).map(|_| None).collect();
    let mut outputs: Vec<Option<H::Buffer>> = (0..microbatches).map(|_| None).collect();
    let mut timelines = vec![Vec::new(); schedule.num_ranks as usize];
    let on_host = |failure: RankFailure| StepError::new(vec![failure], Vec::new());
    for (rank, run) in runs {
        for (mb, loss) in run.losses {
            if let Some(slot) = losses.get_mut(mb as usize) {
                *slot = host.loss(rank, loss).map_err(on_host)?;
            }
        }
        for (mb, output) in run.outputs {
            if let Some(slot) = outputs.get_mut(mb as usize) {
                *slot = Some(host.output(rank, output).map_err(on_host)?);
            }
        }
        if let Some(timeline) = timelines.get_mut(rank as usize) {
            *timeline = run.timings;
        }
    }
    Ok(StepOutput {
        losses,
        outputs,
        profile: executor
            .options()
            .profile
            .then_some(Profile { ranks: timelines }),
    })
}

/// Each rank's index, its stages (handed back for the sum of copies; lost with a thread that
/// never came back), its outcome, and when profiling its clock with the marks to resolve.
type Outcome<'a, S, C> = (
    u32,
    Option<&'a mut Stages<S>>,
    Result<RankRun<<S as Stage>::Buffer, <S as Stage>::Loss>, RankFailure>,
    Option<(C, Marks<<C as Clock>::Mark>)>,
);

/// Runs every rank's list once: one thread per rank, or the calling thread for a single rank.
fn run_ranks<'a, S, T, C>(
    executor: &Executor,
    parts: Vec<RankParts<'a, S, T, C>>,
) -> Vec<Outcome<'a, S, C>>
where
    S: Stage + Send,
    S::Buffer: Send,
    S::Loss: Send,
    T: Transport<Buffer = S::Buffer> + Send,
    C: Clock + Send,
    C::Mark: Send,
{
    if parts.len() == 1 {
        return parts
            .into_iter()
            .map(|part| run_one(executor, part))
            .collect();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                let rank = part.rank;
                let handle = std::thread::Builder::new()
                    .name(format!("rank {rank}"))
                    .spawn_scoped(scope, move || run_one(executor, part));
                (rank, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(rank, handle)| {
                let failed = |message: String| {
                    (
                        rank,
                        None,
                        Err(RankFailure::on_rank(rank, Cause::Panic(message))),
                        None,
                    )
                };
                match handle {
                    Err(e) => failed(format!("could not start the rank's thread: {e}")),
                    Ok(handle) => handle
                        .join()
                        .unwrap_or_else(|_| failed("the rank's thread panicked".into())),
                }
            })
            .collect()
    })
}

/// Runs one rank's list, turning a panic of the interpreter into a failure that aborts the
/// step on every rank.
fn run_one<'a, S, T, C>(executor: &Executor, part: RankParts<'a, S, T, C>) -> Outcome<'a, S, C>
where
    S: Stage,
    T: Transport<Buffer = S::Buffer>,
    C: Clock,
{
    let RankParts {
        rank,
        stages,
        mut transport,
        feed,
        mut clock,
    } = part;
    let profile = executor.options().profile;
    let run = catch_unwind(AssertUnwindSafe(|| {
        let clock = if profile { clock.as_mut() } else { None };
        executor.run_rank_marked(rank, &mut *stages, &mut transport, feed, clock)
    }));
    let result = run.unwrap_or_else(|_| {
        // Stage panics are caught inside; this is the interpreter's own.
        let failure = RankFailure::on_rank(
            rank,
            Cause::Panic("the executor panicked; please report it".into()),
        );
        transport.abort(&failure.to_string());
        Err(failure)
    });
    match result {
        Ok((run, marks)) => {
            let marks = if profile {
                clock.map(|clock| (clock, marks))
            } else {
                None
            };
            (rank, Some(stages), Ok(run), marks)
        }
        Err(failure) => (rank, Some(stages), Err(failure), None),
    }
}

/// Sums the gradients of the copies of every stage held by several of `ranks` (ascending).
fn sum_copies<S: Stage>(
    num_stages: u32,
    ranks: &mut [(u32, &mut Stages<S>)],
) -> Result<(), StepError> {
    for stage in 0..num_stages {
        let holders: Vec<u32> = ranks
            .iter()
            .filter(|(_, stages)| stages.get(stage).is_some())
            .map(|&(rank, _)| rank)
            .collect();
        if holders.len() < 2 {
            continue;
        }
        let mut copies: Vec<&mut S> = ranks
            .iter_mut()
            .filter_map(|(_, stages)| stages.get_mut(stage))
            .collect();
        S::sum_gradients(&mut copies).map_err(|e| {
            let names: Vec<String> = holders.iter().map(u32::to_string).collect();
            let failure = RankFailure::on_rank(
                holders[0],
                Cause::Stage(
                    format!(
                        "summing the gradients of the copies of stage {stage} on ranks {} failed: {e}",
                        names.join(", ")
                    )
                    .into(),
                ),
            );
            StepError::new(vec![failure], Vec::new())
        })?;
    }
    Ok(())
}
