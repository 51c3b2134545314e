//! `dualpipe inspect`: per-rank counts and the compute order of a schedule.

use std::fmt::Write as _;

use dualpipe_schedule::{ValidSchedule, order_grid, rank_stats};

use crate::io::{Failure, load_schedule, source_name, write_stdout};

/// Show a schedule: per-rank F/B/W/FB counts, sends, receives, commits and peak in-flight
/// activations, then the compute order as a grid (one column per unit-time round).
#[derive(clap::Args)]
#[command(after_help = "\
Grid cells: F forward, B backward, I input-only backward (weights deferred), W weight gradient,
then the micro-batch; F3+B7 is an overlapped pair. Upper case is the first stage a rank holds,
lower case the second (the reverse direction of DualPipe, the way back up DualPipeV's V).

Examples:
  dualpipe inspect schedules/dualpipev-4x10.json
  dualpipe plan -s dualpipe -n 8 -c 20 | dualpipe inspect -")]
pub struct Args {
    /// Schedule file, or - for standard input.
    file: String,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let schedule = load_schedule(&args.file)?;
    let name = source_name(&args.file);
    let valid =
        ValidSchedule::new(schedule).map_err(|errors| Failure::violations(name, &errors))?;
    let schedule = valid.schedule();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} schedule, {} ranks, {} stages, {} micro-batches, {}",
        name,
        schedule.schedule,
        schedule.num_ranks,
        schedule.num_stages,
        schedule.num_microbatches,
        if schedule.forward_only {
            "forward only"
        } else {
            "training"
        }
    );
    for (p, pipeline) in schedule.pipelines.iter().enumerate() {
        let _ = writeln!(
            out,
            "pipeline {p}: route {:?}, {} micro-batches",
            pipeline.route,
            pipeline.microbatches.len()
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "rank     F     B    FB     I     W  send  recv commit  peak act  peak W"
    );
    for (rank, s) in rank_stats(schedule).iter().enumerate() {
        let _ = writeln!(
            out,
            "{rank:>4} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>9} {:>7}",
            s.forwards,
            s.backwards,
            s.overlapped,
            s.deferred,
            s.weights,
            s.sends,
            s.recvs,
            s.commits,
            s.peak_activations,
            s.peak_pending_w
        );
    }
    out.push('\n');
    let grid = order_grid(schedule, valid.topology())
        .map_err(|e| Failure::invalid(format!("{name}: {e}")))?;
    out.push_str(&grid);
    write_stdout(&out)
}
