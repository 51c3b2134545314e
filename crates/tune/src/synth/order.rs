//! Compute orders as the search sees them: per rank, the list of computes (F, B, deferred B, W,
//! FB) of a fixed placement; their fast timing (the as-soon-as-possible run of the compute
//! graph with message latencies, the limit the lowering pass and the async model aim at), their
//! activation peak, and the local moves of the search.

use dualpipe_schedule::{ComputeCosts, Costs, Instruction, Topology, Work};

/// Per-stage figures the fast evaluator needs, resolved once.
#[derive(Clone, Debug)]
pub(crate) struct Figures {
    pub stages: u32,
    pub microbatches: u32,
    /// Rank of each slot (stage-major: `stage * C + mb`).
    pub rank_of: Vec<u32>,
    compute: ComputeCosts,
    /// Message time across the boundary after each stage.
    comm: Vec<f64>,
    /// Activation of one micro-batch on each stage, in N-ths of the model's activations.
    pub activation: Vec<f64>,
}

impl Figures {
    /// Figures of `topology` under per-stage `costs`; activations weighted by the stages'
    /// `activation_bytes` when they say any, else equal, scaled so that the whole model's
    /// activations of one micro-batch are `ranks` (memory in N-ths of them).
    pub fn new(topology: &Topology, costs: &Costs) -> Figures {
        let stages = topology.num_stages();
        let c = topology.num_microbatches();
        let all: Vec<_> = (0..stages).map(|s| costs.stage(s)).collect();
        let total: f64 = all.iter().map(|s| s.activation_bytes).sum();
        let n = f64::from(topology.num_ranks());
        let activation = all
            .iter()
            .map(|s| {
                if total > 0.0 {
                    n * s.activation_bytes / total
                } else {
                    n / f64::from(stages.max(1))
                }
            })
            .collect();
        let mut rank_of = Vec::with_capacity((stages * c) as usize);
        for s in 0..stages {
            for m in 0..c {
                rank_of.push(topology.rank_of(Work::new(s, m)));
            }
        }
        Figures {
            stages,
            microbatches: c,
            rank_of,
            compute: ComputeCosts::new(costs, stages),
            comm: (0..stages).map(|s| costs.message_time(s)).collect(),
            activation,
        }
    }

    /// Message time across the boundary after `stage`.
    pub fn comm(&self, stage: u32) -> f64 {
        self.comm[stage as usize]
    }

    /// The longest message time of what compute `i` on rank `r` sends to other ranks; 0 when
    /// it sends nothing across ranks.
    fn sends(&self, i: Instruction, r: u32) -> f64 {
        let act = |w: Work| {
            if w.stage + 1 < self.stages
                && self.rank_of[self.slot(Work::new(w.stage + 1, w.mb))] != r
            {
                self.comm[w.stage as usize]
            } else {
                0.0
            }
        };
        let grad = |w: Work| {
            if w.stage > 0 && self.rank_of[self.slot(Work::new(w.stage - 1, w.mb))] != r {
                self.comm[w.stage as usize - 1]
            } else {
                0.0
            }
        };
        match i {
            Instruction::Forward(w) => act(w),
            Instruction::Backward { work, .. } => grad(work),
            Instruction::ForwardBackward { f, b } => act(f).max(grad(b)),
            _ => 0.0,
        }
    }

    fn slot(&self, w: Work) -> usize {
        (w.stage * self.microbatches + w.mb) as usize
    }

    /// Duration of one compute, as the simulator counts it.
    pub fn duration(&self, i: Instruction) -> f64 {
        self.compute.duration(i)
    }

    /// The most activation memory one rank holds, in N-ths of the model's activations per
    /// micro-batch, counted as the simulator counts live activations (from a forward to the
    /// backward that frees it, or to its W when the backward defers it).
    pub fn peak_memory(&self, order: &[Vec<Instruction>]) -> f64 {
        let mut peak = 0.0f64;
        for list in order {
            let mut live = 0.0f64;
            for &i in list {
                let a = |w: Work| self.activation[w.stage as usize];
                match i {
                    Instruction::Forward(w) => {
                        live += a(w);
                        peak = peak.max(live);
                    }
                    Instruction::Backward {
                        work,
                        defer_w: false,
                    } => live -= a(work),
                    Instruction::Weight(w) => live -= a(w),
                    Instruction::ForwardBackward { f, b } => {
                        live += a(f);
                        peak = peak.max(live);
                        live -= a(b);
                    }
                    _ => {}
                }
            }
        }
        peak
    }

    /// The step of the as-soon-as-possible run of the compute order: every compute starts when
    /// its rank's previous compute has ended and its inputs have arrived (a message across
    /// ranks takes its time). `None` when the orders wait on each other in a cycle.
    pub fn makespan(&self, order: &[Vec<Instruction>], scratch: &mut Scratch) -> Option<f64> {
        let slots = (self.stages * self.microbatches) as usize;
        scratch.f_end.clear();
        scratch.f_end.resize(slots, f64::NAN);
        scratch.b_end.clear();
        scratch.b_end.resize(slots, f64::NAN);
        scratch.cursor.clear();
        scratch.cursor.resize(order.len(), 0);
        scratch.clock.clear();
        scratch.clock.resize(order.len(), 0.0);
        scratch.sent.clear();
        scratch.sent.resize(order.len(), 0.0);
        let last = self.stages - 1;
        let mut remaining: usize = order.iter().map(Vec::len).sum();
        let mut end = 0.0f64;
        while remaining > 0 {
            let mut progress = false;
            for (r, list) in order.iter().enumerate() {
                while let Some(&i) = list.get(scratch.cursor[r]) {
                    // When the inputs of this compute are ready on rank r, if known.
                    let f_ready = |w: Work, s: &Scratch| -> Option<f64> {
                        if w.stage == 0 {
                            return Some(0.0);
                        }
                        let prev = Work::new(w.stage - 1, w.mb);
                        let t = s.f_end[self.slot(prev)];
                        if t.is_nan() {
                            return None;
                        }
                        let cross = self.rank_of[self.slot(prev)] != r as u32;
                        Some(if cross {
                            t + self.comm[prev.stage as usize]
                        } else {
                            t
                        })
                    };
                    let b_ready = |w: Work, s: &Scratch| -> Option<f64> {
                        let own = s.f_end[self.slot(w)];
                        if own.is_nan() {
                            return None;
                        }
                        if w.stage == last {
                            return Some(own);
                        }
                        let next = Work::new(w.stage + 1, w.mb);
                        let t = s.b_end[self.slot(next)];
                        if t.is_nan() {
                            return None;
                        }
                        let cross = self.rank_of[self.slot(next)] != r as u32;
                        Some(own.max(if cross {
                            t + self.comm[w.stage as usize]
                        } else {
                            t
                        }))
                    };
                    let ready = match i {
                        Instruction::Forward(w) => f_ready(w, scratch),
                        Instruction::Backward { work, .. } => b_ready(work, scratch),
                        Instruction::Weight(w) => {
                            let t = scratch.b_end[self.slot(w)];
                            (!t.is_nan()).then_some(t)
                        }
                        Instruction::ForwardBackward { f, b } => {
                            match (f_ready(f, scratch), {
                                // The forward half is the same compute: its end is not needed.
                                b_ready(b, scratch)
                            }) {
                                (Some(x), Some(y)) => Some(x.max(y)),
                                _ => None,
                            }
                        }
                        _ => Some(0.0),
                    };
                    let Some(ready) = ready else { break };
                    // The rank's previous compute sent across ranks: its batch holds the rank
                    // for the message time (the blocking model's commit).
                    let start = (scratch.clock[r] + scratch.sent[r]).max(ready);
                    let finish = start + self.duration(i);
                    scratch.clock[r] = finish;
                    scratch.sent[r] = self.sends(i, r as u32);
                    end = end.max(finish + scratch.sent[r]);
                    match i {
                        Instruction::Forward(w) => scratch.f_end[self.slot(w)] = finish,
                        Instruction::Backward { work, .. } => {
                            scratch.b_end[self.slot(work)] = finish
                        }
                        Instruction::ForwardBackward { f, b } => {
                            scratch.f_end[self.slot(f)] = finish;
                            scratch.b_end[self.slot(b)] = finish;
                        }
                        _ => {}
                    }
                    scratch.cursor[r] += 1;
                    remaining -= 1;
                    progress = true;
                }
            }
            if !progress {
                return None;
            }
        }
        Some(end)
    }
}

/// Reused buffers of [`Figures::makespan`].
#[derive(Default)]
pub(crate) struct Scratch {
    f_end: Vec<f64>,
    b_end: Vec<f64>,
    cursor: Vec<usize>,
    clock: Vec<f64>,
    sent: Vec<f64>,
}

/// A small deterministic generator (xorshift64*), so a seed gives the same search everywhere.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // SplitMix64 of the seed, never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn same_mb(a: Instruction, b: Instruction) -> bool {
    let works = |i: Instruction| -> [Option<Work>; 2] {
        match i {
            Instruction::Forward(w) | Instruction::Weight(w) => [Some(w), None],
            Instruction::Backward { work, .. } => [Some(work), None],
            Instruction::ForwardBackward { f, b } => [Some(f), Some(b)],
            _ => [None, None],
        }
    };
    let (x, y) = (works(a), works(b));
    x.iter()
        .flatten()
        .any(|u| y.iter().flatten().any(|v| u.mb == v.mb))
}

/// Applies one random local move to `order` in place; `false` when the move drawn does not
/// apply (the order is then unchanged). Moves keep every rank's own dependencies (a forward
/// before its backward, a backward before its W); waits across ranks are checked by the
/// evaluator.
pub(crate) fn random_move(order: &mut [Vec<Instruction>], rng: &mut Rng, allow_fb: bool) -> bool {
    if allow_fb && order.len() > 1 && rng.below(8) == 0 {
        return shift_ranks(order, rng);
    }
    let r = rng.below(order.len());
    let list = &mut order[r];
    if list.len() < 2 {
        return false;
    }
    let kind = rng.below(if allow_fb { 10 } else { 5 });
    match kind {
        7..=9 => shift_pairing(list, rng),
        // Swap two neighbours.
        0 | 1 => {
            let i = rng.below(list.len() - 1);
            let (a, b) = (list[i], list[i + 1]);
            if same_mb(a, b) {
                return false;
            }
            list.swap(i, i + 1);
            true
        }
        // Move one compute a few places.
        2 => {
            let i = rng.below(list.len());
            let d = 1 + rng.below(6);
            let j = if rng.below(2) == 0 {
                i.saturating_sub(d)
            } else {
                (i + d).min(list.len() - 1)
            };
            if i == j {
                return false;
            }
            let x = list[i];
            let (lo, hi) = (i.min(j), i.max(j));
            let between = if j < i { lo..i } else { i + 1..hi + 1 };
            if list[between].iter().any(|&y| same_mb(x, y)) {
                return false;
            }
            let x = list.remove(i);
            list.insert(j, x);
            true
        }
        // Defer a full backward's weight gradient (W right after it), or undo a deferral.
        3 => {
            let i = rng.below(list.len());
            match list[i] {
                Instruction::Backward {
                    work,
                    defer_w: false,
                } => {
                    list[i] = Instruction::b_defer(work.stage, work.mb);
                    list.insert(i + 1, Instruction::w(work.stage, work.mb));
                    true
                }
                Instruction::Backward {
                    work,
                    defer_w: true,
                } => {
                    let Some(j) = list.iter().position(|&x| x == Instruction::Weight(work)) else {
                        return false;
                    };
                    list.remove(j);
                    list[i] = Instruction::b(work.stage, work.mb);
                    true
                }
                _ => false,
            }
        }
        // Move a W anywhere after its backward.
        4 => {
            let ws: Vec<usize> = (0..list.len())
                .filter(|&i| matches!(list[i], Instruction::Weight(_)))
                .collect();
            if ws.is_empty() {
                return false;
            }
            let i = ws[rng.below(ws.len())];
            let Instruction::Weight(work) = list[i] else {
                return false;
            };
            let x = list.remove(i);
            let b = list
                .iter()
                .position(|&y| matches!(y, Instruction::Backward { work: v, .. } if v == work))
                .unwrap_or(0);
            let span = list.len() - b;
            let j = b + 1 + rng.below(span.max(1)).min(span);
            list.insert(j.min(list.len()), x);
            true
        }
        // Split an FB into its forward and its backward (in either order).
        5 => {
            let fbs: Vec<usize> = (0..list.len())
                .filter(|&i| matches!(list[i], Instruction::ForwardBackward { .. }))
                .collect();
            if fbs.is_empty() {
                return false;
            }
            let i = fbs[rng.below(fbs.len())];
            let Instruction::ForwardBackward { f, b } = list[i] else {
                return false;
            };
            let (x, y) = (Instruction::Forward(f), Instruction::b(b.stage, b.mb));
            if rng.below(2) == 0 {
                list.splice(i..=i, [x, y]);
            } else {
                list.splice(i..=i, [y, x]);
            }
            true
        }
        // Pair a forward with a neighbouring backward into an FB (a deferred backward takes
        // its W back into the pair).
        _ => {
            let i = rng.below(list.len() - 1);
            let (a, b) = (list[i], list[i + 1]);
            let (f, bw) = match (a, b) {
                (Instruction::Forward(f), Instruction::Backward { work, .. })
                | (Instruction::Backward { work, .. }, Instruction::Forward(f)) => (f, work),
                _ => return false,
            };
            if f.mb == bw.mb {
                return false;
            }
            let deferred = matches!(a, Instruction::Backward { defer_w: true, .. })
                || matches!(b, Instruction::Backward { defer_w: true, .. });
            list.splice(i..=i + 1, [Instruction::ForwardBackward { f, b: bw }]);
            if deferred {
                if let Some(j) = list.iter().position(|&x| x == Instruction::Weight(bw)) {
                    list.remove(j);
                }
            }
            true
        }
    }
}

/// Shifts the pairing of a run of `FB`s by one: along the FBs of rank whose forward (or
/// backward) halves run one stage, every half moves to the neighbouring FB, one half is left
/// alone at one end of the run and the half of the other kind at the other end runs alone.
/// This moves a whole steady phase one step earlier or later against the other stream.
fn shift_pairing(list: &mut Vec<Instruction>, rng: &mut Rng) -> bool {
    let fbs: Vec<usize> = (0..list.len())
        .filter(|&i| matches!(list[i], Instruction::ForwardBackward { .. }))
        .collect();
    if fbs.is_empty() {
        return false;
    }
    let i0 = fbs[rng.below(fbs.len())];
    let Instruction::ForwardBackward { f: f0, b: b0 } = list[i0] else {
        return false;
    };
    let forward_half = rng.below(2) == 0;
    let key = |i: Instruction| match i {
        Instruction::ForwardBackward { f, b } => Some(if forward_half { f.stage } else { b.stage }),
        _ => None,
    };
    let stage = if forward_half { f0.stage } else { b0.stage };
    let run: Vec<usize> = fbs
        .iter()
        .copied()
        .filter(|&i| i >= i0 && key(list[i]) == Some(stage))
        .collect();
    let k = if rng.below(2) == 0 {
        run.len()
    } else {
        1 + rng.below(run.len())
    };
    let earlier = rng.below(2) == 0;
    shift(list, &run[..k], forward_half, earlier)
}

/// Shifts the pairing of the FBs at `run` (ascending indices of FBs whose `forward_half` halves
/// are one stage's, in order) by one; see [`shift_pairing`].
fn shift(list: &mut Vec<Instruction>, run: &[usize], forward_half: bool, earlier: bool) -> bool {
    let k = run.len();
    if k == 0 {
        return false;
    }
    let halves: Vec<(Work, Work)> = run
        .iter()
        .map(|&i| match list[i] {
            Instruction::ForwardBackward { f, b } => (f, b),
            _ => unreachable!("filtered to FBs"),
        })
        .collect();
    // The moving halves (of the kind chosen) and the fixed ones.
    let moving: Vec<Work> = halves
        .iter()
        .map(|&(f, b)| if forward_half { f } else { b })
        .collect();
    let fixed: Vec<Work> = halves
        .iter()
        .map(|&(f, b)| if forward_half { b } else { f })
        .collect();
    let make = |m: Work, x: Work| -> Option<Instruction> {
        let (f, b) = if forward_half { (m, x) } else { (x, m) };
        (f.mb != b.mb).then_some(Instruction::ForwardBackward { f, b })
    };
    let alone = |w: Work, is_forward: bool| {
        if is_forward {
            Instruction::Forward(w)
        } else {
            Instruction::b(w.stage, w.mb)
        }
    };
    let mut replaced = Vec::with_capacity(k);
    if earlier {
        // moving[0] runs alone before the run; FB j pairs fixed[j] with moving[j + 1]; the
        // last fixed half runs alone.
        for j in 0..k {
            if j + 1 < k {
                let Some(x) = make(moving[j + 1], fixed[j]) else {
                    return false;
                };
                replaced.push(x);
            } else {
                replaced.push(alone(fixed[j], !forward_half));
            }
        }
    } else {
        // fixed[0] runs alone; FB j pairs fixed[j] with moving[j - 1]; the last moving half
        // runs alone after the run.
        for j in 0..k {
            if j == 0 {
                replaced.push(alone(fixed[0], !forward_half));
            } else {
                let Some(x) = make(moving[j - 1], fixed[j]) else {
                    return false;
                };
                replaced.push(x);
            }
        }
    }
    for (j, &i) in run.iter().enumerate() {
        list[i] = replaced[j];
    }
    if earlier {
        list.insert(run[0], alone(moving[0], forward_half));
    } else {
        list.insert(run[k - 1] + 1, alone(moving[k - 1], forward_half));
    }
    true
}

/// [`shift_pairing`] on a range of ranks at once, each on the whole run of FBs whose chosen
/// halves belong to its lower (or higher) stage: a whole steady phase moves one step against the
/// other stream on those ranks together, which one rank alone could not do without waiting.
fn shift_ranks(order: &mut [Vec<Instruction>], rng: &mut Rng) -> bool {
    let n = order.len();
    let (a, b) = (rng.below(n), rng.below(n));
    let (lo, hi) = (a.min(b), a.max(b));
    let forward_half = rng.below(2) == 0;
    let higher = rng.below(2) == 0;
    let earlier = rng.below(2) == 0;
    let mut changed = false;
    for list in &mut order[lo..=hi] {
        let key = |i: &Instruction| match *i {
            Instruction::ForwardBackward { f, b } => {
                Some(if forward_half { f.stage } else { b.stage })
            }
            _ => None,
        };
        let stages: Vec<u32> = list.iter().filter_map(key).collect();
        let Some(stage) = (if higher {
            stages.iter().max()
        } else {
            stages.iter().min()
        })
        .copied() else {
            continue;
        };
        let run: Vec<usize> = (0..list.len())
            .filter(|&i| key(&list[i]) == Some(stage))
            .collect();
        let mut copy = list.clone();
        if shift(&mut copy, &run, forward_half, earlier) {
            *list = copy;
            changed = true;
        }
    }
    changed
}
