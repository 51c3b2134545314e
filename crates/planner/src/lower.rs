//! Lowering: from per-rank compute orders to a full schedule with sends, receives and commits.
//!
//! The messages are placed for a cost model ([`lower_for`]; [`lower`] takes the defaults), so
//! that the blocking execution loses no time against the async one:
//!
//! 1. **Timing.** The computes form a graph: each waits for the previous compute of its rank and
//!    for the computes whose results it uses. Its as-soon-as-possible run under the costs is the
//!    compute order's own limit, the step the async model reaches with free messages.
//! 2. **Meeting times.** A message produced on rank S at `ready` and consumed on rank R at `due`
//!    is exchanged at its meeting time `t`: the first time in `[ready, due]` at which both S
//!    and R are between computes. On each of the two ranks it goes into the gap before the
//!    rank's first compute that starts at `t` or later; on S that is after the producer, which
//!    started before `ready`, and on R before the consumer, which starts at `due`.
//! 3. **Conflicts.** When S and R are never both between computes during `[ready, due]`, one of
//!    them must wait: the consumer until S ends the compute it runs at `due`, or S, after the
//!    producer, until R ends the compute it runs at `ready`. The pass adds that wait as an edge
//!    of the graph, runs the graph again and repeats until every message meets. Strategies
//!    differ in which wait they choose (the one within the delayed compute's slack; the one
//!    that ends the step soonest, also over every pair of gaps, or judged by the placement
//!    finished from it; always the consumer; always the sender); each is tried and the
//!    shortest step kept. Every added edge goes from a compute that starts earlier to one that
//!    starts later in the current run, so the graph stays acyclic. Past a work budget the
//!    remaining messages are exchanged at `due`.
//! 4. **Batches.** Each gap posts one batch per distinct meeting time, in increasing order;
//!    inside a batch, messages are sorted by (kind, sending stage, micro-batch), the same key on
//!    both sides of every channel.
//!
//! **Deadlock freedom, under both models, whatever the costs.** Both sides of a message use the
//! same meeting time, and the gap a time goes to on a rank (the number of its computes that
//! start before it) never decreases as the time grows, so every rank posts its batches in
//! strictly increasing order of time and every batch pairs only with batches of the same time
//! on other ranks. By induction on the (finitely many) times: once every batch of an earlier
//! time has completed, each rank with a batch at time `t` reaches it, because everything before
//! it is a compute, whose inputs arrive in earlier batches and which waits on nothing else, or
//! a batch of an earlier time; so all batches at `t` are posted and complete. The costs only
//! decide the times, never this argument.
//!
//! **No lost time.** When every message meets, each rank reaches its batch at time `t` by `t`
//! (its computes that start before `t` end by `t`, as the rank is between computes at `t`), and
//! so does every partner; the commit returns by `t` and the blocking run follows the timeline of
//! the graph. That is the as-soon-as-possible run itself unless conflicts added waits. Conflicts
//! are inherent to some compute orders and costs: when two ranks are both busy without a break
//! while a message between them is in flight, no placement lets the blocking model exchange it
//! without delaying one of them.

use std::fmt;

use dualpipe_schedule::{
    ComputeOrder, Costs, Instruction, Kind, Schedule, StageCosts, Topology, Work, works,
};

/// The header of the schedule to produce (the schedule crate's, re-exported here).
pub use dualpipe_schedule::Header;

/// Why a compute order cannot be lowered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LowerError {
    /// The header or an instruction is inconsistent.
    Invalid(String),
    /// The compute orders wait on each other in a cycle.
    Cyclic(String),
}

impl fmt::Display for LowerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LowerError::Invalid(why) => write!(f, "cannot lower: {why}"),
            LowerError::Cyclic(why) => write!(f, "the compute order cannot run: {why}"),
        }
    }
}

impl std::error::Error for LowerError {}

/// One message to place: produced on `from` (sending stage `stage`), consumed on `to` in round
/// `round`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Placed {
    /// When the message is exchanged.
    at: f64,
    kind: Kind,
    /// The sending stage.
    stage: u32,
    mb: u32,
    from: u32,
    to: u32,
}

/// Lowers a compute order into a schedule, with the messages placed for the default costs
/// ([`Costs::default`]; [`lower_for`] takes others).
///
/// ```
/// use dualpipe_planner::lower::{lower, Header};
/// use dualpipe_schedule::{parse_program, validate, ComputeOrder, Pipeline};
/// let header = Header {
///     schedule: "demo".into(),
///     num_ranks: 2,
///     num_stages: 2,
///     num_microbatches: 1,
///     forward_only: false,
///     pipelines: vec![Pipeline { route: vec![0, 1], microbatches: vec![0] }],
/// };
/// let order = vec![parse_program("F s0 m0 | B s0 m0").unwrap(), parse_program("F s1 m0 | B s1 m0").unwrap()];
/// let schedule = lower(ComputeOrder::new(header, order).unwrap()).unwrap();
/// validate(&schedule).unwrap();
/// assert_eq!(schedule.ranks[0].len(), 6); // F, send, commit, recv, commit, B
/// ```
pub fn lower(order: ComputeOrder) -> Result<Schedule, LowerError> {
    lower_for(order, &Costs::default())
}

/// Like [`lower`], with the messages placed for `costs` (see the module documentation): when
/// the two ranks of every message are both between computes at some time while it is in
/// flight, the blocking execution of the result under those costs, messages free, follows the
/// as-soon-as-possible run of the compute order. Costs that fail [`Costs::check`] or override
/// a stage the schedule does not have are [`LowerError::Invalid`].
pub fn lower_for(order: ComputeOrder, costs: &Costs) -> Result<Schedule, LowerError> {
    let topology = order.topology().clone();
    let mut schedule = order.into_document();
    costs
        .check()
        .and_then(|()| costs.check_stages(schedule.num_stages))
        .map_err(|e| LowerError::Invalid(format!("costs: {e}")))?;
    let (timeline, messages) = place(&schedule, &topology, costs)?;

    // Per rank, per gap (before compute k; k = len is after the last), the messages to post.
    let mut gaps: Vec<Vec<Vec<(Placed, bool)>>> = schedule
        .ranks
        .iter()
        .map(|list| vec![Vec::new(); list.len() + 1])
        .collect();
    for message in messages {
        let gap_on = |rank: u32| timeline.before(rank, message.at);
        gaps[message.from as usize][gap_on(message.from)].push((message, true));
        gaps[message.to as usize][gap_on(message.to)].push((message, false));
    }

    for (rank, list) in schedule.ranks.iter_mut().enumerate() {
        let computes = std::mem::take(list);
        let rank_gaps = &mut gaps[rank];
        for (k, gap) in rank_gaps.iter_mut().enumerate() {
            gap.sort_unstable_by(|&(a, a_send), &(b, b_send)| {
                a.at.total_cmp(&b.at)
                    .then((!a_send, a.kind, a.stage, a.mb).cmp(&(!b_send, b.kind, b.stage, b.mb)))
            });
            let mut at = None;
            for &(m, is_send) in gap.iter() {
                if at.is_some_and(|t: f64| t != m.at) {
                    list.push(Instruction::Commit);
                }
                at = Some(m.at);
                list.push(if is_send {
                    Instruction::send(m.kind, m.stage, m.mb, m.to)
                } else {
                    let stage = match m.kind {
                        Kind::Act => m.stage + 1,
                        Kind::Grad => m.stage - 1,
                    };
                    Instruction::recv(m.kind, stage, m.mb, m.from)
                });
            }
            if at.is_some() {
                list.push(Instruction::Commit);
            }
            if let Some(&compute) = computes.get(k) {
                list.push(compute);
            }
        }
    }
    Ok(schedule)
}

/// How [`place_with`] settles a message whose two ranks never meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    /// The wait that costs least beyond the slack of the compute it delays; when both outlast
    /// their slack, the one that ends the step sooner.
    Slack,
    /// As `Slack`, but when both outlast their slack, every pair of gaps the ranks could meet
    /// in, keeping the one that ends the step soonest.
    Search,
    /// As `Search`, judging each pair by the step of the placement `Slack` finishes from it.
    Rollout,
    /// The consumer always waits.
    ConsumerWaits,
    /// The sender always waits (where it can).
    SenderWaits,
}

/// Times the compute orders and places every message. Each strategy of settling the messages
/// whose ranks never meet in the as-soon-as-possible timeline is tried (only `Slack` on large
/// schedules), and the placement with the shortest step is kept.
fn place(
    schedule: &Schedule,
    topology: &Topology,
    costs: &Costs,
) -> Result<(Timeline, Vec<Placed>), LowerError> {
    /// Above this many computes, only [`Strategy::Slack`] is tried.
    const TRY_ALL: usize = 4_000;
    /// Above this many computes, [`Strategy::Rollout`] is not tried.
    const ROLL_OUT: usize = 2_000;
    let graph = Graph::new(schedule, topology, costs)?;
    let size = graph.duration.len();
    let strategies: Vec<Strategy> = [
        Strategy::Slack,
        Strategy::Rollout,
        Strategy::Search,
        Strategy::ConsumerWaits,
        Strategy::SenderWaits,
    ]
    .into_iter()
    .filter(|&s| match s {
        Strategy::Slack => true,
        Strategy::Rollout => size <= ROLL_OUT,
        _ => size <= TRY_ALL,
    })
    .collect();
    let bound = graph.makespan(&graph.order(schedule)?);
    let mut best: Option<(f64, Timeline, Vec<Placed>)> = None;
    for strategy in strategies {
        let (makespan, timeline, messages) =
            place_with(schedule, topology, graph.clone(), strategy)?;
        if best
            .as_ref()
            .is_none_or(|b| makespan < b.0 - timeline.tolerance)
        {
            best = Some((makespan, timeline, messages));
        }
        // The as-soon-as-possible step cannot be beaten.
        if best
            .as_ref()
            .is_some_and(|b| b.0 <= bound + graph.tolerance)
        {
            break;
        }
    }
    let (_, timeline, messages) = best.expect("at least one strategy");
    Ok((timeline, messages))
}

/// Places every message with `strategy`, adding waits to `graph` where two ranks never meet
/// until every message has a meeting time (or the work budget is spent). Returns the step time
/// of the timeline the placement follows.
fn place_with(
    schedule: &Schedule,
    topology: &Topology,
    mut graph: Graph,
    strategy: Strategy,
) -> Result<(f64, Timeline, Vec<Placed>), LowerError> {
    /// Resolving one conflict per round takes about `rounds x computes` steps; past this many,
    /// every round resolves all its conflicts at once.
    const ONE_AT_A_TIME: usize = 20_000_000;
    /// Rounds that resolve all their conflicts at once, at most.
    const ALL_AT_ONCE: usize = 64;
    let computes = graph.duration.len().max(1);
    let mut rounds = 0usize;
    loop {
        let order = graph.order(schedule)?;
        let start = graph.earliest(&order);
        let timeline = graph.timeline(&start);
        let (messages, mut conflicts) = messages(schedule, topology, &graph, &timeline);
        let makespan = graph.makespan(&order);
        let one = rounds * computes < ONE_AT_A_TIME;
        if conflicts.is_empty()
            || (!one && rounds * computes >= ONE_AT_A_TIME + ALL_AT_ONCE * computes)
        {
            return Ok((makespan, timeline, messages));
        }
        rounds += 1;
        let latest = graph.latest(&order, makespan);
        conflicts.sort_by(|a, b| a.ready.total_cmp(&b.ready));
        let take = if one { 1 } else { conflicts.len() };
        for conflict in &conflicts[..take] {
            let mut options = resolve(&graph, &timeline, &start, &latest, conflict);
            let edges = match strategy {
                Strategy::ConsumerWaits => options
                    .into_iter()
                    .find(|o| o.3 == Wait::Consumer)
                    .map(|o| vec![o.2]),
                Strategy::SenderWaits => options
                    .iter()
                    .find(|o| o.3 == Wait::Sender)
                    .or(options.first())
                    .map(|o| vec![o.2]),
                Strategy::Slack | Strategy::Search | Strategy::Rollout => {
                    options.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
                    if one && options.len() == 2 && options[0].0 > timeline.tolerance {
                        // Both delays outlast their slack.
                        let candidates = if strategy != Strategy::Slack {
                            meetings(&graph, &timeline, conflict)
                        } else {
                            options.iter().map(|o| vec![o.2]).collect()
                        };
                        let mut best: Option<(f64, Vec<(usize, usize)>)> = None;
                        for edges in candidates {
                            for &(from, to) in &edges {
                                graph.add_edge(from, to);
                            }
                            let makespan = if strategy == Strategy::Rollout {
                                graph.order(schedule).ok().and_then(|_| {
                                    place_with(schedule, topology, graph.clone(), Strategy::Slack)
                                        .ok()
                                        .map(|p| p.0)
                                })
                            } else {
                                graph.order(schedule).ok().map(|o| graph.makespan(&o))
                            };
                            for &(from, to) in edges.iter().rev() {
                                graph.remove_edge(from, to);
                            }
                            if let Some(m) = makespan
                                && best.as_ref().is_none_or(|b| m < b.0 - timeline.tolerance)
                            {
                                best = Some((m, edges));
                            }
                        }
                        best.map(|b| b.1)
                    } else {
                        options.first().map(|o| vec![o.2])
                    }
                }
            };
            for (from, to) in edges.unwrap_or_default() {
                graph.add_edge(from, to);
            }
        }
    }
}

/// Every pair of gaps in which the two ranks of `conflict` could meet, as the edges that make
/// them meet there: the sender's gap after its compute `i` (the producer or a later one that
/// starts before the consumer is due), the receiver's gap before its compute `j` (the consumer
/// or an earlier one that ends after the producer).
fn meetings(graph: &Graph, timeline: &Timeline, conflict: &Conflict) -> Vec<Vec<(usize, usize)>> {
    let &Conflict {
        from,
        q,
        to,
        c,
        ready,
        due,
    } = conflict;
    let tolerance = timeline.tolerance;
    let sender = timeline.starts[from as usize].len();
    let i_last = timeline.starts[from as usize].partition_point(|&s| s < due - tolerance);
    let j_first = timeline.ends[to as usize].partition_point(|&e| e <= ready + tolerance);
    let mut out = Vec::new();
    for i in q..i_last.max(q + 1) {
        for j in j_first..=c {
            let mut edges = vec![(graph.id(from, i), graph.id(to, j))];
            if i + 1 < sender && j > 0 {
                edges.push((graph.id(to, j - 1), graph.id(from, i + 1)));
            }
            out.push(edges);
        }
    }
    out
}

/// Which rank waits when two ranks never meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// The consumer waits until the sender ends the compute it runs when the consumer is due.
    Consumer,
    /// The sender waits after the producer until the receiver ends its current compute.
    Sender,
}

/// The waits that let the two ranks of `conflict` meet, each with its cost (the delay beyond
/// the slack of the compute it delays), its delay and the edge (from, to) of the graph.
fn resolve(
    graph: &Graph,
    timeline: &Timeline,
    start: &[f64],
    latest: &[f64],
    conflict: &Conflict,
) -> Vec<(f64, f64, (usize, usize), Wait)> {
    let &Conflict {
        from,
        q,
        to,
        c,
        ready,
        due,
    } = conflict;
    let tolerance = timeline.tolerance;
    let mut options = Vec::with_capacity(2);
    let i = timeline.starts[from as usize].partition_point(|&s| s < due - tolerance);
    if i > 0 {
        let consumer = graph.id(to, c);
        let delay = timeline.ends[from as usize][i - 1] - due;
        let cost = (delay - (latest[consumer] - start[consumer])).max(0.0);
        options.push((
            cost,
            delay,
            (graph.id(from, i - 1), consumer),
            Wait::Consumer,
        ));
    }
    let j = timeline.starts[to as usize].partition_point(|&s| s < ready - tolerance);
    if j > 0 && q + 1 < timeline.starts[from as usize].len() {
        let next = graph.id(from, q + 1);
        let delay = timeline.ends[to as usize][j - 1] - start[next];
        let cost = (delay - (latest[next] - start[next])).max(0.0);
        options.push((cost, delay, (graph.id(to, j - 1), next), Wait::Sender));
    }
    options
}

/// Lowers a compute order read from torch's CSV (`dualpipe_schedule::read_torch_csv`) into a
/// schedule labelled `name`.
pub fn lower_torch_order(order: ComputeOrder, name: &str) -> Result<Schedule, LowerError> {
    lower(order.named(name))
}

/// The computes as a graph: each waits for the previous compute of its rank, for the computes
/// whose results it uses, and for the extra edges the placement adds.
#[derive(Clone)]
struct Graph {
    /// Per rank: the id of its first compute; ids run along each rank's list.
    first: Vec<usize>,
    duration: Vec<f64>,
    preds: Vec<Vec<u32>>,
    succs: Vec<Vec<u32>>,
    /// Per (stage, micro-batch) slot: the compute that runs its forward (`[0]`) and backward
    /// (`[1]`).
    producer: [Vec<u32>; 2],
    num_microbatches: usize,
    /// Times closer than this are the same time (sums of costs round differently).
    tolerance: f64,
}

const UNSET: u32 = u32::MAX;

impl Graph {
    fn new(schedule: &Schedule, topology: &Topology, costs: &Costs) -> Result<Self, LowerError> {
        let num_stages = schedule.num_stages;
        let stage_costs: Vec<StageCosts> = (0..num_stages).map(|s| costs.stage(s)).collect();
        // A compute that costs nothing still takes a sliver of time, so that every compute ends
        // after it starts and a message is never placed before its producer.
        let largest = stage_costs
            .iter()
            .map(|c| c.f.max(c.b).max(c.fb.unwrap_or(0.0)))
            .fold(1.0, f64::max);
        let floor = largest * 1e-6;
        let cost = |instruction: Instruction| -> f64 {
            let c = |w: Work| stage_costs[w.stage as usize];
            let d = match instruction {
                Instruction::Forward(w) => c(w).f,
                Instruction::Backward { work, defer_w } => {
                    c(work).b - if defer_w { c(work).w } else { 0.0 }
                }
                Instruction::Weight(w) => c(w).w,
                Instruction::ForwardBackward { f, b } => c(f).fb.unwrap_or(c(f).f + c(b).b),
                Instruction::Send(_) | Instruction::Recv(_) | Instruction::Commit => 0.0,
            };
            d.max(floor)
        };
        let m = schedule.num_microbatches as usize;
        let slots = num_stages as usize * m;
        let slot = |w: Work| w.stage as usize * m + w.mb as usize;
        let mut first = Vec::with_capacity(schedule.ranks.len());
        let mut duration = Vec::new();
        let mut producer = [vec![UNSET; slots], vec![UNSET; slots]];
        for (rank, list) in schedule.ranks.iter().enumerate() {
            first.push(duration.len());
            for (k, &instruction) in list.iter().enumerate() {
                if let Some(w) = works(instruction).find(|&w| !topology.contains(w)) {
                    return Err(LowerError::Invalid(format!(
                        "rank {rank} instruction {k}: `{instruction}` names {w:?}, which the pipelines do not hold"
                    )));
                }
                let id = duration.len() as u32;
                duration.push(cost(instruction));
                match instruction {
                    Instruction::Forward(w) => producer[0][slot(w)] = id,
                    Instruction::Backward { work, .. } => producer[1][slot(work)] = id,
                    Instruction::ForwardBackward { f, b } => {
                        producer[0][slot(f)] = id;
                        producer[1][slot(b)] = id;
                    }
                    _ => {}
                }
            }
        }
        let total = duration.len();
        let mut preds: Vec<Vec<u32>> = vec![Vec::new(); total];
        let mut succs: Vec<Vec<u32>> = vec![Vec::new(); total];
        let mut deps = Vec::new();
        for (rank, list) in schedule.ranks.iter().enumerate() {
            for (k, &instruction) in list.iter().enumerate() {
                let id = first[rank] + k;
                if k > 0 {
                    preds[id].push(id as u32 - 1);
                    succs[id - 1].push(id as u32);
                }
                dependencies(instruction, topology, &mut deps);
                for &(which, work) in &deps {
                    let from = producer[which][slot(work)];
                    if from == UNSET {
                        return Err(LowerError::Cyclic(format!(
                            "rank {rank} instruction {k} `{instruction}` waits for a {} of stage {} micro-batch {} that no rank runs",
                            ["forward", "backward"][which],
                            work.stage,
                            work.mb
                        )));
                    }
                    preds[id].push(from);
                    succs[from as usize].push(id as u32);
                }
            }
        }
        Ok(Graph {
            first,
            duration,
            preds,
            succs,
            producer,
            num_microbatches: m,
            tolerance: floor * 1e-3,
        })
    }

    fn id(&self, rank: u32, k: usize) -> usize {
        self.first[rank as usize] + k
    }

    /// Makes compute `to` wait for compute `from` (ids).
    fn add_edge(&mut self, from: usize, to: usize) {
        self.preds[to].push(from as u32);
        self.succs[from].push(to as u32);
    }

    /// The computes in an order that respects every edge, or the ranks stuck in a cycle.
    fn order(&self, schedule: &Schedule) -> Result<Vec<u32>, LowerError> {
        let mut waiting: Vec<u32> = self.preds.iter().map(|p| p.len() as u32).collect();
        let mut ready: Vec<u32> = (0..self.duration.len() as u32)
            .filter(|&v| waiting[v as usize] == 0)
            .collect();
        let mut order = Vec::with_capacity(self.duration.len());
        while let Some(v) = ready.pop() {
            order.push(v);
            for &u in &self.succs[v as usize] {
                waiting[u as usize] -= 1;
                if waiting[u as usize] == 0 {
                    ready.push(u);
                }
            }
        }
        if order.len() == self.duration.len() {
            return Ok(order);
        }
        let stuck: Vec<String> = schedule
            .ranks
            .iter()
            .enumerate()
            .filter_map(|(rank, list)| {
                let k = (0..list.len()).find(|&k| waiting[self.first[rank] + k] > 0)?;
                Some(format!(
                    "rank {rank} waits at instruction {k} `{}`",
                    list[k]
                ))
            })
            .collect();
        Err(LowerError::Cyclic(stuck.join(", ")))
    }

    /// Undoes the last [`Graph::add_edge`] of (`from`, `to`).
    fn remove_edge(&mut self, from: usize, to: usize) {
        self.preds[to].pop();
        self.succs[from].pop();
    }

    /// The step time of the as-soon-as-possible run.
    fn makespan(&self, order: &[u32]) -> f64 {
        self.earliest(order)
            .iter()
            .zip(&self.duration)
            .map(|(s, d)| s + d)
            .fold(0.0, f64::max)
    }

    /// The as-soon-as-possible run: when each compute starts.
    fn earliest(&self, order: &[u32]) -> Vec<f64> {
        let mut start = vec![0.0f64; self.duration.len()];
        for &v in order {
            let v = v as usize;
            start[v] = self.preds[v]
                .iter()
                .map(|&p| start[p as usize] + self.duration[p as usize])
                .fold(0.0, f64::max);
        }
        start
    }

    /// The as-late-as-possible run that ends with `makespan`: when each compute must start at
    /// the latest.
    fn latest(&self, order: &[u32], makespan: f64) -> Vec<f64> {
        let mut latest = vec![0.0f64; self.duration.len()];
        for &v in order.iter().rev() {
            let v = v as usize;
            let end = self.succs[v]
                .iter()
                .map(|&u| latest[u as usize])
                .fold(makespan, f64::min);
            latest[v] = end - self.duration[v];
        }
        latest
    }

    fn timeline(&self, start: &[f64]) -> Timeline {
        let split = |values: Vec<f64>| -> Vec<Vec<f64>> {
            let mut ends = self.first[1..].to_vec();
            ends.push(values.len());
            self.first
                .iter()
                .zip(ends)
                .map(|(&a, b)| values[a..b].to_vec())
                .collect()
        };
        Timeline {
            starts: split(start.to_vec()),
            ends: split(
                start
                    .iter()
                    .zip(&self.duration)
                    .map(|(s, d)| s + d)
                    .collect(),
            ),
            tolerance: self.tolerance,
        }
    }
}

/// Per rank, when each compute starts and ends.
struct Timeline {
    starts: Vec<Vec<f64>>,
    ends: Vec<Vec<f64>>,
    tolerance: f64,
}

impl Timeline {
    /// The end of the compute `rank` runs at `t` (one that started before `t` and ends after
    /// it), or `None` when the rank is between computes at `t`.
    fn busy_until(&self, rank: u32, t: f64) -> Option<f64> {
        let (starts, ends) = (&self.starts[rank as usize], &self.ends[rank as usize]);
        let k = starts.partition_point(|&s| s < t - self.tolerance);
        (k > 0 && ends[k - 1] > t + self.tolerance).then(|| ends[k - 1])
    }

    /// The computes of `rank` that start before `t`.
    fn before(&self, rank: u32, t: f64) -> usize {
        self.starts[rank as usize].partition_point(|&s| s < t)
    }

    /// The first time in `[ready, due]` at which both `from` and `to` are between computes.
    fn meeting(&self, from: u32, to: u32, ready: f64, due: f64) -> Option<f64> {
        let mut t = ready;
        while t <= due + self.tolerance {
            match (self.busy_until(from, t), self.busy_until(to, t)) {
                (None, None) => return Some(t.min(due)),
                (a, b) => t = a.unwrap_or(t).max(b.unwrap_or(t)),
            }
        }
        None
    }
}

/// What a compute needs before it can start: `(0, w)` the forward of `w`, `(1, w)` its backward.
fn dependencies(instruction: Instruction, topology: &Topology, out: &mut Vec<(usize, Work)>) {
    out.clear();
    let forward = |w: Work, out: &mut Vec<(usize, Work)>| {
        if w.stage > 0 {
            out.push((0, Work::new(w.stage - 1, w.mb)));
        }
    };
    let backward = |w: Work, out: &mut Vec<(usize, Work)>| {
        out.push((0, w));
        if !topology.is_last_stage(w.stage) {
            out.push((1, Work::new(w.stage + 1, w.mb)));
        }
    };
    match instruction {
        Instruction::Forward(w) => forward(w, out),
        Instruction::Backward { work, .. } => backward(work, out),
        Instruction::Weight(w) => out.push((1, w)),
        Instruction::ForwardBackward { f, b } => {
            forward(f, out);
            backward(b, out);
        }
        Instruction::Send(_) | Instruction::Recv(_) | Instruction::Commit => {}
    }
}

/// A message whose two ranks are never between computes at the same time while it is in
/// flight: the producer `q` on `from` ends at `ready`, the consumer `c` on `to` starts at `due`.
#[derive(Clone, Copy, Debug)]
struct Conflict {
    from: u32,
    q: usize,
    to: u32,
    c: usize,
    ready: f64,
    due: f64,
}

/// Every cross-rank message with the time it is exchanged at (its consumer's start when the two
/// ranks never meet), and the messages whose ranks never meet.
fn messages(
    schedule: &Schedule,
    topology: &Topology,
    graph: &Graph,
    timeline: &Timeline,
) -> (Vec<Placed>, Vec<Conflict>) {
    let mut out = Vec::new();
    let mut conflicts = Vec::new();
    let m = graph.num_microbatches;
    for (rank, list) in schedule.ranks.iter().enumerate() {
        let rank = rank as u32;
        for (k, &instruction) in list.iter().enumerate() {
            let due = timeline.starts[rank as usize][k];
            let (f, b) = match instruction {
                Instruction::Forward(w) => (Some(w), None),
                Instruction::Backward { work, .. } => (None, Some(work)),
                Instruction::ForwardBackward { f, b } => (Some(f), Some(b)),
                _ => (None, None),
            };
            let mut place = |kind: Kind, producer: Work, from: u32| {
                let which = usize::from(kind == Kind::Grad);
                let id = graph.producer[which][producer.stage as usize * m + producer.mb as usize]
                    as usize;
                let q = id - graph.first[from as usize];
                let ready = timeline.ends[from as usize][q];
                let at = timeline.meeting(from, rank, ready, due).unwrap_or_else(|| {
                    conflicts.push(Conflict {
                        from,
                        q,
                        to: rank,
                        c: k,
                        ready,
                        due,
                    });
                    due
                });
                out.push(Placed {
                    at,
                    kind,
                    stage: producer.stage,
                    mb: producer.mb,
                    from,
                    to: rank,
                });
            };
            if let Some(w) = f
                && let Some(prev) = topology.prev_rank(w)
                && prev != rank
            {
                place(Kind::Act, Work::new(w.stage - 1, w.mb), prev);
            }
            if let Some(w) = b
                && let Some(next) = topology.next_rank(w)
                && next != rank
            {
                place(Kind::Grad, Work::new(w.stage + 1, w.mb), next);
            }
        }
    }
    (out, conflicts)
}
