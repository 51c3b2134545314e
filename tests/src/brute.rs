//! An independent, brute-force interpreter of schedules, used to prove that what the validator
//! accepts really runs. It shares no code with the validator: it executes the instruction lists
//! step by step with explicit message queues, carries labelled data through the channels, and
//! checks at the end that every piece of work ran exactly once on the right data.

use std::collections::{HashMap, HashSet, VecDeque};

use dualpipe_schedule::{Instruction, Kind, Schedule, Work};

/// How commits behave while running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// A commit waits until every op of its batch is matched.
    Blocking,
    /// A commit hands its batch to the rank's communication stream and returns; batches on a
    /// stream run one after another.
    Async,
}

/// What a buffer holds: a forward input or an output gradient of a stage for a micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Data {
    /// The input activation of `(stage, mb)`.
    Input(u32, u32),
    /// The gradient with respect to the output of `(stage, mb)`.
    OutputGrad(u32, u32),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Carries `Data` to the peer.
    Send { to: usize, payload: Data },
    /// Expects `Data` from the peer.
    Recv { from: usize, expect: Data },
}

#[derive(Default)]
struct Rank {
    pc: usize,
    queued: Vec<Op>,
    /// Batches committed but not started on the stream (async) or not yet posted.
    stream: VecDeque<Vec<Op>>,
    /// Ops of the started batch that are not yet matched.
    in_flight: usize,
    /// The rank waits for its last commit (blocking model).
    blocked: bool,
    have: HashSet<Data>,
    outputs: HashSet<(Kind, u32, u32)>,
}

/// Runs `schedule` under `model`. `Ok` means every rank reached its end, every message
/// carried what its receiver expected, and every forward, backward and weight gradient ran
/// exactly once on the rank its route names, after its inputs arrived. `Err` says what went
/// wrong first.
pub fn run(schedule: &Schedule, model: Model) -> Result<(), String> {
    let n = schedule.ranks.len();
    if n != schedule.num_ranks as usize || n == 0 {
        return Err("rank count mismatch".into());
    }
    let owner = owners(schedule)?;
    let stages = schedule.num_stages;
    let mut ranks: Vec<Rank> = (0..n).map(|_| Rank::default()).collect();
    for (&(stage, mb), &rank) in &owner {
        if stage == 0 {
            ranks[rank].have.insert(Data::Input(0, mb));
        }
    }
    // Per ordered pair: posted sends (payloads) and posted receives (expected data, receiver).
    let mut sends: HashMap<(usize, usize), VecDeque<Data>> = HashMap::new();
    let mut recvs: HashMap<(usize, usize), VecDeque<Data>> = HashMap::new();
    let mut forward_done: HashSet<(u32, u32)> = HashSet::new();
    let mut backward_done: HashMap<(u32, u32), bool> = HashMap::new();
    let mut weight_done: HashSet<(u32, u32)> = HashSet::new();
    let mut delivered: HashSet<(usize, Data)> = HashSet::new();

    loop {
        let mut progressed = false;
        #[allow(clippy::needless_range_loop)] // ranks[r] is re-borrowed inside
        for r in 0..n {
            // Start batches on the stream when nothing is in flight.
            while ranks[r].in_flight == 0 {
                let Some(batch) = ranks[r].stream.pop_front() else {
                    break;
                };
                ranks[r].in_flight = batch.len();
                for op in batch {
                    match op {
                        Op::Send { to, payload } => {
                            sends.entry((r, to)).or_default().push_back(payload)
                        }
                        Op::Recv { from, expect } => {
                            recvs.entry((from, r)).or_default().push_back(expect)
                        }
                    }
                }
                progressed = true;
            }
            if ranks[r].blocked {
                if ranks[r].in_flight == 0 && ranks[r].stream.is_empty() {
                    ranks[r].blocked = false;
                    progressed = true;
                } else {
                    continue;
                }
            }
            let list = &schedule.ranks[r];
            while let Some(&instruction) = list.get(ranks[r].pc) {
                let rank = &mut ranks[r];
                let here = |w: Work| owner.get(&(w.stage, w.mb)).copied();
                match instruction {
                    Instruction::Send(m) | Instruction::Recv(m) => {
                        let is_send = matches!(instruction, Instruction::Send(_));
                        let peer = m.peer as usize;
                        if peer >= n || peer == r {
                            return Err(format!("rank {r}: bad peer in `{instruction}`"));
                        }
                        if here(m.work()) != Some(r) {
                            return Err(format!(
                                "rank {r}: `{instruction}` is not this rank's work"
                            ));
                        }
                        let op = match (is_send, m.kind) {
                            (true, Kind::Act) => {
                                if !rank.outputs.contains(&(Kind::Act, m.stage, m.mb)) {
                                    return Err(format!(
                                        "rank {r}: `{instruction}` sends data not yet computed"
                                    ));
                                }
                                Op::Send {
                                    to: peer,
                                    payload: Data::Input(m.stage + 1, m.mb),
                                }
                            }
                            (true, Kind::Grad) => {
                                if !rank.outputs.contains(&(Kind::Grad, m.stage, m.mb))
                                    || m.stage == 0
                                {
                                    return Err(format!(
                                        "rank {r}: `{instruction}` sends data not yet computed"
                                    ));
                                }
                                Op::Send {
                                    to: peer,
                                    payload: Data::OutputGrad(m.stage - 1, m.mb),
                                }
                            }
                            (false, Kind::Act) => Op::Recv {
                                from: peer,
                                expect: Data::Input(m.stage, m.mb),
                            },
                            (false, Kind::Grad) => Op::Recv {
                                from: peer,
                                expect: Data::OutputGrad(m.stage, m.mb),
                            },
                        };
                        rank.queued.push(op);
                    }
                    Instruction::Commit => {
                        let batch = std::mem::take(&mut rank.queued);
                        rank.stream.push_back(batch);
                        rank.pc += 1;
                        progressed = true;
                        if model == Model::Blocking {
                            rank.blocked = true;
                            break;
                        }
                        continue;
                    }
                    compute => {
                        let (forwards, backwards, weight) = split(compute);
                        if let [(f, _)] = forwards.as_slice()
                            && let [(b, _)] = backwards.as_slice()
                            && f.mb == b.mb
                        {
                            return Err(format!(
                                "rank {r}: `{compute}` overlaps one micro-batch with itself"
                            ));
                        }
                        let all = forwards
                            .iter()
                            .chain(&backwards)
                            .map(|(w, _)| *w)
                            .chain(weight);
                        for w in all {
                            if here(w) != Some(r) {
                                return Err(format!(
                                    "rank {r}: `{compute}` is not this rank's work"
                                ));
                            }
                        }
                        if schedule.forward_only && (!backwards.is_empty() || weight.is_some()) {
                            return Err(format!(
                                "rank {r}: `{compute}` in a forward-only schedule"
                            ));
                        }
                        // Wait (possibly forever) until every input is here.
                        let ready = forwards
                            .iter()
                            .all(|(w, _)| rank.have.contains(&Data::Input(w.stage, w.mb)))
                            && backwards.iter().all(|(w, _)| {
                                rank.outputs.contains(&(Kind::Act, w.stage, w.mb))
                                    && (w.stage + 1 == stages
                                        || rank.have.contains(&Data::OutputGrad(w.stage, w.mb)))
                            })
                            && weight.is_none_or(|w| {
                                backward_done.get(&(w.stage, w.mb)) == Some(&true)
                                    && rank.outputs.contains(&(Kind::Grad, w.stage, w.mb))
                            });
                        if !ready {
                            break;
                        }
                        if let Some(w) = weight
                            && !weight_done.insert((w.stage, w.mb))
                        {
                            return Err(format!("rank {r}: second `{compute}`"));
                        }
                        for (w, _) in forwards {
                            rank.have.remove(&Data::Input(w.stage, w.mb));
                            if !forward_done.insert((w.stage, w.mb)) {
                                return Err(format!("rank {r}: second forward of {w}"));
                            }
                            rank.outputs.insert((Kind::Act, w.stage, w.mb));
                            if w.stage + 1 < stages && here(Work::new(w.stage + 1, w.mb)) == Some(r)
                            {
                                rank.have.insert(Data::Input(w.stage + 1, w.mb));
                            }
                        }
                        for (w, defer) in backwards {
                            rank.have.remove(&Data::OutputGrad(w.stage, w.mb));
                            if backward_done.insert((w.stage, w.mb), defer).is_some() {
                                return Err(format!("rank {r}: second backward of {w}"));
                            }
                            rank.outputs.insert((Kind::Grad, w.stage, w.mb));
                            if w.stage > 0 && here(Work::new(w.stage - 1, w.mb)) == Some(r) {
                                rank.have.insert(Data::OutputGrad(w.stage - 1, w.mb));
                            }
                        }
                    }
                }
                ranks[r].pc += 1;
                progressed = true;
            }
        }
        // Match heads of every channel.
        for (&(from, to), queue) in sends.iter_mut() {
            let Some(pending) = recvs.get_mut(&(from, to)) else {
                continue;
            };
            while let (Some(&payload), Some(&expect)) = (queue.front(), pending.front()) {
                if payload != expect {
                    return Err(format!(
                        "channel r{from} -> r{to}: a receive expecting {expect:?} got {payload:?}"
                    ));
                }
                queue.pop_front();
                pending.pop_front();
                ranks[from].in_flight -= 1;
                ranks[to].in_flight -= 1;
                // Each buffer crosses the network once (format rule 3), even if the first copy
                // was already consumed.
                if !delivered.insert((to, expect)) || !ranks[to].have.insert(expect) {
                    return Err(format!("rank {to}: {expect:?} received twice"));
                }
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }

    for (r, rank) in ranks.iter().enumerate() {
        if rank.pc < schedule.ranks[r].len()
            || rank.blocked
            || rank.in_flight > 0
            || !rank.stream.is_empty()
        {
            let at = schedule.ranks[r]
                .get(rank.pc)
                .map(ToString::to_string)
                .unwrap_or_else(|| "end".into());
            return Err(format!(
                "stall: rank {r} stops at instruction {} `{at}`",
                rank.pc
            ));
        }
        if !rank.queued.is_empty() {
            return Err(format!("rank {r}: ops queued but never committed"));
        }
    }
    for &(stage, mb) in owner.keys() {
        if !forward_done.contains(&(stage, mb)) {
            return Err(format!("F s{stage} m{mb} never ran"));
        }
        if !schedule.forward_only {
            match backward_done.get(&(stage, mb)) {
                None => return Err(format!("B s{stage} m{mb} never ran")),
                Some(true) if !weight_done.contains(&(stage, mb)) => {
                    return Err(format!("W s{stage} m{mb} never ran"));
                }
                _ => {}
            }
        }
    }
    if weight_done
        .iter()
        .any(|k| backward_done.get(k) != Some(&true))
    {
        return Err("a W without a deferred backward".into());
    }
    Ok(())
}

/// The forwards, backwards (with `defer_w`) and weight gradient of a compute instruction.
#[allow(clippy::type_complexity)]
fn split(instruction: Instruction) -> (Vec<(Work, bool)>, Vec<(Work, bool)>, Option<Work>) {
    match instruction {
        Instruction::Forward(w) => (vec![(w, false)], vec![], None),
        Instruction::Backward { work, defer_w } => (vec![], vec![(work, defer_w)], None),
        Instruction::ForwardBackward { f, b } => (vec![(f, false)], vec![(b, false)], None),
        Instruction::Weight(w) => (vec![], vec![], Some(w)),
        _ => (vec![], vec![], None),
    }
}

/// The rank of every (stage, mb), from the routes.
fn owners(schedule: &Schedule) -> Result<HashMap<(u32, u32), usize>, String> {
    let mut owner = HashMap::new();
    for pipeline in &schedule.pipelines {
        if pipeline.route.len() != schedule.num_stages as usize {
            return Err("route length".into());
        }
        for &mb in &pipeline.microbatches {
            if mb >= schedule.num_microbatches {
                return Err("micro-batch out of range".into());
            }
            for (stage, &rank) in pipeline.route.iter().enumerate() {
                if rank >= schedule.num_ranks {
                    return Err("route rank out of range".into());
                }
                if owner.insert((stage as u32, mb), rank as usize).is_some() {
                    return Err("micro-batch in two pipelines".into());
                }
            }
        }
    }
    if owner.len() != (schedule.num_stages * schedule.num_microbatches) as usize {
        return Err("micro-batches without a pipeline".into());
    }
    Ok(owner)
}
