//! Rule 4: the schedule runs to the end under both execution models.
//!
//! Each model becomes a dependency graph whose nodes are events (a rank reaching a commit, a
//! batch completing, a compute getting its data) and whose edges say "cannot happen before".
//! Every event waits for all of its predecessors, so the schedule runs to the end exactly when
//! the graph is acyclic. On a cycle, a Kahn pass finds where each rank stops, and the error says
//! what each stopped rank waits for.
//!
//! - Blocking (the reference implementation): a commit posts its batch and returns only when
//!   every op in it has met its partner, i.e. when each partner's batch has been posted.
//!   Computes never wait: their data arrived before the rank passed the commit.
//! - Async: a commit launches its batch on the rank's communication stream and returns; batches
//!   on one stream run in order; a batch completes once every partner batch has started; a
//!   compute waits only for the batches that carry its inputs.

use std::fmt::Write as _;

use petgraph::Directed;
use petgraph::csr::Csr;

use super::Links;
use crate::batches::Batches;
use crate::diagnostics::{ExecutionModel, Location, Rule, Violation};
use crate::format::{Instruction, Kind, Schedule, Work};
use crate::topology::Topology;

/// The event graph of one model, with what is needed to explain a stall.
struct EventGraph {
    graph: Csr<(), (), Directed, u32>,
    /// Per rank: the host-side nodes in program order, with the instruction index each stands
    /// for (the commits, and under the async model the computes that read received data).
    host: Vec<Vec<(Node, u32)>>,
}

pub(crate) fn check(
    schedule: &Schedule,
    topology: &Topology,
    links: &Links,
    batches: &Batches,
    model: ExecutionModel,
) -> Result<(), Violation> {
    let events = match model {
        ExecutionModel::Blocking => blocking_graph(schedule, links, batches),
        ExecutionModel::Async => async_graph(schedule, topology, links, batches),
    };
    let fired = run(&events.graph);
    if fired.iter().all(|&f| f) {
        return Ok(());
    }
    Err(explain(schedule, links, batches, &events, &fired, model))
}

/// An event: a node of the graph.
type Node = u32;

/// Collects the events and edges of a model, then packs them into petgraph's compressed
/// sparse row graph (contiguous adjacency, which keeps the traversal fast on large schedules).
struct Builder {
    nodes: u32,
    edges: Vec<(Node, Node)>,
}

impl Builder {
    fn with_nodes(nodes: usize, edges: usize) -> Self {
        Builder {
            nodes: nodes as u32,
            edges: Vec::with_capacity(edges),
        }
    }

    fn add_node(&mut self) -> Node {
        self.nodes += 1;
        self.nodes - 1
    }

    fn add_edge(&mut self, from: Node, to: Node) {
        self.edges.push((from, to));
    }

    /// Sorts the edges by source with a counting sort, drops duplicates, and builds the graph.
    fn finish(self) -> Csr<(), (), Directed, u32> {
        let n = self.nodes as usize;
        let mut start = vec![0u32; n + 1];
        for &(from, _) in &self.edges {
            start[from as usize + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut next = start.clone();
        let mut sorted = vec![(0u32, 0u32); self.edges.len()];
        for &edge in &self.edges {
            let slot = &mut next[edge.0 as usize];
            sorted[*slot as usize] = edge;
            *slot += 1;
        }
        drop(self.edges);
        let mut kept = 0;
        for from in 0..n {
            let (a, b) = (start[from] as usize, start[from + 1] as usize);
            sorted[a..b].sort_unstable_by_key(|&(_, to)| to);
            let mut last = None;
            for i in a..b {
                let edge = sorted[i];
                if last != Some(edge.1) {
                    sorted[kept] = edge;
                    kept += 1;
                    last = Some(edge.1);
                }
            }
        }
        sorted.truncate(kept);
        let mut graph = Csr::from_sorted_edges(&sorted).expect("edges are sorted and unique");
        while graph.node_count() < n {
            graph.add_node(());
        }
        graph
    }
}

/// Fires every event whose predecessors have all fired (Kahn's algorithm); the graph is
/// acyclic exactly when every event fires.
fn run(graph: &Csr<(), (), Directed, u32>) -> Vec<bool> {
    let n = graph.node_count();
    let mut waiting = vec![0u32; n];
    for node in 0..n as u32 {
        for &next in graph.neighbors_slice(node) {
            waiting[next as usize] += 1;
        }
    }
    let mut ready: Vec<Node> = (0..n as u32)
        .filter(|&v| waiting[v as usize] == 0)
        .collect();
    let mut fired = vec![false; n];
    while let Some(node) = ready.pop() {
        fired[node as usize] = true;
        for &next in graph.neighbors_slice(node) {
            waiting[next as usize] -= 1;
            if waiting[next as usize] == 0 {
                ready.push(next);
            }
        }
    }
    fired
}

// Blocking: node g = batch g completes. A rank posts a batch as soon as its previous batch
// completed (computes never wait in this model), so "batch g is posted" is the event "batch
// g-1 of the same rank completed", or the start for a rank's first batch.
fn done(g: u32) -> Node {
    g
}

/// The event after which batch `g` is posted, under the blocking model: `None` if it is its
/// rank's first batch (posted at the start).
fn posted_after(batches: &Batches, g: u32) -> Option<Node> {
    (!batches.is_first_of_rank(g)).then(|| done(g - 1))
}

fn blocking_graph(schedule: &Schedule, links: &Links, batches: &Batches) -> EventGraph {
    let n = batches.total() as usize;
    let mut graph = Builder::with_nodes(n, 4 * n);
    let mut host = Vec::with_capacity(schedule.ranks.len());
    for (rank, list) in schedule.ranks.iter().enumerate() {
        let first = batches.first(rank);
        let commits = batches.commits(rank);
        for k in 1..commits.len() as u32 {
            graph.add_edge(done(first + k - 1), done(first + k));
        }
        for (index, instruction) in list.iter().enumerate() {
            if let Instruction::Send(m) | Instruction::Recv(m) = instruction {
                let partner = links.partner(rank, index).expect("validated link");
                let theirs = batches.of(m.peer as usize, partner);
                if let Some(before) = posted_after(batches, theirs) {
                    graph.add_edge(before, done(batches.of(rank, index)));
                }
            }
        }
        host.push(
            commits
                .iter()
                .enumerate()
                .map(|(k, &i)| (done(first + k as u32), i))
                .collect(),
        );
    }
    EventGraph {
        graph: graph.finish(),
        host,
    }
}

// Async: per batch g, node 3g = the host launches it, 3g+1 = it starts on the stream,
// 3g+2 = it completes. Reader nodes (computes waiting for received data) come after.
fn launch(g: u32) -> Node {
    3 * g
}
fn start(g: u32) -> Node {
    3 * g + 1
}
fn finish(g: u32) -> Node {
    3 * g + 2
}

fn async_graph(
    schedule: &Schedule,
    topology: &Topology,
    links: &Links,
    batches: &Batches,
) -> EventGraph {
    // The batch that receives each (kind, work): every buffer is received by one rank only.
    let slots = topology.num_stages() as usize * topology.num_microbatches() as usize;
    let mut received = vec![u32::MAX; 2 * slots];
    let key = |kind: Kind, work: Work| {
        let k = usize::from(kind == Kind::Grad);
        k * slots + topology.slot(work)
    };
    let n = 3 * batches.total() as usize;
    let mut graph = Builder::with_nodes(n, 5 * n);
    let mut host = Vec::with_capacity(schedule.ranks.len());
    for (rank, list) in schedule.ranks.iter().enumerate() {
        let first = batches.first(rank);
        for k in 0..batches.count(rank) {
            let g = first + k;
            graph.add_edge(launch(g), start(g));
            graph.add_edge(start(g), finish(g));
            if k > 0 {
                graph.add_edge(finish(g - 1), start(g));
            }
        }
        let mut chain: Vec<(Node, u32)> = Vec::new();
        let mut waited: Option<u32> = None;
        for (index, instruction) in list.iter().enumerate() {
            let needs: [Option<(Kind, Work)>; 2] = match *instruction {
                Instruction::Send(m) | Instruction::Recv(m) => {
                    let partner = links.partner(rank, index).expect("validated link");
                    let ours = batches.of(rank, index);
                    let theirs = batches.of(m.peer as usize, partner);
                    graph.add_edge(start(theirs), finish(ours));
                    if matches!(instruction, Instruction::Recv(_)) {
                        received[key(m.kind, m.work())] = ours;
                    }
                    continue;
                }
                Instruction::Commit => {
                    let g = batches.of(rank, index);
                    if let Some(&(previous, _)) = chain.last() {
                        graph.add_edge(previous, launch(g));
                    }
                    chain.push((launch(g), index as u32));
                    continue;
                }
                Instruction::Forward(w) => [Some((Kind::Act, w)), None],
                Instruction::Backward { work, .. } => [Some((Kind::Grad, work)), None],
                Instruction::ForwardBackward { f, b } => {
                    [Some((Kind::Act, f)), Some((Kind::Grad, b))]
                }
                Instruction::Weight(_) => [None, None],
            };
            // Batches on one stream complete in order: once the host has waited for batch g,
            // every earlier batch of the rank is complete too, and needs no new event.
            let mut sources = [u32::MAX; 2];
            for (slot, need) in sources.iter_mut().zip(needs) {
                if let Some((kind, work)) = need {
                    let g = received[key(kind, work)];
                    if g != u32::MAX && waited.is_none_or(|w| g > w) {
                        *slot = g;
                    }
                }
            }
            if sources == [u32::MAX; 2] {
                continue;
            }
            let reader = graph.add_node();
            for g in sources.into_iter().filter(|&g| g != u32::MAX) {
                graph.add_edge(finish(g), reader);
                waited = waited.max(Some(g));
            }
            if let Some(&(previous, _)) = chain.last() {
                graph.add_edge(previous, reader);
            }
            chain.push((reader, index as u32));
        }
        host.push(chain);
    }
    EventGraph {
        graph: graph.finish(),
        host,
    }
}

/// Runs the events that can run (Kahn's algorithm) and describes where each rank stops.
fn explain(
    schedule: &Schedule,
    links: &Links,
    batches: &Batches,
    events: &EventGraph,
    fired: &[bool],
    model: ExecutionModel,
) -> Violation {
    let posted = |g: u32| match model {
        ExecutionModel::Blocking => posted_after(batches, g).is_none_or(|e| fired[e as usize]),
        ExecutionModel::Async => fired[start(g) as usize],
    };
    let mut lines = Vec::new();
    let mut location = None;
    for (rank, chain) in events.host.iter().enumerate() {
        let Some(&(_, stuck_at)) = chain.iter().find(|(node, _)| !fired[*node as usize]) else {
            continue;
        };
        let list = &schedule.ranks[rank];
        let stuck_at = stuck_at as usize;
        location.get_or_insert(Location::Instruction {
            rank: rank as u32,
            index: stuck_at,
            instruction: list[stuck_at],
        });
        // The first batch of this rank that never completes, and an op in it whose partner
        // batch is never posted (or started).
        let first = batches.first(rank);
        let unfinished = (0..batches.count(rank)).find(|&k| {
            let g = first + k;
            match model {
                ExecutionModel::Blocking => !fired[done(g) as usize],
                ExecutionModel::Async => !fired[finish(g) as usize],
            }
        });
        let mut line = format!(
            "rank {rank} stops at instruction {stuck_at} `{}`",
            list[stuck_at]
        );
        if let Some(k) = unfinished {
            let commit = batches.commits(rank)[k as usize] as usize;
            let blocker = list.iter().enumerate().find_map(|(i, instruction)| {
                let (Instruction::Send(m) | Instruction::Recv(m)) = instruction else {
                    return None;
                };
                if batches.before(rank, i) != k {
                    return None;
                }
                let j = links.partner(rank, i)?;
                (!posted(batches.of(m.peer as usize, j))).then_some((i, m.peer as usize, j))
            });
            if model == ExecutionModel::Async && commit != stuck_at {
                let _ = write!(
                    line,
                    ": its communication stream is stuck at the batch of the commit at instruction {commit}"
                );
            }
            if let Some((i, peer, j)) = blocker {
                let verb = match model {
                    ExecutionModel::Blocking => "post",
                    ExecutionModel::Async => "start the batch with",
                };
                let _ = write!(
                    line,
                    ": `{}` needs rank {peer} to {verb} `{}` (its instruction {j})",
                    list[i], schedule.ranks[peer][j]
                );
            } else if model == ExecutionModel::Async {
                let _ = write!(line, ", behind an earlier batch that never completes");
            }
        }
        lines.push(line);
    }
    let shown = lines.len().min(8);
    let mut message = format!("stall under the {model} execution model: ");
    message.push_str(&lines[..shown].join("; "));
    if lines.len() > shown {
        let _ = write!(message, "; and {} more ranks stop", lines.len() - shown);
    }
    Violation::new(
        Rule::Progress,
        location.unwrap_or(Location::Document),
        message,
    )
}
