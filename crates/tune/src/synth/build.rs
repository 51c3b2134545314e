//! Building blocks: compute orders built by a list scheduler for a fixed placement, with
//! randomised policies. The ranks advance on their own clocks under the fast timing; whenever a
//! rank is free it runs what its policy prefers among the computes whose inputs have arrived:
//! a backward (alone, with its weight gradient deferred or not) and a forward overlapped into an
//! `FB`, a backward alone, a forward (only within the memory cap), or a deferred `W` to fill the
//! time until something arrives. Forwards and backwards of a stage go in micro-batch order.

use dualpipe_schedule::{Instruction, Work};

use super::order::{Figures, Rng};

/// One randomised policy of the list scheduler.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Chance of overlapping a ready forward and backward into an `FB`.
    pub fb: f64,
    /// Chance of deferring the weight gradient of a backward run alone.
    pub defer: f64,
    /// Prefer forwards of later stages (depth first) rather than earlier ones.
    pub f_late: bool,
    /// Prefer backwards of later stages rather than earlier ones.
    pub b_late: bool,
    /// How long a rank with only a forward ready waits for a backward to pair it with, as a
    /// share of the forward's cost.
    pub wait: f64,
    /// Chance of a random choice instead of the preferred one.
    pub noise: f64,
    /// Keep this share of the memory cap free for forwards (a margin against running out).
    pub margin: f64,
}

impl Policy {
    /// A random policy.
    pub fn random(rng: &mut Rng) -> Policy {
        let pick = |rng: &mut Rng, values: &[f64]| values[rng.below(values.len())];
        Policy {
            fb: pick(rng, &[0.0, 0.5, 0.8, 1.0, 1.0, 1.0]),
            defer: pick(rng, &[0.0, 0.0, 0.3, 0.6, 1.0]),
            f_late: rng.below(2) == 0,
            b_late: rng.below(2) == 0,
            wait: pick(rng, &[0.0, 0.0, 0.25, 0.5, 1.0, 2.0]),
            noise: pick(rng, &[0.0, 0.0, 0.02, 0.05, 0.15]),
            margin: pick(rng, &[0.0, 0.0, 0.0, 0.1]),
        }
    }
}

/// Builds one compute order; `None` when the policy runs every rank into a wait that never
/// ends (the memory cap too tight for it).
pub(crate) fn build(
    figures: &Figures,
    ranks: u32,
    cap: f64,
    policy: &Policy,
    rng: &mut Rng,
) -> Option<Vec<Vec<Instruction>>> {
    let (s_count, c) = (figures.stages, figures.microbatches);
    let n = ranks as usize;
    let last = s_count - 1;
    let slot = |s: u32, m: u32| (s * c + m) as usize;
    // Stages of each rank (the placement is the same for every micro-batch).
    let mut held: Vec<Vec<u32>> = vec![Vec::new(); n];
    for s in 0..s_count {
        let r = figures.rank_of[slot(s, 0)] as usize;
        held[r].push(s);
    }
    if (0..s_count)
        .any(|s| (0..c).any(|m| figures.rank_of[slot(s, m)] != figures.rank_of[slot(s, 0)]))
    {
        return None;
    }
    let mut f_end = vec![f64::NAN; (s_count * c) as usize];
    let mut b_end = vec![f64::NAN; (s_count * c) as usize];
    let mut next_f = vec![0u32; s_count as usize];
    let mut next_b = vec![0u32; s_count as usize];
    let mut pending: Vec<std::collections::VecDeque<Work>> = vec![Default::default(); n];
    let mut live = vec![0.0f64; n];
    let mut clock = vec![0.0f64; n];
    let mut order: Vec<Vec<Instruction>> = vec![Vec::new(); n];
    let mut left: Vec<u32> = held.iter().map(|h| 2 * c * h.len() as u32).collect();
    let mut waiting = vec![false; n];
    let fb_pays = |s_f: u32, s_b: u32| {
        let f = figures.duration(Instruction::f(s_f, 0));
        let b = figures.duration(Instruction::b(s_b, 0));
        let fb = figures.duration(Instruction::ForwardBackward {
            f: Work::new(s_f, 0),
            b: Work::new(s_b, 1),
        });
        fb < f + b
    };
    let budget = 64 * (s_count as usize) * (c as usize) + 1024;
    for _ in 0..budget {
        // The free rank with the earliest clock that still has work.
        let Some(r) = (0..n)
            .filter(|&r| (left[r] > 0 || !pending[r].is_empty()) && !waiting[r])
            .min_by(|&a, &b| clock[a].total_cmp(&clock[b]).then(a.cmp(&b)))
        else {
            if (0..n).all(|r| left[r] == 0 && pending[r].is_empty()) {
                return Some(order);
            }
            return None;
        };
        let t = clock[r];
        // Forwards and backwards whose inputs are known: (stage, mb, arrival).
        let mut fs: Vec<(u32, u32, f64)> = Vec::new();
        let mut bs: Vec<(u32, u32, f64)> = Vec::new();
        for &s in &held[r] {
            let m = next_f[s as usize];
            if m < c {
                let arrival = if s == 0 {
                    Some(0.0)
                } else {
                    let e = f_end[slot(s - 1, m)];
                    let cross = figures.rank_of[slot(s - 1, m)] as usize != r;
                    (!e.is_nan()).then(|| e + if cross { figures.comm(s - 1) } else { 0.0 })
                };
                if let Some(a) = arrival {
                    fs.push((s, m, a));
                }
            }
            let m = next_b[s as usize];
            if m < c && !f_end[slot(s, m)].is_nan() {
                let own = f_end[slot(s, m)];
                let arrival = if s == last {
                    Some(own)
                } else {
                    let e = b_end[slot(s + 1, m)];
                    let cross = figures.rank_of[slot(s + 1, m)] as usize != r;
                    (!e.is_nan()).then(|| own.max(e + if cross { figures.comm(s) } else { 0.0 }))
                };
                if let Some(a) = arrival {
                    bs.push((s, m, a));
                }
            }
        }
        // A forward leaves room for one activation of every later stage of the rank, so the
        // micro-batches it holds can always reach their backward.
        let room = |s: u32, live: f64| {
            let reserve: f64 = held[r]
                .iter()
                .filter(|&&o| o > s)
                .map(|&o| figures.activation[o as usize])
                .sum();
            let need = live + figures.activation[s as usize] + reserve;
            need <= cap * (1.0 - policy.margin) + 1e-9
                || need <= cap + 1e-9 && s == held[r][held[r].len() - 1]
        };
        let pick = |list: &[(u32, u32, f64)], late: bool, rng: &mut Rng| -> Option<(u32, u32)> {
            if list.is_empty() {
                return None;
            }
            if policy.noise > 0.0 && rng.unit() < policy.noise {
                let (s, m, _) = list[rng.below(list.len())];
                return Some((s, m));
            }
            let best = if late {
                list.iter().max_by_key(|x| (x.0, std::cmp::Reverse(x.1)))
            } else {
                list.iter().min_by_key(|x| (x.0, x.1))
            };
            best.map(|&(s, m, _)| (s, m))
        };
        let ready_f: Vec<_> = fs
            .iter()
            .copied()
            .filter(|&(s, _, a)| a <= t + 1e-12 && room(s, live[r]))
            .collect();
        let ready_b: Vec<_> = bs
            .iter()
            .copied()
            .filter(|&(_, _, a)| a <= t + 1e-12)
            .collect();
        let mut chosen: Option<Instruction> = None;
        if !ready_b.is_empty() && !ready_f.is_empty() && rng.unit() < policy.fb {
            let (sb, mb) = pick(&ready_b, policy.b_late, rng)?;
            let candidates: Vec<_> = ready_f
                .iter()
                .copied()
                .filter(|&(sf, mf, _)| mf != mb && fb_pays(sf, sb))
                .collect();
            if let Some((sf, mf)) = pick(&candidates, policy.f_late, rng) {
                chosen = Some(Instruction::ForwardBackward {
                    f: Work::new(sf, mf),
                    b: Work::new(sb, mb),
                });
            }
        }
        if chosen.is_none() && !ready_b.is_empty() {
            // With a forward ready and a pairing possible, the backward alone is still fine.
            let (s, m) = pick(&ready_b, policy.b_late, rng)?;
            let w = figures.duration(Instruction::w(s, m));
            chosen = Some(if w > 0.0 && rng.unit() < policy.defer {
                Instruction::b_defer(s, m)
            } else {
                Instruction::b(s, m)
            });
        }
        if chosen.is_none() && !ready_f.is_empty() {
            // Wait a little for a backward to pair with, when one is due soon.
            let soon = bs
                .iter()
                .filter(|&&(_, _, a)| a > t)
                .map(|&(_, _, a)| a)
                .fold(f64::INFINITY, f64::min);
            let (sf, mf) = pick(&ready_f, policy.f_late, rng)?;
            let f = figures.duration(Instruction::f(sf, mf));
            if policy.wait > 0.0 && soon <= t + policy.wait * f && policy.fb > 0.0 {
                clock[r] = soon;
                continue;
            }
            chosen = Some(Instruction::f(sf, mf));
        }
        if chosen.is_none()
            && let Some(&w) = pending[r].front()
        {
            // Fill the wait with a deferred weight gradient (or run what is left).
            let next = fs
                .iter()
                .chain(bs.iter())
                .map(|&(_, _, a)| a)
                .fold(f64::INFINITY, f64::min);
            let blocked_by_memory = fs.iter().any(|&(s, _, a)| a <= t && !room(s, live[r]));
            if next > t || blocked_by_memory || (fs.is_empty() && bs.is_empty()) {
                chosen = Some(Instruction::Weight(w));
            }
        }
        let Some(instruction) = chosen else {
            // Nothing to run now: move to the next arrival, or to the next clock of another
            // rank (something may be produced for this one meanwhile).
            let arrival = fs
                .iter()
                .chain(bs.iter())
                .map(|&(_, _, a)| a)
                .filter(|&a| a > t)
                .fold(f64::INFINITY, f64::min);
            let other = (0..n)
                .filter(|&o| o != r && (left[o] > 0 || !pending[o].is_empty()) && clock[o] > t)
                .map(|o| clock[o])
                .fold(f64::INFINITY, f64::min);
            let next = arrival.min(other);
            if next.is_finite() {
                clock[r] = next;
            } else {
                waiting[r] = true;
            }
            continue;
        };
        // Run it.
        let ready = match instruction {
            Instruction::Forward(w) => fs
                .iter()
                .find(|x| (x.0, x.1) == (w.stage, w.mb))
                .map(|x| x.2),
            Instruction::Backward { work, .. } => bs
                .iter()
                .find(|x| (x.0, x.1) == (work.stage, work.mb))
                .map(|x| x.2),
            _ => Some(t),
        }
        .unwrap_or(t);
        let start = t.max(ready);
        let end = start + figures.duration(instruction);
        clock[r] = end;
        order[r].push(instruction);
        let a = |w: Work| figures.activation[w.stage as usize];
        match instruction {
            Instruction::Forward(w) => {
                f_end[slot(w.stage, w.mb)] = end;
                next_f[w.stage as usize] += 1;
                live[r] += a(w);
                left[r] -= 1;
            }
            Instruction::Backward { work, defer_w } => {
                b_end[slot(work.stage, work.mb)] = end;
                next_b[work.stage as usize] += 1;
                if defer_w {
                    pending[r].push_back(work);
                } else {
                    live[r] -= a(work);
                }
                left[r] -= 1;
            }
            Instruction::Weight(w) => {
                pending[r].pop_front();
                live[r] -= a(w);
            }
            Instruction::ForwardBackward { f, b } => {
                f_end[slot(f.stage, f.mb)] = end;
                b_end[slot(b.stage, b.mb)] = end;
                next_f[f.stage as usize] += 1;
                next_b[b.stage as usize] += 1;
                live[r] += a(f) - a(b);
                left[r] -= 2;
            }
            _ => {}
        }
        // Something new was produced: every waiting rank looks again.
        for (o, w) in waiting.iter_mut().enumerate() {
            if *w {
                *w = false;
                clock[o] = clock[o].max(t);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualpipe_planner::{Family, PlanRequest, plan};
    use dualpipe_schedule::Costs;

    #[test]
    fn built_orders_are_complete_and_keep_the_cap() {
        let valid = plan(&PlanRequest::new(Family::DualPipeV, 4, 12)).unwrap();
        let mut costs = Costs::default();
        costs
            .apply_assignments("f=1,b=2,w=1,fb=2.4,comm=0.1")
            .unwrap();
        let figures = Figures::new(valid.topology(), &costs);
        let mut rng = Rng::new(3);
        let mut built = 0;
        for cap in [f64::INFINITY, 4.5, 3.0] {
            for _ in 0..40 {
                let policy = Policy::random(&mut rng);
                let Some(order) = build(&figures, 4, cap, &policy, &mut rng) else {
                    continue;
                };
                built += 1;
                assert!(figures.peak_memory(&order) <= cap + 1e-9, "{policy:?}");
                let mut scratch = crate::synth::order::Scratch::default();
                assert!(
                    figures.makespan(&order, &mut scratch).is_some(),
                    "{policy:?}"
                );
                // Every forward and backward once: 2 stages x 12 micro-batches each per rank.
                for list in &order {
                    let f: usize = list
                        .iter()
                        .map(|i| match i {
                            Instruction::Forward(_) => 1,
                            Instruction::ForwardBackward { .. } => 1,
                            _ => 0,
                        })
                        .sum();
                    assert_eq!(f, 24);
                }
            }
        }
        assert!(built > 60, "only {built} of 120 policies built an order");
    }
}
