//! Our compute orders against the orders torch's own schedules produce (fixtures/torch).

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::to_torch_csv;

/// The non-empty cells of each row of a torch CSV.
fn cells(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|line| {
            line.split(',')
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .map(String::from)
                .collect()
        })
        .collect()
}

/// Our schedule, exported to torch's compute-only CSV, has the compute order of torch's own.
fn check(file: &str, request: PlanRequest) {
    let path = dualpipe_tests::fixtures().join("torch").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let theirs = cells(&text);
    let valid = plan(&request).unwrap();
    let ours = cells(&to_torch_csv(&valid, false).unwrap());
    assert_eq!(theirs.len(), ours.len(), "{file}: rank count");
    for (rank, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
        for (k, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert_eq!(a, b, "{file}: rank {rank}, compute {k}");
        }
        assert_eq!(
            ours.len(),
            theirs.len(),
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
