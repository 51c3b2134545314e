//! The exact feasibility test behind the bottleneck optimum, for mirrored placements.
//!
//! # The problem
//!
//! `L` layers are cut into `S` non-empty contiguous stages. Every constraint (a rank's time, or
//! its memory) is a non-negative linear form in the sums of the layers of at most two stages,
//! `k` and its mirror `S-1-k` (see [`Placement::is_mirrored`]): 1F1B-like schedules hold one
//! stage per rank, the V (DualPipeV, ZB-V) holds `r` and `2N-1-r` on rank `r`, DualPipe holds
//! `r` and `N-1-r` on ranks `r` and `N-1-r`. The question "is there a cut where every
//! constraint stays within its limit?" is answered exactly; a search on the time limit then
//! gives the least bottleneck (`exact_bottleneck` in `lib.rs`).
//!
//! # The method
//!
//! Cut from both ends inwards, one mirror pair per step. After `k` steps the state is `(a, b)`:
//! stages `0..k` cover the first `a` layers and stages `S-k..S` the last `b` layers. Step `k`
//! picks `a' > a` and `b' > b` (both new stages non-empty) such that every constraint of pair
//! `k` holds for the ranges `[a, a')` and `[L-b', L-b)`. Since the constraints of pair `k`
//! involve only those two ranges, the state `(a, b)` is all the future depends on: the set
//! `R_k` of reachable states is computed exactly, step by step, and the cut exists iff the
//! last step can close the gap (`a' + b' = L`, or for an odd `S` a middle stage
//! `[a, L-b)` that fits its own constraints). This is a plain dynamic program over states, so
//! it is exact; what makes it fast is how `R_{k+1}` is computed from `R_k`.
//!
//! For a fixed `a` and `a'`, each constraint leaves a residual for the right range. The right
//! range `[L-b', L-b)` fits iff `b' <= r(b)`, where `r(b)` (the farthest fitting `b'`) is
//! non-decreasing in `b` because the forms are non-negative. Hence `b'` is reachable from the
//! row `R_k(a)` iff the largest `b` in the row below `b'` has `r(b) >= b'`. Split by whether
//! `b' - 1` is itself in the row:
//!
//! - if it is, `b'` is reachable iff the single layer `L-b'` fits the residuals: a bit mask of
//!   the layers that fit, looked up from per-constraint sorted thresholds, so the whole row is
//!   handled with word operations (`(row & light) << 1`);
//! - if not, the largest `b` below is the end `h` of a run of the row, and `b'` is reachable
//!   iff `h + 2 <= b' <= r(h)`: one binary search per run.
//!
//! Rows are bit sets over `b`. Every comparison is made on the same floating-point
//! expression in the forward pass and in the walk back that recovers the cut, so the two agree.
//!
//! Exactness is checked against brute force over every cut on small cases (`tests`).

use std::cell::RefCell;

use crate::placement::{BI, Constraint, F, Kind, Placement, Q, W};

/// One constraint as pair `k` sees it: weights on the left stage `k` and on the right stage
/// `S-1-k` (zero where the constraint does not involve it).
#[derive(Clone, Debug)]
struct PairConstraint {
    left: [f64; Q],
    right: [f64; Q],
    kind: Kind,
    /// Index into `Solver::masks` of the light-layer masks of `right`; `None` when `right` is
    /// zero (every layer fits).
    mask: Option<usize>,
}

/// For one right-hand weight vector: the single-layer values sorted, and for each count `t`
/// the bit set (by right index `j`, layer `L-1-j`) of the `t` lightest layers.
struct Masks {
    sorted: Vec<f64>,
    bits: Vec<u64>,
}

pub(crate) struct Solver<'a> {
    layers: usize,
    stages: usize,
    prefix: &'a [[f64; Q]],
    /// Per pair `k` (the middle stage last when `S` is odd).
    groups: Vec<Vec<PairConstraint>>,
    masks: Vec<Masks>,
    words: usize,
    /// `work[i]`: `f + b` of layers `0..i`.
    work: Vec<f64>,
    /// Per pair `k`: the most work (`f + b`) its stages can hold per unit of the time limit,
    /// summed over pairs `k..`; used to drop states that leave too much work for the pairs
    /// still to come. Infinite where a pair's time does not bound its work.
    capacity_after: Vec<f64>,
    /// Zeroed level buffers (`rows * words`) kept between tests: a search runs several, and
    /// clearing the rows a test wrote costs less than fresh pages.
    pool: RefCell<Vec<Vec<u64>>>,
}

/// The limits a feasibility test checks against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub time: f64,
    pub memory: f64,
}

impl Limits {
    fn of(&self, kind: Kind) -> f64 {
        match kind {
            Kind::Time => self.time,
            Kind::Memory => self.memory,
        }
    }
}

fn dot(w: &[f64; Q], hi: &[f64; Q], lo: &[f64; Q]) -> f64 {
    let mut v = 0.0;
    for i in 0..Q {
        v += w[i] * (hi[i] - lo[i]);
    }
    v
}

impl<'a> Solver<'a> {
    /// A solver for `placement` (which must be mirrored) over layers with prefix sums
    /// `prefix` (`prefix[i]` = quantities of layers `0..i`).
    pub fn new(placement: &Placement, prefix: &'a [[f64; Q]]) -> Solver<'a> {
        let layers = prefix.len() - 1;
        let stages = placement.num_stages;
        let last = stages - 1;
        let pairs = stages.div_ceil(2);
        let words = (layers + 1).div_ceil(64) + 1;
        let mut groups: Vec<Vec<PairConstraint>> = vec![Vec::new(); pairs];
        let mut masks: Vec<Masks> = Vec::new();
        let mut mask_keys: Vec<[u64; Q]> = Vec::new();
        for Constraint { kind, terms, .. } in &placement.constraints {
            let Some(&(first, _)) = terms.first() else {
                continue;
            };
            let k = first.min(last - first);
            let mut left = [0.0; Q];
            let mut right = [0.0; Q];
            for &(s, w) in terms {
                let side = if s == k { &mut left } else { &mut right };
                for i in 0..Q {
                    side[i] += w[i];
                }
            }
            if left.iter().chain(&right).all(|&w| w == 0.0) {
                continue;
            }
            let mask = right.iter().any(|&w| w != 0.0).then(|| {
                let key = right.map(f64::to_bits);
                match mask_keys.iter().position(|k| *k == key) {
                    Some(i) => i,
                    None => {
                        mask_keys.push(key);
                        masks.push(Masks::new(&right, prefix, words));
                        masks.len() - 1
                    }
                }
            });
            groups[k].push(PairConstraint {
                left,
                right,
                kind: *kind,
                mask,
            });
        }
        let work: Vec<f64> = prefix.iter().map(|q| q[F] + q[BI] + q[W]).collect();
        // The components that carry any time at all; a weight of 0 on an unused one does not
        // loosen the bound.
        let used: Vec<usize> = [F, BI, W]
            .into_iter()
            .filter(|&i| prefix[layers][i] > 0.0)
            .collect();
        let least = |w: &[f64; Q]| used.iter().map(|&i| w[i]).fold(f64::INFINITY, f64::min);
        let mut capacity: Vec<f64> = groups
            .iter()
            .enumerate()
            .map(|(k, group)| {
                let two_sided = k != last - k;
                let times = group.iter().filter(|c| c.kind == Kind::Time);
                // A constraint weighing both stages bounds their work together; otherwise the
                // best bound of each stage alone, summed.
                let mut joint = f64::INFINITY;
                let (mut left, mut right) = (f64::INFINITY, f64::INFINITY);
                for c in times {
                    let (l, r) = (least(&c.left), least(&c.right));
                    if l > 0.0 {
                        left = left.min(1.0 / l);
                    }
                    if r > 0.0 {
                        right = right.min(1.0 / r);
                    }
                    if two_sided && l > 0.0 && r > 0.0 {
                        joint = joint.min(1.0 / l.min(r));
                    }
                }
                if two_sided {
                    joint.min(left + right)
                } else {
                    left
                }
            })
            .collect();
        if used.is_empty() {
            capacity.iter_mut().for_each(|c| *c = f64::INFINITY);
        }
        let mut capacity_after = vec![0.0; capacity.len() + 1];
        for k in (0..capacity.len()).rev() {
            capacity_after[k] = capacity_after[k + 1] + capacity[k];
        }
        Solver {
            layers,
            stages,
            prefix,
            groups,
            masks,
            words,
            work,
            capacity_after,
            pool: RefCell::new(Vec::new()),
        }
    }

    /// A limit on the time below which no cut is feasible: all the work over the most work
    /// the stages can hold per unit of time (0 when that is unbounded).
    pub fn lower_bound(&self) -> f64 {
        let total = self.work[self.layers] - self.work[0];
        let capacity = self.capacity_after[0];
        if capacity.is_finite() && capacity > 0.0 {
            total / capacity
        } else {
            0.0
        }
    }

    /// The least `b` a state `(a, b)` before pair `k` may have: the layers `a..L-b` left for
    /// pairs `k..` must not hold more work than they can take under `time`.
    fn least_b(&self, k: usize, time: f64, a: usize) -> usize {
        let room = time * self.capacity_after[k];
        if !room.is_finite() {
            return 0;
        }
        let l = self.layers;
        // The largest e with work(a..e) <= room; b >= L - e.
        let (mut lo, mut hi) = (a, l);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.work[mid] - self.work[a] <= room {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        l - lo
    }

    /// [`Solver::least_b`] for every `a` at once (`out[a]`), in one sweep: the farthest end
    /// only moves forward as `a` does.
    fn least_b_all(&self, k: usize, time: f64, out: &mut [usize]) {
        let room = time * self.capacity_after[k];
        let l = self.layers;
        if !room.is_finite() {
            out.iter_mut().for_each(|v| *v = 0);
            return;
        }
        let mut e = 0;
        for (a, v) in out.iter_mut().enumerate() {
            e = e.max(a);
            while e < l && self.work[e + 1] - self.work[a] <= room {
                e += 1;
            }
            *v = l - e;
        }
    }

    /// Value of `w` on layers `lo..hi`.
    fn range(&self, w: &[f64; Q], lo: usize, hi: usize) -> f64 {
        dot(w, &self.prefix[hi], &self.prefix[lo])
    }

    /// Residuals of pair `k`'s constraints once the left range `a..a2` is taken; `false` when
    /// the left range alone breaks one.
    fn residuals(&self, k: usize, limits: Limits, a: usize, a2: usize, out: &mut Vec<f64>) -> bool {
        out.clear();
        for c in &self.groups[k] {
            let limit = limits.of(c.kind);
            if limit == f64::INFINITY {
                // No limit (no memory cap): nothing to check on either side.
                out.push(f64::INFINITY);
                continue;
            }
            let r = limit - self.range(&c.left, a, a2);
            if r < 0.0 {
                return false;
            }
            out.push(r);
        }
        true
    }

    /// Whether the right range `b..b2` (layers `L-b2..L-b`) fits the residuals of pair `k`.
    fn right_fits(&self, k: usize, residuals: &[f64], b: usize, b2: usize) -> bool {
        let l = self.layers;
        self.groups[k].iter().zip(residuals).all(|(c, &r)| {
            c.mask.is_none() || r == f64::INFINITY || self.range(&c.right, l - b2, l - b) <= r
        })
    }

    /// The largest `b2` in `b..=bmax` whose right range fits (`b` itself always does).
    fn reach(&self, k: usize, residuals: &[f64], b: usize, bmax: usize) -> usize {
        let (mut lo, mut hi) = (b, bmax);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.right_fits(k, residuals, b, mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// A cut (the `S + 1` boundaries) meeting every limit, or `None` when there is none.
    pub fn feasible(&self, limits: Limits) -> Option<Vec<usize>> {
        let (l, s, w) = (self.layers, self.stages, self.words);
        if l < s || self.least_b(0, limits.time, 0) > 0 {
            return None;
        }
        // levels[k]: R_k as `rows` bit sets of `w` words; `spans[k][a]`: the first and last
        // word of row `a` that may hold bits (`None`: empty row).
        let mut levels: Vec<Vec<u64>> = Vec::with_capacity(s / 2 + 1);
        let mut spans: Vec<Vec<Option<(usize, usize)>>> = Vec::with_capacity(s / 2 + 1);
        let cut = self.search(limits, &mut levels, &mut spans);
        // Clear what the test wrote and keep the buffers for the next one.
        let mut pool = self.pool.borrow_mut();
        for (mut level, span) in levels.into_iter().zip(&spans) {
            if level.is_empty() {
                continue;
            }
            for (a, words) in span.iter().enumerate() {
                if let Some((x, y)) = *words {
                    level[a * w + x..=a * w + y].fill(0);
                }
            }
            pool.push(level);
        }
        cut
    }

    /// A zeroed level buffer of `rows * words` words.
    fn level(&self) -> Vec<u64> {
        self.pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u64; (self.layers + 1) * self.words])
    }

    /// [`Solver::feasible`] on the level buffers `levels`, with their `spans`.
    fn search(
        &self,
        limits: Limits,
        levels: &mut Vec<Vec<u64>>,
        spans: &mut Vec<Vec<Option<(usize, usize)>>>,
    ) -> Option<Vec<usize>> {
        let (l, s, w) = (self.layers, self.stages, self.words);
        let steps = s / 2;
        let rows = l + 1;
        let mut first = self.level();
        first[0] = 1;
        let mut span0 = vec![None; rows];
        span0[0] = Some((0, 0));
        levels.push(first);
        spans.push(span0);
        let mut residuals = Vec::new();
        let mut light = vec![0u64; w];
        let mut out = vec![0u64; w];
        let mut least = vec![0usize; rows];
        for k in 0..steps {
            let need_after = s - 2 * (k + 1);
            let closing = need_after == 0;
            if !closing {
                self.least_b_all(k + 1, limits.time, &mut least);
            }
            let mut next = if closing { Vec::new() } else { self.level() };
            let mut next_span: Vec<Option<(usize, usize)>> = vec![None; rows];
            let amax = l.checked_sub(need_after + k + 1)?;
            for a in k..rows {
                let Some((lo_w, hi_w)) = spans[k][a] else {
                    continue;
                };
                let row = &levels[k][a * w..(a + 1) * w];
                for a2 in a + 1..=amax {
                    if !self.residuals(k, limits, a, a2, &mut residuals) {
                        break;
                    }
                    let bmax = l - a2 - need_after;
                    if closing {
                        // The only target is b' = L - a'.
                        let target = bmax;
                        if let Some(b) = last_below(row, target)
                            && self.right_fits(k, &residuals, b, target)
                        {
                            let mut cut = self.walk_back(levels, spans, limits, k + 1, a2, target);
                            // a' and L - b' are the same boundary.
                            cut.remove(k + 1);
                            return Some(cut);
                        }
                        continue;
                    }
                    let bmin = least[a2].max(k + 1);
                    if bmax < bmin {
                        continue;
                    }
                    self.light(k, &residuals, lo_w, hi_w, &mut light);
                    // (row & light) << 1, over the words that can change.
                    let top = (hi_w + 1).min(w - 1);
                    let mut carry = 0u64;
                    for i in lo_w..=top {
                        let v = if i <= hi_w { row[i] & light[i] } else { 0 };
                        out[i] = (v << 1) | carry;
                        carry = v >> 63;
                    }
                    let mut last_word = top;
                    // Runs of the row: from each run end h, every b' in h+2..=r(h).
                    for i in lo_w..=hi_w {
                        let next_low = if i + 1 < w { row[i + 1] & 1 } else { 0 };
                        let mut ends = row[i] & !((row[i] >> 1) | (next_low << 63));
                        while ends != 0 {
                            let h = i * 64 + ends.trailing_zeros() as usize;
                            ends &= ends - 1;
                            if h + 2 > bmax {
                                continue;
                            }
                            let e = self.reach(k, &residuals, h, bmax);
                            if e >= h + 2 {
                                set_range(&mut out, h + 2, e);
                                last_word = last_word.max(e / 64);
                            }
                        }
                    }
                    // Keep b' in bmin..=bmax.
                    clear_above(&mut out, bmax, last_word);
                    clear_below(&mut out, bmin, lo_w);
                    let dest = &mut next[a2 * w..(a2 + 1) * w];
                    let mut any = None::<(usize, usize)>;
                    for i in lo_w..=last_word.min(w - 1) {
                        if out[i] != 0 {
                            dest[i] |= out[i];
                            any = Some(match any {
                                None => (i, i),
                                Some((x, _)) => (x, i),
                            });
                        }
                        out[i] = 0;
                    }
                    if let Some((x, y)) = any {
                        next_span[a2] = Some(match next_span[a2] {
                            None => (x, y),
                            Some((p, q)) => (p.min(x), q.max(y)),
                        });
                    }
                }
            }
            if closing {
                return None;
            }
            levels.push(next);
            spans.push(next_span);
        }
        // An odd number of stages: the middle stage fills the gap.
        let k = steps;
        for a in k..rows {
            if spans[k][a].is_none() || a + 1 > l {
                continue;
            }
            let row = &levels[k][a * w..(a + 1) * w];
            let Some(b) = last_below(row, l - a) else {
                continue;
            };
            if self.residuals(k, limits, a, l - b, &mut residuals) {
                return Some(self.walk_back(levels, spans, limits, k, a, b));
            }
        }
        None
    }

    /// The layers that fit alone on the right of pair `k` under `residuals`, words
    /// `lo..=hi` of `light` (bit `j` for layer `L-1-j`).
    fn light(&self, k: usize, residuals: &[f64], lo: usize, hi: usize, light: &mut [u64]) {
        for v in &mut light[lo..=hi] {
            *v = u64::MAX;
        }
        for (c, &r) in self.groups[k].iter().zip(residuals) {
            let Some(m) = c.mask else { continue };
            if r == f64::INFINITY {
                continue;
            }
            let masks = &self.masks[m];
            if masks.sorted.last().is_none_or(|&v| v <= r) {
                // Every layer fits alone.
                continue;
            }
            let t = masks.sorted.partition_point(|&v| v <= r);
            let bits = &masks.bits[t * self.words..(t + 1) * self.words];
            for i in lo..=hi {
                light[i] &= bits[i];
            }
        }
    }

    /// From a state `(a, b)` reached after `count` steps, the boundaries `0, a_1, ..., a` then
    /// `L - b, ..., L`: a middle stage, if any, is `a..L-b`.
    fn walk_back(
        &self,
        levels: &[Vec<u64>],
        spans: &[Vec<Option<(usize, usize)>>],
        limits: Limits,
        count: usize,
        a_end: usize,
        b_end: usize,
    ) -> Vec<usize> {
        let (l, w) = (self.layers, self.words);
        let mut lefts = vec![a_end];
        let mut rights = vec![b_end];
        let (mut a2, mut b2) = (a_end, b_end);
        let mut residuals = Vec::new();
        // Step `j` goes from R_j to R_{j+1}.
        for j in (0..count).rev() {
            let mut found = None;
            for a in (j..a2).rev() {
                if !self.residuals(j, limits, a, a2, &mut residuals) {
                    break;
                }
                if spans[j][a].is_none() {
                    continue;
                }
                let row = &levels[j][a * w..(a + 1) * w];
                if let Some(b) = last_below(row, b2)
                    && self.right_fits(j, &residuals, b, b2)
                {
                    found = Some((a, b));
                    break;
                }
            }
            // The forward pass put (a2, b2) in R_{j+1}, so a predecessor exists.
            let (a, b) = found.unwrap_or((j, j));
            lefts.push(a);
            rights.push(b);
            (a2, b2) = (a, b);
        }
        lefts.reverse();
        // lefts: 0 = a_0 <= ... ; rights: b_top, ..., b_0 = 0 -> boundaries L - b.
        let mut cut = lefts;
        cut.extend(rights.iter().map(|&b| l - b));
        cut
    }
}

impl Masks {
    fn new(right: &[f64; Q], prefix: &[[f64; Q]], words: usize) -> Masks {
        let l = prefix.len() - 1;
        // Right index j is layer L-1-j, valued as the range L-1-j..L-j (the same expression
        // as `Solver::right_fits`).
        let values: Vec<f64> = (0..l)
            .map(|j| dot(right, &prefix[l - j], &prefix[l - 1 - j]))
            .collect();
        let mut order: Vec<usize> = (0..l).collect();
        order.sort_by(|&x, &y| values[x].total_cmp(&values[y]));
        let mut bits = vec![0u64; (l + 1) * words];
        for (t, &j) in order.iter().enumerate() {
            let (done, rest) = bits.split_at_mut((t + 1) * words);
            let prev = &done[t * words..];
            let cur = &mut rest[..words];
            cur.copy_from_slice(prev);
            cur[j / 64] |= 1 << (j % 64);
        }
        Masks {
            sorted: order.iter().map(|&j| values[j]).collect(),
            bits,
        }
    }
}

/// The largest set bit of `row` strictly below `limit`.
fn last_below(row: &[u64], limit: usize) -> Option<usize> {
    if limit == 0 {
        return None;
    }
    let top = limit - 1;
    let mut i = top / 64;
    let mut word = row.get(i).copied().unwrap_or(0);
    let keep = top % 64;
    if keep < 63 {
        word &= (1u64 << (keep + 1)) - 1;
    }
    loop {
        if word != 0 {
            return Some(i * 64 + 63 - word.leading_zeros() as usize);
        }
        if i == 0 {
            return None;
        }
        i -= 1;
        word = row[i];
    }
}

/// Sets bits `from..=to`.
fn set_range(bits: &mut [u64], from: usize, to: usize) {
    let (i, j) = (from / 64, to / 64);
    let low = u64::MAX << (from % 64);
    let high = u64::MAX >> (63 - to % 64);
    if i == j {
        bits[i] |= low & high;
    } else {
        bits[i] |= low;
        for v in &mut bits[i + 1..j] {
            *v = u64::MAX;
        }
        bits[j] |= high;
    }
}

fn clear_below(bits: &mut [u64], min: usize, from_word: usize) {
    let i = min / 64;
    let end = i.min(bits.len());
    for v in &mut bits[from_word.min(end)..end] {
        *v = 0;
    }
    if let Some(v) = bits.get_mut(i) {
        *v &= !((1u64 << (min % 64)) - 1);
    }
}

fn clear_above(bits: &mut [u64], max: usize, last_word: usize) {
    let i = max / 64;
    if i < bits.len() {
        let keep = max % 64;
        if keep < 63 {
            bits[i] &= (1u64 << (keep + 1)) - 1;
        }
        let end = last_word.min(bits.len() - 1).max(i);
        for v in &mut bits[i + 1..=end] {
            *v = 0;
        }
    }
}
