//! The planner against schedules produced by the reference implementation.

use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{Schedule, validate};

fn golden(name: &str) -> String {
    let path = dualpipe_tests::fixtures().join("golden").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn first_difference(ours: &Schedule, reference: &Schedule) -> Option<String> {
    for (rank, (a, b)) in ours.ranks.iter().zip(&reference.ranks).enumerate() {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x != y {
                return Some(format!(
                    "rank {rank} instruction {i}: ours `{x}`, reference `{y}`"
                ));
            }
        }
        if a.len() != b.len() {
            return Some(format!(
                "rank {rank}: ours has {} instructions, reference {}",
                a.len(),
                b.len()
            ));
        }
    }
    None
}

fn check(family: Family, n: u32, c: u32, file: &str) {
    let text = golden(file);
    let reference = Schedule::from_json(&text).unwrap();
    validate(&reference).unwrap();
    let ours = plan(&PlanRequest::new(family, n, c)).unwrap().into_inner();
    if let Some(diff) = first_difference(&ours, &reference) {
        panic!("{file}: {diff}");
    }
    assert_eq!(ours, reference);
    assert_eq!(
        ours.to_json(),
        text,
        "{file}: same schedule, different layout"
    );
}

#[test]
fn dualpipe_8x20_matches_reference() {
    check(Family::DualPipe, 8, 20, "dualpipe-8x20.json");
}

#[test]
fn dualpipev_4x10_matches_reference() {
    check(Family::DualPipeV, 4, 10, "dualpipev-4x10.json");
}
