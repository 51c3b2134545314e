//! DualPipeV-like compute orders with a chosen warm-up depth: how many micro-batches each
//! stage of the V lets in flight (from its forward to the backward that frees it) before the
//! overlapped phase.
//!
//! DualPipeV's overlapped phase holds up to `2N - r` micro-batches of rank r's near stage
//! (stage r, down the V) and `r + 1` of its far stage (stage `2N - 1 - r`, back up): one step
//! of lag per rank boundary for the `FB`s going down the V and none for those coming back, so
//! a round trip across a boundary (an `FB` each way) must fit in one step, and with message
//! latency the step is `2 (fb + comm)` instead of `2 fb`. A [`Depth`] adds steps of lag on
//! chosen boundaries; the order is DualPipeV's eight steps with the counts changed to match
//! (deterministic, no search), lowered for the costs, validated and simulated.

use std::collections::VecDeque;

use dualpipe_planner::lower::Header;
use dualpipe_planner::{Family, PlanRequest};
use dualpipe_schedule::{Instruction, ValidSchedule, Work};

use super::order::{Figures, Scratch};
use super::{Judge, Key, LABEL, SynthCosts, SynthError, key, plan_family};

/// Extra steps of lag per rank boundary over DualPipeV's (boundary j lies between ranks j and
/// j + 1; `N - 1` of them). DualPipeV has one step of lag on each boundary for its `FB`s down
/// the V (forward of the near stage with backward of the far one) and none back up, so a
/// round trip across a boundary fits in one step. One more step on boundary j (its forwards
/// down the V and the backwards that follow them reach rank j + 1 one step later) lets that
/// round trip span two. It costs every rank two micro-batches in flight, one N-th of the
/// model's activations: one more forward of its near stage before the overlapped phase on
/// every rank, one more again on ranks 0..=j, one more of the far stage on ranks j+1...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Depth {
    /// Extra steps of lag on each boundary.
    pub lag: Vec<u32>,
}

impl Depth {
    /// DualPipeV's own depth on `n` ranks.
    pub fn none(n: u32) -> Depth {
        Depth {
            lag: vec![0; n.saturating_sub(1) as usize],
        }
    }

    /// One more step of lag on the boundaries `long`.
    pub fn boundaries(n: u32, long: &[u32]) -> Depth {
        let mut depth = Depth::none(n);
        for &j in long {
            if let Some(x) = depth.lag.get_mut(j as usize) {
                *x += 1;
            }
        }
        depth
    }

    /// `k` long boundaries (of the `n - 1`) spread evenly along the V; `k >= n - 1`: all.
    pub fn spread(n: u32, k: u32) -> Depth {
        let gaps = n.saturating_sub(1);
        let k = k.min(gaps);
        let long: Vec<u32> = (0..gaps)
            .filter(|&j| (j + 1) * k / gaps > j * k / gaps)
            .collect();
        Depth::boundaries(n, &long)
    }

    /// Extra steps of lag in all.
    pub fn total(&self) -> u32 {
        self.lag.iter().sum()
    }

    /// Extra steps of lag on the boundaries from rank `r` down the V.
    fn below(&self, r: u32) -> u32 {
        self.lag.iter().skip(r as usize).sum()
    }

    /// The micro-batches `C` the order of this depth needs on `n` ranks: DualPipeV's 2N plus
    /// two per extra step of lag (rank 0 holds them all before its overlapped phase).
    pub fn min_microbatches(&self, n: u32) -> u32 {
        2 * n + 2 * self.total()
    }
}

/// Emits one rank's computes, numbering the micro-batches of its two stages in order.
struct Emit {
    /// Near stage (down the V) and far stage (back up).
    stage: [u32; 2],
    forwards: [u32; 2],
    backwards: [u32; 2],
    pending: VecDeque<Work>,
    out: Vec<Instruction>,
}

impl Emit {
    fn work(&mut self, side: usize, backward: bool) -> Work {
        let count = if backward {
            &mut self.backwards[side]
        } else {
            &mut self.forwards[side]
        };
        let w = Work::new(self.stage[side], *count);
        *count += 1;
        w
    }

    fn f(&mut self, side: usize) {
        let w = self.work(side, false);
        self.out.push(Instruction::Forward(w));
    }

    fn b(&mut self, side: usize, defer_w: bool) {
        let work = self.work(side, true);
        self.out.push(Instruction::Backward { work, defer_w });
        if defer_w {
            self.pending.push_back(work);
        }
    }

    fn fb(&mut self, f_side: usize, b_side: usize) {
        let f = self.work(f_side, false);
        let b = self.work(b_side, true);
        self.out.push(Instruction::ForwardBackward { f, b });
    }

    fn w(&mut self) {
        if let Some(w) = self.pending.pop_front() {
            self.out.push(Instruction::Weight(w));
        }
    }
}

/// Rank `r`'s compute order of the DualPipeV-like schedule with `depth` on `n` ranks, `c`
/// micro-batches (`c >= depth.min_microbatches(n)`): DualPipeV's eight steps as the planner
/// builds them, with the counts of the warm-up, the overlapped phase and the drain made for
/// the lag. With no extra lag it is DualPipeV's own order.
fn rank_order(n: u32, c: u32, r: u32, depth: &Depth) -> Vec<Instruction> {
    let rest = n - 1 - r;
    let (e, s) = (depth.total(), depth.below(r));
    // In flight when the overlapped phase begins: near forwards (no near backward yet), far
    // forwards and far backwards.
    let near_forwards = 2 * n - 1 - r + e + s;
    let pairs = r + 1;
    let triples = rest + s;
    let steady = c - near_forwards;
    let drain = r + 1 + e - s;
    let turn = r == n - 1;
    let mut p = Emit {
        stage: [r, 2 * n - 1 - r],
        forwards: [0; 2],
        backwards: [0; 2],
        pending: VecDeque::new(),
        out: Vec::new(),
    };
    // 1: near forwards.
    for _ in 0..near_forwards - pairs {
        p.f(0);
    }
    // 2: near and far forwards in turn, then the far forwards the lag adds.
    for _ in 0..pairs {
        p.f(0);
        p.f(1);
    }
    for _ in 0..e - s {
        p.f(1);
    }
    // 3: far backward (weights deferred), its weight gradient, far forward.
    for _ in 0..triples {
        p.b(1, true);
        p.w();
        p.f(1);
    }
    // 4: the overlapped phase; at the turn of the V the first pair runs apart.
    for i in 0..steady {
        if i == 0 && turn {
            p.f(0);
            p.b(1, false);
        } else {
            p.fb(0, 1);
        }
        p.fb(1, 0);
    }
    // 5: far backward, then far forward overlapped with near backward.
    for _ in 0..triples {
        p.b(1, false);
        p.fb(1, 0);
    }
    // 6: backwards of both stages; the second half defer their weights, starting with the far
    // or the near one by the parity of the rank.
    let mut defer = false;
    for i in 0..drain {
        if i == drain / 2 && r % 2 == 1 {
            defer = true;
        }
        p.b(1, defer);
        if i == drain / 2 && r % 2 == 0 {
            defer = true;
        }
        p.b(0, defer);
    }
    // 7: a weight gradient, then a near backward with deferred weights.
    for _ in 0..triples {
        p.w();
        p.b(0, true);
    }
    // 8: the remaining weight gradients.
    while !p.pending.is_empty() {
        p.w();
    }
    p.out
}

/// The compute order of the DualPipeV-like schedule with `depth` on `n` ranks and `c`
/// micro-batches; `None` when `c` is too few for the depth or `depth` has the wrong length.
pub(super) fn v_order(n: u32, c: u32, depth: &Depth) -> Option<Vec<Vec<Instruction>>> {
    if n == 0 || depth.lag.len() != (n - 1) as usize || c < depth.min_microbatches(n) {
        return None;
    }
    Some((0..n).map(|r| rank_order(n, c, r, depth)).collect())
}

/// One depth, lowered and simulated.
#[derive(Clone, Debug)]
pub struct DepthPoint {
    /// The depth asked for.
    pub depth: Depth,
    /// The schedule (label `synthesized`, lowered for the costs, validated).
    pub schedule: ValidSchedule,
    /// Step time under the blocking model.
    pub blocking: f64,
    /// Step time under the async model.
    pub async_step: f64,
    /// Activation memory of its fullest rank, in N-ths of the model's activations per
    /// micro-batch.
    pub peak_memory: f64,
}

impl DepthPoint {
    /// `max(blocking, async)`.
    pub fn objective(&self) -> f64 {
        self.blocking.max(self.async_step)
    }
}

/// The DualPipeV placement on `ranks` ranks: the planned schedule, its per-stage costs and the
/// judge of its orders under `cap`.
pub(super) fn v_judge(
    ranks: u32,
    microbatches: u32,
    costs: &SynthCosts,
    cap: f64,
) -> Result<Judge, SynthError> {
    let request = PlanRequest::new(Family::DualPipeV, ranks, microbatches);
    dualpipe_planner::check(&request).map_err(|e| SynthError::Request(e.to_string()))?;
    let planned = plan_family(&request, costs)?;
    Ok(Judge {
        figures: Figures::new(planned.valid.topology(), &planned.costs),
        header: Header {
            schedule: LABEL.into(),
            num_ranks: ranks,
            num_stages: 2 * ranks,
            num_microbatches: microbatches,
            forward_only: false,
            pipelines: planned.valid.schedule().pipelines.clone(),
        },
        costs: planned.costs,
        cap,
    })
}

/// The schedule of `depth` under `judge`: lowered, validated, simulated; `None` when `c` is
/// too few for the depth, the order is over the judge's cap or does not lower.
pub(super) fn point(judge: &Judge, depth: &Depth) -> Option<(Key, DepthPoint)> {
    let (n, c) = (judge.header.num_ranks, judge.header.num_microbatches);
    let order = v_order(n, c, depth)?;
    let mut scratch = Scratch::default();
    let (b, a, valid) = judge.judge(&order, &mut scratch)?;
    Some((
        key(b, a),
        DepthPoint {
            depth: depth.clone(),
            schedule: valid,
            blocking: b,
            async_step: a,
            peak_memory: judge.figures.peak_memory(&order),
        },
    ))
}

/// The DualPipeV-like schedule of `depth` for `ranks` ranks and `microbatches` micro-batches
/// under `costs` (no memory cap), lowered for the costs, validated and simulated. `None` when
/// `microbatches` is below [`Depth::min_microbatches`] or `depth` does not hold one entry per
/// rank boundary (`ranks - 1`).
pub fn deep_v(
    ranks: u32,
    microbatches: u32,
    costs: &SynthCosts,
    depth: &Depth,
) -> Result<Option<DepthPoint>, SynthError> {
    let judge = v_judge(ranks, microbatches, costs, f64::INFINITY)?;
    Ok(point(&judge, depth).map(|(_, p)| p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::computes;
    use dualpipe_planner::plan;

    #[test]
    fn no_extra_lag_is_dualpipev() {
        for (n, c) in [(1, 2), (2, 4), (3, 7), (4, 8), (8, 32), (5, 13)] {
            let planned = plan(&PlanRequest::new(Family::DualPipeV, n, c)).unwrap();
            let order = v_order(n, c, &Depth::none(n)).unwrap();
            assert_eq!(order, computes(planned.schedule()), "N={n} C={c}");
        }
    }

    #[test]
    fn spread_places_k_long_boundaries() {
        for k in 0..=7 {
            let d = Depth::spread(8, k);
            assert_eq!(d.lag.len(), 7);
            assert_eq!(d.total(), k);
        }
        assert_eq!(Depth::spread(8, 9).total(), 7);
        assert_eq!(Depth::boundaries(4, &[0, 2, 5]).lag, vec![1, 0, 1]);
    }
}
