//! Property tests over many configurations per family: every planned schedule validates, and
//! DualPipe/DualPipeV have the per-rank counts of the reference implementation.

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{Instruction, RankStats, Schedule, rank_stats, validate};
use proptest::prelude::*;

fn planned(request: PlanRequest) -> (Schedule, Vec<RankStats>) {
    let schedule = plan(&request)
        .unwrap_or_else(|e| panic!("{request:?}: {e}"))
        .into_inner();
    if let Err(errors) = validate(&schedule) {
        panic!("{request:?}: {errors}");
    }
    let stats = rank_stats(&schedule);
    (schedule, stats)
}

/// DualPipe, rank r of N with C micro-batches: the counts of the reference implementation.
fn check_dualpipe(n: u32, c: u32) {
    let (_, stats) = planned(PlanRequest::new(Family::DualPipe, n, c));
    let (half, m) = (n / 2, c / 2);
    for (r, s) in stats.iter().enumerate() {
        let r = r as u32;
        let h = r.min(n - 1 - r);
        let middle = u32::from(h == half - 1);
        assert_eq!((s.forwards, s.backwards), (c, c), "rank {r}");
        assert_eq!(
            s.overlapped,
            2 * (m - n + h + 1) + (half - h - 1) - middle,
            "FB, rank {r}"
        );
        assert_eq!(s.deferred, n - h - 1, "zero-bubble B, rank {r}");
        assert_eq!(s.weights, s.deferred, "W, rank {r}");
        let messages = if r == 0 || r == n - 1 { c } else { 2 * c };
        assert_eq!((s.sends, s.recvs), (messages, messages), "rank {r}");
        assert_eq!(
            s.peak_activations,
            n + 1,
            "peak activations (PP + 1), rank {r}"
        );
        assert_eq!(s.peak_pending_w, h + 1, "peak pending W, rank {r}");
    }
}

/// DualPipeV, rank r of N with C micro-batches.
fn check_dualpipev(n: u32, c: u32) {
    let (_, stats) = planned(PlanRequest::new(Family::DualPipeV, n, c));
    for (r, s) in stats.iter().enumerate() {
        let r = r as u32;
        let last = u32::from(r == n - 1);
        assert_eq!((s.forwards, s.backwards), (2 * c, 2 * c), "rank {r}");
        assert_eq!(
            s.overlapped,
            2 * (c - 2 * n + r + 1) + (n - r - 1) - last,
            "FB, rank {r}"
        );
        assert_eq!(s.deferred, 2 * n - r - 1, "zero-bubble B, rank {r}");
        assert_eq!(s.weights, s.deferred, "W, rank {r}");
        let messages = match (r == 0, r == n - 1) {
            (true, true) => 0,
            (false, false) => 4 * c,
            _ => 2 * c,
        };
        assert_eq!((s.sends, s.recvs), (messages, messages), "rank {r}");
        assert_eq!(
            s.peak_activations,
            2 * n + 1,
            "peak activations (PP + 1), rank {r}"
        );
        assert_eq!(s.peak_pending_w, r + 1, "peak pending W, rank {r}");
    }
}

/// DualPipeV(N, C) is DualPipe(2N, 2C) cut in half: every rank but the last issues the same
/// instructions, once DualPipe's second-direction micro-batches `C..2C` are renamed `0..C`.
fn check_cut_in_half(n: u32, c: u32) {
    let v = plan(&PlanRequest::new(Family::DualPipeV, n, c))
        .unwrap()
        .into_inner();
    let full = plan(&PlanRequest::new(Family::DualPipe, 2 * n, 2 * c))
        .unwrap()
        .into_inner();
    let fold = |mb: u32| if mb >= c { mb - c } else { mb };
    for r in 0..(n - 1) as usize {
        let folded: Vec<Instruction> = full.ranks[r]
            .iter()
            .map(|&i| match i {
                Instruction::Forward(mut w) => {
                    w.mb = fold(w.mb);
                    Instruction::Forward(w)
                }
                Instruction::Backward { mut work, defer_w } => {
                    work.mb = fold(work.mb);
                    Instruction::Backward { work, defer_w }
                }
                Instruction::Weight(mut w) => {
                    w.mb = fold(w.mb);
                    Instruction::Weight(w)
                }
                Instruction::ForwardBackward { mut f, mut b } => {
                    f.mb = fold(f.mb);
                    b.mb = fold(b.mb);
                    Instruction::ForwardBackward { f, b }
                }
                Instruction::Send(mut m) => {
                    m.mb = fold(m.mb);
                    Instruction::Send(m)
                }
                Instruction::Recv(mut m) => {
                    m.mb = fold(m.mb);
                    Instruction::Recv(m)
                }
                Instruction::Commit => Instruction::Commit,
            })
            .collect();
        assert_eq!(folded, v.ranks[r], "DualPipeV({n}, {c}) rank {r}");
    }
}

fn check_forward_only(family: Family, n: u32, c: u32) {
    let (schedule, stats) = planned(PlanRequest::new(family, n, c).forward_only());
    assert!(schedule.forward_only);
    let copies = if family == Family::DualPipe { 1 } else { 2 };
    for (r, s) in stats.iter().enumerate() {
        assert_eq!(s.forwards, copies * c, "rank {r}");
        assert_eq!(
            (s.backwards, s.weights, s.overlapped),
            (0, 0, 0),
            "rank {r}"
        );
    }
}

#[test]
fn dualpipe_counts_on_small_configurations() {
    for n in (2..=8).step_by(2) {
        for c in (2 * n..=2 * n + 12).step_by(2) {
            check_dualpipe(n, c);
            check_forward_only(Family::DualPipe, n, c);
        }
    }
}

#[test]
fn dualpipev_counts_on_small_configurations() {
    for n in 1..=6 {
        for c in 2 * n..=2 * n + 9 {
            check_dualpipev(n, c);
            check_forward_only(Family::DualPipeV, n, c);
            check_cut_in_half(n, c);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn dualpipe_counts(half in 1u32..=12, extra in 0u32..=40) {
        let n = 2 * half;
        check_dualpipe(n, 2 * n + 2 * extra);
    }

    #[test]
    fn dualpipev_counts(n in 1u32..=16, extra in 0u32..=60) {
        check_dualpipev(n, 2 * n + extra);
        check_cut_in_half(n, 2 * n + extra);
    }

    #[test]
    fn classic_families_validate(n in 1u32..=10, c in 1u32..=40, v in 1u32..=4, forward_only: bool) {
        for family in [Family::OneFOneB, Family::GPipe, Family::Zb1p, Family::Zbv, Family::Interleaved1F1B] {
            let mut request = PlanRequest::new(family, n, c);
            if family == Family::Interleaved1F1B {
                request = request.chunks_per_rank(v);
            }
            if forward_only {
                request = request.forward_only();
            }
            if dualpipe_planner::check(&request).is_err() {
                continue;
            }
            let (schedule, stats) = planned(request);
            let per_rank = schedule.num_stages / n;
            for (r, s) in stats.iter().enumerate() {
                prop_assert_eq!(s.forwards, per_rank * c, "{:?} rank {}", request, r);
                if !forward_only {
                    prop_assert_eq!(s.backwards, per_rank * c);
                }
                match family {
                    Family::OneFOneB if !forward_only => prop_assert_eq!(s.peak_activations, (n - r as u32).min(c)),
                    Family::Zb1p if !forward_only => prop_assert!(s.peak_activations <= n.min(c)),
                    Family::GPipe if !forward_only => prop_assert_eq!(s.peak_activations, c),
                    _ => {}
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Lowered for any costs, every classic family validates and runs to the end under both
    /// models, and the async step is never longer than the blocking one.
    #[test]
    fn classic_families_lowered_for_any_costs_validate(
        n in 1u32..=6,
        c in 1u32..=16,
        v in 1u32..=3,
        f in 0.0f64..4.0,
        b in 0.0f64..6.0,
        w_share in 0.0f64..=1.0,
        heavy in 1.0f64..4.0,
        comm in 0.0f64..1.0,
    ) {
        use dualpipe_schedule::{Costs, ExecutionModel, StageOverride, simulate};
        for family in [Family::OneFOneB, Family::GPipe, Family::Zb1p, Family::Zbv, Family::Interleaved1F1B] {
            let mut request = PlanRequest::new(family, n, c);
            if family == Family::Interleaved1F1B {
                request = request.chunks_per_rank(v);
            }
            if dualpipe_planner::check(&request).is_err() {
                continue;
            }
            let stages = plan(&request).unwrap().schedule().num_stages;
            let mut costs = Costs::default();
            costs.uniform.f = f;
            costs.uniform.b = b;
            costs.uniform.w = b * w_share;
            costs.latency = comm;
            costs.stages.insert(stages - 1, StageOverride {
                f: Some(f * heavy),
                b: Some(b * heavy),
                w: Some(b * w_share * heavy),
                ..StageOverride::default()
            });
            let valid = dualpipe_planner::plan_for(&request, &costs)
                .unwrap_or_else(|e| panic!("{request:?} {costs:?}: {e}"));
            let blocking = simulate(&valid, &costs, ExecutionModel::Blocking).unwrap().makespan;
            let overlapped = simulate(&valid, &costs, ExecutionModel::Async).unwrap().makespan;
            prop_assert!(overlapped <= blocking + 1e-9, "{:?}", request);
        }
    }
}
