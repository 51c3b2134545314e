//! Our compute orders against the orders torch's own schedules produce (fixtures/torch).

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::Instruction;

/// A compute instruction in torch's action notation.
fn action(instruction: Instruction) -> Option<String> {
    Some(match instruction {
        Instruction::Forward(w) => format!("{}F{}", w.stage, w.mb),
        Instruction::Backward {
            work,
            defer_w: true,
        } => format!("{}I{}", work.stage, work.mb),
        Instruction::Backward {
            work,
            defer_w: false,
        } => format!("{}B{}", work.stage, work.mb),
        Instruction::Weight(w) => format!("{}W{}", w.stage, w.mb),
        Instruction::ForwardBackward { f, b } => {
            format!("({}F{};{}B{})OVERLAP_F_B", f.stage, f.mb, b.stage, b.mb)
        }
        _ => return None,
    })
}

fn check(file: &str, request: PlanRequest) {
    let path = dualpipe_tests::fixtures().join("torch").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let theirs: Vec<Vec<&str>> = text
        .lines()
        .map(|line| {
            line.split(',')
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .collect()
        })
        .collect();
    let schedule = plan(&request).unwrap();
    assert_eq!(theirs.len(), schedule.ranks.len(), "{file}: rank count");
    for (rank, (list, expected)) in schedule.ranks.iter().zip(&theirs).enumerate() {
        let ours: Vec<String> = list.iter().filter_map(|&i| action(i)).collect();
        for (k, (a, b)) in ours.iter().zip(expected.iter()).enumerate() {
            assert_eq!(a, b, "{file}: rank {rank}, compute {k}");
        }
        assert_eq!(
            ours.len(),
            expected.len(),
            "{file}: rank {rank}: compute count"
        );
    }
}

#[test]
fn dualpipev_matches_torch() {
    for (n, c) in [(2, 4), (3, 6), (4, 8), (4, 10), (4, 12), (8, 20)] {
        check(
            &format!("dualpipev_{n}rank_{c}mb.csv"),
            PlanRequest::new(Family::DualPipeV, n, c),
        );
    }
}

#[test]
fn zbv_matches_torch() {
    for (n, c) in [(2, 4), (4, 8), (4, 10), (8, 16)] {
        check(
            &format!("zbv_{n}rank_{c}mb.csv"),
            PlanRequest::new(Family::Zbv, n, c),
        );
    }
}

#[test]
fn zb1p_matches_torch_interleaved_zero_bubble_with_one_stage_per_rank() {
    for c in [3, 4, 8] {
        check(
            &format!("interleavedzb_4rank_{c}mb_1chunk.csv"),
            PlanRequest::new(Family::Zb1p, 4, c),
        );
    }
}

#[test]
fn interleaved_1f1b_matches_torch() {
    for (n, c, v) in [
        (4, 8, 2),
        (4, 8, 3),
        (2, 4, 2),
        (4, 6, 2),
        (4, 10, 2),
        (4, 3, 2),
    ] {
        check(
            &format!("interleaved1f1b_{n}rank_{c}mb_{v}chunk.csv"),
            PlanRequest::new(Family::Interleaved1F1B, n, c).chunks_per_rank(v),
        );
    }
}

#[test]
fn one_f_one_b_and_gpipe_match_torch() {
    check(
        "1f1b_4rank_8mb.runtime-order.csv",
        PlanRequest::new(Family::OneFOneB, 4, 8),
    );
    check(
        "gpipe_4rank_8mb.noreduce.csv",
        PlanRequest::new(Family::GPipe, 4, 8),
    );
}
