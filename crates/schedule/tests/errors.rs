//! What the validator says about broken schedules: one small document per rule, written in the
//! compact instruction form, and the full error text as a snapshot (tests/snapshots/).

use dualpipe_schedule::{Format, Pipeline, Schedule, parse_program, validate};

/// A schedule with the given routes (`(route, micro-batches)` per pipeline) and rank programs.
fn doc(pipelines: &[(&[u32], &[u32])], forward_only: bool, ranks: &[&str]) -> Schedule {
    let num_stages = pipelines[0].0.len() as u32;
    let num_microbatches = pipelines.iter().map(|p| p.1.len() as u32).sum();
    Schedule {
        format: Format::V1,
        schedule: "test".into(),
        num_ranks: ranks.len() as u32,
        num_stages,
        num_microbatches,
        forward_only,
        pipelines: pipelines
            .iter()
            .map(|(route, mbs)| Pipeline {
                route: route.to_vec(),
                microbatches: mbs.to_vec(),
            })
            .collect(),
        ranks: ranks.iter().map(|r| parse_program(r).unwrap()).collect(),
    }
}

/// Two ranks, two stages, one micro-batch, training.
fn pair(rank0: &str, rank1: &str) -> Schedule {
    doc(&[(&[0, 1], &[0])], false, &[rank0, rank1])
}

const GOOD0: &str =
    "F s0 m0 | send act s0 m0 -> r1 | commit | recv grad s0 m0 <- r1 | commit | B s0 m0";
const GOOD1: &str =
    "recv act s1 m0 <- r0 | commit | F s1 m0 | B s1 m0 | send grad s1 m0 -> r0 | commit";

fn errors(schedule: &Schedule) -> String {
    match validate(schedule) {
        Ok(_) => "valid".into(),
        Err(errors) => errors.to_string(),
    }
}

#[test]
fn a_correct_pair_is_valid() {
    assert_eq!(errors(&pair(GOOD0, GOOD1)), "valid");
}

#[test]
fn missing_forward() {
    let rank1 = "recv act s1 m0 <- r0 | commit | B s1 m0 | send grad s1 m0 -> r0 | commit";
    insta::assert_snapshot!(errors(&pair(GOOD0, rank1)));
}

#[test]
fn duplicate_forward() {
    let rank0 = "F s0 m0 | F s0 m0 | send act s0 m0 -> r1 | commit | recv grad s0 m0 <- r1 | commit | B s0 m0";
    insta::assert_snapshot!(errors(&pair(rank0, GOOD1)));
}

#[test]
fn forward_on_the_wrong_rank() {
    let rank0 = "F s0 m0 | F s1 m0 | send act s0 m0 -> r1 | commit | recv grad s0 m0 <- r1 | commit | B s0 m0";
    insta::assert_snapshot!(errors(&pair(rank0, GOOD1)));
}

#[test]
fn backward_before_forward() {
    let rank1 =
        "recv act s1 m0 <- r0 | commit | B s1 m0 | F s1 m0 | send grad s1 m0 -> r0 | commit";
    insta::assert_snapshot!(errors(&pair(GOOD0, rank1)));
}

#[test]
fn receive_not_committed_before_its_use() {
    let rank1 =
        "recv act s1 m0 <- r0 | F s1 m0 | commit | B s1 m0 | send grad s1 m0 -> r0 | commit";
    insta::assert_snapshot!(errors(&pair(GOOD0, rank1)));
}

#[test]
fn send_before_the_data_exists() {
    let rank0 =
        "send act s0 m0 -> r1 | F s0 m0 | commit | recv grad s0 m0 <- r1 | commit | B s0 m0";
    insta::assert_snapshot!(errors(&pair(rank0, GOOD1)));
}

#[test]
fn wrong_peer() {
    let schedule = doc(
        &[(&[0, 1, 2], &[0])],
        true,
        &[
            "F s0 m0 | send act s0 m0 -> r2 | commit",
            "recv act s1 m0 <- r0 | commit | F s1 m0 | send act s1 m0 -> r2 | commit",
            "recv act s2 m0 <- r1 | commit | F s2 m0",
        ],
    );
    insta::assert_snapshot!(errors(&schedule));
}

#[test]
fn a_hand_off_needs_no_message() {
    let schedule = doc(
        &[(&[0, 0], &[0])],
        true,
        &["F s0 m0 | send act s0 m0 -> r0 | recv act s1 m0 <- r0 | commit | F s1 m0"],
    );
    insta::assert_snapshot!(errors(&schedule));
}

#[test]
fn channel_order_differs_between_the_two_sides() {
    let schedule = doc(
        &[(&[0, 1], &[0, 1])],
        true,
        &[
            "F s0 m0 | F s0 m1 | send act s0 m0 -> r1 | send act s0 m1 -> r1 | commit",
            "recv act s1 m1 <- r0 | recv act s1 m0 <- r0 | commit | F s1 m0 | F s1 m1",
        ],
    );
    insta::assert_snapshot!(errors(&schedule));
}

#[test]
fn deferred_weight_gradient_never_computed() {
    let rank1 = "recv act s1 m0 <- r0 | commit | F s1 m0 | B s1 m0 defer_w | send grad s1 m0 -> r0 | commit";
    insta::assert_snapshot!(errors(&pair(GOOD0, rank1)));
}

#[test]
fn weight_gradient_without_deferred_backward() {
    let rank1 = "recv act s1 m0 <- r0 | commit | F s1 m0 | W s1 m0 | B s1 m0 | W s1 m0 | send grad s1 m0 -> r0 | commit";
    insta::assert_snapshot!(errors(&pair(GOOD0, rank1)));
}

#[test]
fn sends_never_committed() {
    let rank1 = "recv act s1 m0 <- r0 | commit | F s1 m0 | B s1 m0 | send grad s1 m0 -> r0";
    insta::assert_snapshot!(errors(&pair(GOOD0, rank1)));
}

#[test]
fn stall_when_both_ranks_send_first() {
    // Two directions over two ranks (like DualPipe): each rank posts its send alone and waits
    // for the other to receive, which the other does only in its next batch.
    let schedule = doc(
        &[(&[0, 1], &[0]), (&[1, 0], &[1])],
        true,
        &[
            "F s0 m0 | send act s0 m0 -> r1 | commit | recv act s1 m1 <- r1 | commit | F s1 m1",
            "F s0 m1 | send act s0 m1 -> r0 | commit | recv act s1 m0 <- r0 | commit | F s1 m0",
        ],
    );
    insta::assert_snapshot!(errors(&schedule));
}

#[test]
fn batching_the_same_ops_removes_the_stall() {
    let schedule = doc(
        &[(&[0, 1], &[0]), (&[1, 0], &[1])],
        true,
        &[
            "F s0 m0 | send act s0 m0 -> r1 | recv act s1 m1 <- r1 | commit | F s1 m1",
            "F s0 m1 | send act s0 m1 -> r0 | recv act s1 m0 <- r0 | commit | F s1 m0",
        ],
    );
    assert_eq!(errors(&schedule), "valid");
}

#[test]
fn out_of_range_ids() {
    let rank0 = "F s0 m0 | F s5 m0 | send act s0 m9 -> r1 | send act s0 m0 -> r7 | commit";
    let schedule = doc(
        &[(&[0, 1], &[0])],
        true,
        &[rank0, "recv act s1 m0 <- r0 | commit | F s1 m0"],
    );
    insta::assert_snapshot!(errors(&schedule));
}

#[test]
fn backward_in_a_forward_only_schedule() {
    let schedule = doc(&[(&[0, 1], &[0])], true, &[GOOD0, GOOD1]);
    insta::assert_snapshot!(errors(&schedule));
}

#[test]
fn overlapped_pair_of_one_micro_batch() {
    let schedule = doc(
        &[(&[0], &[0, 1])],
        false,
        &["F s0 m0 | FB F s0 m1 + B s0 m1 | B s0 m0"],
    );
    insta::assert_snapshot!(errors(&schedule));
}

#[test]
fn inconsistent_header() {
    let mut schedule = pair(GOOD0, GOOD1);
    schedule.num_ranks = 3;
    schedule.pipelines.push(Pipeline {
        route: vec![0],
        microbatches: vec![0, 4],
    });
    insta::assert_snapshot!(errors(&schedule));
}
