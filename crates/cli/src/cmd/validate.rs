//! `dualpipe validate`: check a schedule against every rule of format v1.

use dualpipe_schedule::validate;

use crate::io::{Failure, load_schedule, source_name, write_stdout};

/// Check a schedule: completeness, data dependencies, communication matching, and progress
/// under the blocking and the asynchronous execution models. Exit code 1 if invalid.
#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  dualpipe validate schedules/dualpipe-8x20.json
  dualpipe plan -s 1f1b -n 4 -c 8 | dualpipe validate -")]
pub struct Args {
    /// Schedule file, or - for standard input.
    file: String,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let schedule = load_schedule(&args.file)?;
    let name = source_name(&args.file);
    validate(&schedule).map_err(|errors| Failure::violations(name, &errors))?;
    let instructions: usize = schedule.ranks.iter().map(Vec::len).sum();
    write_stdout(&format!(
        "{name}: valid {} schedule: {} ranks, {} stages, {} micro-batches, {instructions} instructions; runs under the blocking and the async model\n",
        schedule.schedule, schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    ))
}
