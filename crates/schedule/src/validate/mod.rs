//! The validator: the five rules of `docs/format.md`.
//!
//! 1. Completeness, 2. data dependencies and 3. communication are checked by one in-order scan
//!    of each rank's list plus a comparison of every channel's send and receive sequences.
//! 4. Progress is checked on a dependency graph across ranks (petgraph), once for the blocking
//!    and once for the asynchronous execution model; see [`progress`].
//! 5. Every [`Violation`] carries its [`Location`] and [`Rule`].

mod progress;

use std::collections::HashMap;
use std::fmt;

use crate::batches::Batches;
use crate::diagnostics::{ExecutionModel, Location, Rule, Violation, abbreviate, plural};
use crate::format::{Instruction, Kind, Message, Schedule, Work};
use crate::topology::Topology;

/// Every violation found in a schedule, in the order found (header first, then rank by rank).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationErrors {
    /// The violations; never empty.
    pub violations: Vec<Violation>,
}

impl ValidationErrors {
    /// How many violations are printed by `Display` before the rest are summarized.
    pub const SHOWN: usize = 20;
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.violations.len();
        write!(
            f,
            "invalid schedule: {n} problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for violation in self.violations.iter().take(Self::SHOWN) {
            write!(f, "\n  {violation}")?;
        }
        if n > Self::SHOWN {
            write!(f, "\n  ... and {} more", n - Self::SHOWN)?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// How sends and receives pair up in a valid schedule, and which commit posts each of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Links {
    /// Per rank, per instruction: for a send or recv, the index of its partner on the peer
    /// rank; `NONE` otherwise.
    partner: Vec<Vec<u32>>,
    /// Per rank, per instruction: for a send or recv, the index of the commit that posts it;
    /// `NONE` otherwise.
    commit: Vec<Vec<u32>>,
}

const NONE: u32 = u32::MAX;

impl Links {
    /// The index, on the peer rank, of the recv (for a send) or send (for a recv) at
    /// `(rank, index)`; `None` for any other instruction.
    pub fn partner(&self, rank: usize, index: usize) -> Option<usize> {
        let p = self.partner[rank][index];
        (p != NONE).then_some(p as usize)
    }

    /// The index of the commit that posts the send or recv at `(rank, index)`.
    pub fn commit_of(&self, rank: usize, index: usize) -> Option<usize> {
        let c = self.commit[rank][index];
        (c != NONE).then_some(c as usize)
    }
}

/// What validation learns about a valid schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Where every stage of every micro-batch runs.
    pub topology: Topology,
    /// How messages pair up.
    pub links: Links,
    /// Which commit batch posts each send and receive.
    pub batches: Batches,
}

/// A schedule that passed [`validate`]. The executor and the simulator take this type, so a
/// schedule that was never checked cannot reach them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSchedule {
    schedule: Schedule,
    report: Report,
}

impl ValidSchedule {
    /// Validates `schedule` and keeps it with what validation learned.
    pub fn new(schedule: Schedule) -> Result<Self, ValidationErrors> {
        let report = validate(&schedule)?;
        Ok(ValidSchedule { schedule, report })
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Where work runs.
    pub fn topology(&self) -> &Topology {
        &self.report.topology
    }

    /// How messages pair up.
    pub fn links(&self) -> &Links {
        &self.report.links
    }

    /// The numbering of the commit batches, shared by the progress check and the simulator.
    pub fn batches(&self) -> &Batches {
        &self.report.batches
    }

    /// Gives the schedule back.
    pub fn into_inner(self) -> Schedule {
        self.schedule
    }
}

/// Checks every rule of the format. On success returns the topology and the message pairing;
/// on failure every violation found (at least one).
///
/// ```
/// use dualpipe_schedule::{parse_program, validate, Format, Pipeline, Schedule};
/// let schedule = Schedule {
///     format: Format::V1,
///     schedule: "demo".into(),
///     num_ranks: 2,
///     num_stages: 2,
///     num_microbatches: 1,
///     forward_only: true,
///     pipelines: vec![Pipeline { route: vec![0, 1], microbatches: vec![0] }],
///     ranks: vec![
///         parse_program("F s0 m0 | send act s0 m0 -> r1 | commit").unwrap(),
///         parse_program("recv act s1 m0 <- r0 | F s1 m0").unwrap(),
///     ],
/// };
/// let errors = validate(&schedule).unwrap_err();
/// assert!(errors.to_string().contains("rank 1, instruction 1 `F s1 m0`"));
/// ```
pub fn validate(schedule: &Schedule) -> Result<Report, ValidationErrors> {
    let topology = Topology::new(schedule).map_err(|violations| ValidationErrors { violations })?;
    let mut scan = Scan::new(schedule, &topology);
    for rank in 0..schedule.ranks.len() {
        scan.rank(rank as u32);
    }
    scan.completeness();
    let links = scan.match_channels();
    if !scan.problems.is_empty() {
        return Err(ValidationErrors {
            violations: scan.problems,
        });
    }
    let links = links.expect("channels match when no problem was found");
    let batches = Batches::new(schedule);
    let check = |model| progress::check(schedule, &topology, &links, &batches, model);
    // The two models are independent checks: on large schedules, run them side by side.
    let instructions: usize = schedule.ranks.iter().map(Vec::len).sum();
    let (blocking, asynchronous) = if instructions < 50_000 {
        (
            check(ExecutionModel::Blocking),
            check(ExecutionModel::Async),
        )
    } else {
        std::thread::scope(|scope| {
            let other = scope.spawn(|| check(ExecutionModel::Async));
            let blocking = check(ExecutionModel::Blocking);
            let asynchronous = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (blocking, asynchronous)
        })
    };
    let problems: Vec<Violation> = [blocking, asynchronous]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if !problems.is_empty() {
        return Err(ValidationErrors {
            violations: problems,
        });
    }
    Ok(Report {
        topology,
        links,
        batches,
    })
}

/// The position of an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct At {
    rank: u32,
    index: u32,
}

/// A send or receive as seen on its own rank.
#[derive(Clone, Copy, Debug)]
struct Posted {
    at: At,
    /// How many commits precede it on its rank: it is posted by commit number `batch`.
    batch: u32,
}

/// Messages per ordered pair of ranks, stored with the rank that issues them. A rank talks to
/// few peers, so each rank keeps a short list of (peer, messages in issue order).
#[derive(Default)]
struct Channels {
    by_rank: Vec<Vec<(u32, Vec<Posted>)>>,
}

impl Channels {
    fn new(ranks: usize) -> Self {
        Channels {
            by_rank: vec![Vec::new(); ranks],
        }
    }

    fn push(&mut self, rank: u32, peer: u32, posted: Posted) {
        let peers = &mut self.by_rank[rank as usize];
        match peers.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, list)) => list.push(posted),
            None => peers.push((peer, vec![posted])),
        }
    }

    fn get(&self, rank: u32, peer: u32) -> &[Posted] {
        self.by_rank[rank as usize]
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(&[], |(_, list)| list.as_slice())
    }

    /// Every (rank, peer) with at least one message.
    fn pairs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.by_rank
            .iter()
            .enumerate()
            .flat_map(|(rank, peers)| peers.iter().map(move |(peer, _)| (rank as u32, *peer)))
    }
}

/// State of the in-order scan over all ranks.
struct Scan<'a> {
    schedule: &'a Schedule,
    topology: &'a Topology,
    problems: Vec<Violation>,
    forward: Vec<Option<At>>,
    backward: Vec<Option<(At, bool)>>,
    weight: Vec<Option<At>>,
    recv: [Vec<Option<Posted>>; 2],
    send: [Vec<Option<At>>; 2],
    /// Per ordered pair of ranks (from, to): the sends in issue order on `from`, kept on `from`.
    sends: Channels,
    /// Per ordered pair of ranks (from, to): the receives in issue order on `to`.
    recvs: Channels,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Act => 0,
        Kind::Grad => 1,
    }
}

impl<'a> Scan<'a> {
    fn new(schedule: &'a Schedule, topology: &'a Topology) -> Self {
        let slots = topology.num_stages() as usize * topology.num_microbatches() as usize;
        Scan {
            schedule,
            topology,
            problems: Vec::new(),
            forward: vec![None; slots],
            backward: vec![None; slots],
            weight: vec![None; slots],
            recv: [vec![None; slots], vec![None; slots]],
            send: [vec![None; slots], vec![None; slots]],
            sends: Channels::new(schedule.ranks.len()),
            recvs: Channels::new(schedule.ranks.len()),
        }
    }

    fn location(&self, at: At) -> Location {
        Location::Instruction {
            rank: at.rank,
            index: at.index as usize,
            instruction: self.schedule.ranks[at.rank as usize][at.index as usize],
        }
    }

    fn problem(&mut self, rule: Rule, at: At, message: String) {
        let location = self.location(at);
        self.problems.push(Violation::new(rule, location, message));
    }

    /// Checks that `work` exists and runs on `at.rank`. Returns false (and records why) if not.
    fn placed_here(&mut self, at: At, work: Work, what: &str) -> bool {
        if !self.topology.contains(work) {
            let (s, c) = (self.topology.num_stages(), self.topology.num_microbatches());
            self.problem(
                Rule::Structure,
                at,
                format!(
                    "{what} {work} is out of range ({}, {})",
                    plural(s, "stage"),
                    plural(c, "micro-batch")
                ),
            );
            return false;
        }
        let owner = self.topology.rank_of(work);
        if owner != at.rank {
            self.problem(
                Rule::Completeness,
                at,
                format!(
                    "{what} {work} belongs on rank {owner}: the route of micro-batch {} puts stage {} there",
                    work.mb, work.stage
                ),
            );
            return false;
        }
        true
    }

    fn no_backward_in_inference(&mut self, at: At) -> bool {
        if self.schedule.forward_only {
            self.problem(
                Rule::Completeness,
                at,
                "a forward-only schedule has no backward, weight gradient or gradient message"
                    .into(),
            );
            return false;
        }
        true
    }

    /// Whether the input of `F work` is available at `at`, with `batches` commits done.
    fn check_forward_input(&mut self, at: At, work: Work, batches: u32) {
        let Some(prev) = self.topology.prev_rank(work) else {
            return;
        };
        if prev == at.rank {
            let before = Work::new(work.stage - 1, work.mb);
            if !self.done_before(self.forward[self.topology.slot(before)], at) {
                self.problem(
                    Rule::DataDependency,
                    at,
                    format!(
                        "its input is the output of F {before} on this rank, which has not run yet"
                    ),
                );
            }
            return;
        }
        let recv = self.recv[0][self.topology.slot(work)];
        self.check_received(at, Kind::Act, work, prev, recv, batches);
    }

    /// Whether the output gradient of `B work` is available at `at`.
    fn check_backward_input(&mut self, at: At, work: Work, batches: u32) {
        let Some(next) = self.topology.next_rank(work) else {
            return;
        };
        if next == at.rank {
            let after = Work::new(work.stage + 1, work.mb);
            let done = self.backward[self.topology.slot(after)].map(|(b, _)| b);
            if !self.done_before(done, at) {
                self.problem(
                    Rule::DataDependency,
                    at,
                    format!(
                        "its output gradient comes from B {after} on this rank, which has not run yet"
                    ),
                );
            }
            return;
        }
        let recv = self.recv[1][self.topology.slot(work)];
        self.check_received(at, Kind::Grad, work, next, recv, batches);
    }

    fn check_received(
        &mut self,
        at: At,
        kind: Kind,
        work: Work,
        peer: u32,
        recv: Option<Posted>,
        batches: u32,
    ) {
        let what = match kind {
            Kind::Act => "its input activation",
            Kind::Grad => "its output gradient",
        };
        let wanted = Instruction::recv(kind, work.stage, work.mb, peer);
        match recv {
            Some(posted) if posted.at.rank == at.rank && posted.at.index < at.index => {
                if posted.batch >= batches {
                    self.problem(
                        Rule::DataDependency,
                        at,
                        format!(
                            "{what} is received by instruction {} `{wanted}`, but no commit between them posts that receive",
                            posted.at.index
                        ),
                    );
                }
            }
            _ => self.problem(
                Rule::DataDependency,
                at,
                format!("{what} comes from rank {peer}, but no earlier `{wanted}` receives it"),
            ),
        }
    }

    fn done_before(&self, done: Option<At>, at: At) -> bool {
        matches!(done, Some(d) if d.rank == at.rank && d.index < at.index)
    }

    fn forward(&mut self, at: At, work: Work, batches: u32) {
        if !self.placed_here(at, work, "F") {
            return;
        }
        let slot = self.topology.slot(work);
        if let Some(first) = self.forward[slot] {
            self.problem(
                Rule::Completeness,
                at,
                format!(
                    "second forward of {work}; the first is rank {} instruction {}",
                    first.rank, first.index
                ),
            );
            return;
        }
        self.check_forward_input(at, work, batches);
        self.forward[slot] = Some(at);
    }

    fn backward(&mut self, at: At, work: Work, defer_w: bool, batches: u32) {
        if !self.no_backward_in_inference(at) || !self.placed_here(at, work, "B") {
            return;
        }
        let slot = self.topology.slot(work);
        if let Some((first, _)) = self.backward[slot] {
            self.problem(
                Rule::Completeness,
                at,
                format!(
                    "second backward of {work}; the first is rank {} instruction {}",
                    first.rank, first.index
                ),
            );
            return;
        }
        if !self.done_before(self.forward[slot], at) {
            self.problem(
                Rule::DataDependency,
                at,
                format!(
                    "no earlier `F {work}` on this rank: a backward needs its forward's activation"
                ),
            );
        }
        self.check_backward_input(at, work, batches);
        self.backward[slot] = Some((at, defer_w));
    }

    fn weight(&mut self, at: At, work: Work) {
        if !self.no_backward_in_inference(at) || !self.placed_here(at, work, "W") {
            return;
        }
        let slot = self.topology.slot(work);
        if let Some(first) = self.weight[slot] {
            self.problem(
                Rule::Completeness,
                at,
                format!(
                    "second weight gradient of {work}; the first is rank {} instruction {}",
                    first.rank, first.index
                ),
            );
            return;
        }
        match self.backward[slot] {
            Some((b, true)) if self.done_before(Some(b), at) => {}
            Some((b, false)) => self.problem(
                Rule::Completeness,
                at,
                format!(
                    "the backward of {work} (instruction {}) is not deferred (`defer_w` is false), so it already computed the weight gradient",
                    b.index
                ),
            ),
            _ => self.problem(
                Rule::DataDependency,
                at,
                format!("no earlier `B {work} defer_w` on this rank leaves this weight gradient to do"),
            ),
        }
        self.weight[slot] = Some(at);
    }

    fn forward_backward(&mut self, at: At, f: Work, b: Work, batches: u32) {
        if f.mb == b.mb {
            self.problem(
                Rule::Structure,
                at,
                format!(
                    "an FB overlaps two different micro-batches, but both halves use micro-batch {}",
                    f.mb
                ),
            );
            return;
        }
        self.forward(at, f, batches);
        self.backward(at, b, false, batches);
    }

    /// Checks a send or recv and records it on its channel.
    fn message(&mut self, at: At, message: Message, is_send: bool, batches: u32) {
        let work = message.work();
        let verb = if is_send { "send" } else { "recv" };
        if message.kind == Kind::Grad && !self.no_backward_in_inference(at) {
            return;
        }
        if message.peer >= self.topology.num_ranks() {
            self.problem(
                Rule::Structure,
                at,
                format!(
                    "peer {} is out of range ({})",
                    message.peer,
                    plural(self.topology.num_ranks(), "rank")
                ),
            );
            return;
        }
        if !self.placed_here(at, work, verb) {
            return;
        }
        // Sends name the sending stage, receives the receiving stage (torch's convention).
        let toward_loss = (message.kind == Kind::Act) == is_send;
        let (expected, neighbour) = if toward_loss {
            (self.topology.next_rank(work), work.stage + 1)
        } else {
            (self.topology.prev_rank(work), work.stage.wrapping_sub(1))
        };
        let Some(expected) = expected else {
            let end = if toward_loss { "last" } else { "first" };
            self.problem(
                Rule::Communication,
                at,
                format!(
                    "stage {} is the {end} stage: there is no stage {} to {}",
                    work.stage,
                    if toward_loss {
                        neighbour.to_string()
                    } else {
                        "-1".into()
                    },
                    if is_send { "send to" } else { "receive from" }
                ),
            );
            return;
        };
        if expected == at.rank {
            self.problem(
                Rule::Communication,
                at,
                format!(
                    "stage {neighbour} of micro-batch {} also runs on rank {}: a hand-off on one rank needs no {verb}",
                    work.mb, at.rank
                ),
            );
            return;
        }
        if message.peer != expected {
            self.problem(
                Rule::Communication,
                at,
                format!(
                    "the peer is rank {}, but stage {neighbour} of micro-batch {} runs on rank {expected}",
                    message.peer, work.mb
                ),
            );
            return;
        }
        let k = kind_index(message.kind);
        let slot = self.topology.slot(work);
        let posted = Posted { at, batch: batches };
        if is_send {
            if let Some(first) = self.send[k][slot] {
                self.problem(
                    Rule::Communication,
                    at,
                    format!(
                        "a second {verb} of the same buffer; the first is instruction {}",
                        first.index
                    ),
                );
                return;
            }
            let produced = match message.kind {
                Kind::Act => self.forward[slot],
                Kind::Grad => self.backward[slot].map(|(b, _)| b),
            };
            if !self.done_before(produced, at) {
                let producer = match message.kind {
                    Kind::Act => "F",
                    Kind::Grad => "B",
                };
                self.problem(
                    Rule::DataDependency,
                    at,
                    format!("it sends the result of {producer} {work}, which has not run yet on this rank"),
                );
            }
            self.send[k][slot] = Some(at);
            self.sends.push(at.rank, message.peer, posted);
        } else {
            if let Some(first) = self.recv[k][slot] {
                self.problem(
                    Rule::Communication,
                    at,
                    format!(
                        "a second {verb} of the same buffer; the first is instruction {}",
                        first.at.index
                    ),
                );
                return;
            }
            self.recv[k][slot] = Some(posted);
            self.recvs.push(at.rank, message.peer, posted);
        }
    }

    fn rank(&mut self, rank: u32) {
        let list = &self.schedule.ranks[rank as usize];
        let mut batches = 0u32;
        let mut queued: Option<u32> = None;
        for (index, instruction) in list.iter().enumerate() {
            let at = At {
                rank,
                index: index as u32,
            };
            match *instruction {
                Instruction::Forward(work) => self.forward(at, work, batches),
                Instruction::Backward { work, defer_w } => {
                    self.backward(at, work, defer_w, batches)
                }
                Instruction::Weight(work) => self.weight(at, work),
                Instruction::ForwardBackward { f, b } => self.forward_backward(at, f, b, batches),
                Instruction::Send(message) => {
                    queued.get_or_insert(at.index);
                    self.message(at, message, true, batches);
                }
                Instruction::Recv(message) => {
                    queued.get_or_insert(at.index);
                    self.message(at, message, false, batches);
                }
                Instruction::Commit => {
                    batches += 1;
                    queued = None;
                }
            }
        }
        if let Some(first) = queued {
            self.problem(
                Rule::Communication,
                At { rank, index: first },
                "no commit follows: this and every later send or recv on the rank are never posted"
                    .into(),
            );
        }
    }

    /// Rule 1 over the whole schedule: everything that must exist does.
    fn completeness(&mut self) {
        let topology = self.topology;
        let mut missing: HashMap<(u32, &'static str), Vec<String>> = HashMap::new();
        for mb in 0..topology.num_microbatches() {
            for stage in 0..topology.num_stages() {
                let work = Work::new(stage, mb);
                let slot = topology.slot(work);
                let rank = topology.rank_of(work);
                if self.forward[slot].is_none() {
                    missing
                        .entry((rank, "F"))
                        .or_default()
                        .push(work.to_string());
                }
                if !self.schedule.forward_only && self.backward[slot].is_none() {
                    missing
                        .entry((rank, "B"))
                        .or_default()
                        .push(work.to_string());
                }
                if let Some((b, true)) = self.backward[slot]
                    && self.weight[slot].is_none()
                {
                    self.problem(
                        Rule::Completeness,
                        b,
                        format!("no later `W {work}` computes the deferred weight gradient"),
                    );
                }
                self.completeness_of_edges(work);
            }
        }
        let mut missing: Vec<_> = missing.into_iter().collect();
        missing.sort();
        for ((rank, op), works) in missing {
            let what = if op == "F" { "forward" } else { "backward" };
            self.problems.push(Violation::new(
                Rule::Completeness,
                Location::Rank(rank),
                format!("missing the {what} ({op}) of {}", abbreviate(&works)),
            ));
        }
    }

    /// Every cross-rank edge leaving `work` towards the loss (and back, in training) has its
    /// send and its receive.
    fn completeness_of_edges(&mut self, work: Work) {
        let topology = self.topology;
        let Some(next) = topology.next_rank(work) else {
            return;
        };
        let rank = topology.rank_of(work);
        if next == rank {
            return;
        }
        let after = Work::new(work.stage + 1, work.mb);
        let edges = [
            (Kind::Act, work, rank, after, next),
            (Kind::Grad, after, next, work, rank),
        ];
        for (kind, from_work, from, to_work, to) in edges {
            if kind == Kind::Grad && self.schedule.forward_only {
                continue;
            }
            let k = kind_index(kind);
            let send = self.send[k][topology.slot(from_work)];
            let recv = self.recv[k][topology.slot(to_work)];
            match (send, recv) {
                // Both present: paired by `match_channels`. Both absent: the consumer already
                // reported that its data never arrives, or it is itself reported missing.
                (Some(_), Some(_)) | (None, None) => {}
                (None, Some(r)) => self.problem(
                    Rule::Communication,
                    r.at,
                    format!(
                        "rank {from} never sends this buffer: `{}` is missing there",
                        Instruction::send(kind, from_work.stage, from_work.mb, to)
                    ),
                ),
                (Some(s), None) => self.problem(
                    Rule::Communication,
                    s,
                    format!(
                        "rank {to} never receives this buffer: `{}` is missing there",
                        Instruction::recv(kind, to_work.stage, to_work.mb, from)
                    ),
                ),
            }
        }
    }

    /// Rule 3's ordering: on every channel, the k-th send pairs with the k-th receive.
    /// Returns the pairing when every channel matches.
    fn match_channels(&mut self) -> Option<Links> {
        let mut partner: Vec<Vec<u32>> = self
            .schedule
            .ranks
            .iter()
            .map(|l| vec![NONE; l.len()])
            .collect();
        let mut commit: Vec<Vec<u32>> = partner.clone();
        let mut commit_index: Vec<Vec<u32>> = Vec::with_capacity(self.schedule.ranks.len());
        for list in &self.schedule.ranks {
            commit_index.push(
                list.iter()
                    .enumerate()
                    .filter(|(_, i)| matches!(i, Instruction::Commit))
                    .map(|(i, _)| i as u32)
                    .collect(),
            );
        }
        let all_sends = std::mem::take(&mut self.sends);
        let all_recvs = std::mem::take(&mut self.recvs);
        let mut channels: Vec<(u32, u32)> = all_sends
            .pairs()
            .chain(all_recvs.pairs().map(|(to, from)| (from, to)))
            .collect();
        channels.sort_unstable();
        channels.dedup();
        let mut ok = true;
        for (from, to) in channels {
            let sends = all_sends.get(from, to);
            let recvs = all_recvs.get(to, from);
            for (k, (send, recv)) in sends.iter().zip(recvs).enumerate() {
                let message = |p: &Posted| match self.schedule.ranks[p.at.rank as usize]
                    [p.at.index as usize]
                {
                    Instruction::Send(m) | Instruction::Recv(m) => m,
                    _ => unreachable!("only sends and receives are posted"),
                };
                let (sent, received) = (message(send), message(recv));
                let expected_stage = match sent.kind {
                    Kind::Act => sent.stage + 1,
                    Kind::Grad => sent.stage.wrapping_sub(1),
                };
                let pairs = received.kind == sent.kind
                    && received.mb == sent.mb
                    && received.stage == expected_stage;
                if !pairs {
                    ok = false;
                    let send_text = self.schedule.ranks[from as usize][send.at.index as usize];
                    let recv_text = self.schedule.ranks[to as usize][recv.at.index as usize];
                    self.problem(
                        Rule::Communication,
                        send.at,
                        format!(
                            "message {} on channel r{from} -> r{to} is `{send_text}`, but rank {to}'s receive number {} from rank {from} is instruction {} `{recv_text}`; messages carry no tags, so both sides must issue them in the same order",
                            k + 1,
                            k + 1,
                            recv.at.index
                        ),
                    );
                    break;
                }
                let (s, r) = (send.at, recv.at);
                partner[s.rank as usize][s.index as usize] = r.index;
                partner[r.rank as usize][r.index as usize] = s.index;
                // An op with no commit after it was reported by the rank scan.
                let posted_by = |at: At, batch: u32| {
                    commit_index[at.rank as usize]
                        .get(batch as usize)
                        .copied()
                        .unwrap_or(NONE)
                };
                commit[s.rank as usize][s.index as usize] = posted_by(s, send.batch);
                commit[r.rank as usize][r.index as usize] = posted_by(r, recv.batch);
            }
            if sends.len() != recvs.len() {
                // The missing halves were reported by the completeness pass.
                ok = false;
            }
        }
        (ok && self.problems.is_empty()).then_some(Links { partner, commit })
    }
}
