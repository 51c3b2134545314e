//! Plans and validates DualPipeV (64, 512) a few times (for profiling).
fn main() {
    let schedule = dualpipe_planner::plan(&dualpipe_planner::PlanRequest::new(
        dualpipe_planner::Family::DualPipeV,
        64,
        512,
    ))
    .unwrap()
    .into_inner();
    let n: usize = schedule.ranks.iter().map(Vec::len).sum();
    let start = std::time::Instant::now();
    for _ in 0..5 {
        dualpipe_schedule::validate(&schedule).unwrap();
    }
    println!("{n} instructions, {:?} per validation", start.elapsed() / 5);
}
