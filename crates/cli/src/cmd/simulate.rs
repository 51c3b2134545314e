//! `dualpipe simulate`: step time, idle time and memory peaks of a schedule under a cost model.

use std::fmt::Write as _;

use crate::io::{Failure, source_name, write_stdout};
use crate::options::{CostOptions, costs_header, simulate_file, time, unit_suffix};
use dualpipe_schedule::{Costs, Simulation, ValidSchedule};

/// Simulate one step of a schedule: per rank busy and idle time, peak live activations and
/// peak pending weight gradients, and the step time (makespan).
#[derive(clap::Args)]
#[command(after_help = "\
Idle is the step time minus the rank's compute time: the pipeline bubble. An activation is live
from the start of its forward to the end of its backward (or of its W when the backward defers
it). Costs are those of one stage for one micro-batch, in the cost file's unit (\"unit\": \"ms\")
or abstract units; every time printed is in that unit. See docs/costs.md for the cost file.

Examples:
  dualpipe simulate schedules/dualpipev-4x10.json
  dualpipe simulate v.json --cost f=1,b=2,w=1,fb=3,comm=0 --model async
  dualpipe simulate v.json --costs measured.json --json
  dualpipe plan -s dualpipe -n 8 -c 20 | dualpipe simulate - --timeline")]
pub struct Args {
    /// Schedule file, or - for standard input.
    file: String,
    #[command(flatten)]
    options: CostOptions,
    /// Print JSON: {"unit", "costs_per", "makespan", "bubble_share", "ranks": [{"rank", "busy",
    /// "idle", ...}], ...}.
    #[arg(long)]
    json: bool,
    /// Also list when every instruction starts and ends.
    #[arg(long)]
    timeline: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let (valid, costs, sim) = simulate_file(&args.file, &args.options)?;
    let name = source_name(&args.file);
    let text = if args.json {
        sim.to_json(&valid, &costs, args.timeline)
    } else {
        table(name, &valid, &costs, &sim, args.timeline)
    };
    write_stdout(&text)
}

fn table(
    name: &str,
    valid: &ValidSchedule,
    costs: &Costs,
    sim: &Simulation,
    timeline: bool,
) -> String {
    let schedule = valid.schedule();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{name}: {} schedule, {} ranks, {} stages, {} micro-batches; {} model; {}",
        schedule.schedule,
        schedule.num_ranks,
        schedule.num_stages,
        schedule.num_microbatches,
        sim.model,
        costs_header(costs)
    );
    let idle: f64 = sim.ranks.iter().map(|r| r.idle).sum();
    let _ = writeln!(
        out,
        "step time {}{}, bubble {:.1}% ({} of {} rank-time idle)\n",
        time(sim.makespan),
        unit_suffix(costs),
        100.0 * sim.bubble_share(),
        time(idle),
        time(sim.makespan * sim.ranks.len() as f64)
    );
    let _ = writeln!(
        out,
        "rank        busy        idle         end  peak act  peak W"
    );
    for (rank, r) in sim.ranks.iter().enumerate() {
        let _ = writeln!(
            out,
            "{rank:>4} {:>11} {:>11} {:>11} {:>9} {:>7}",
            time(r.busy),
            time(r.idle),
            time(r.end),
            r.peak_activations,
            r.peak_pending_w
        );
    }
    if timeline {
        for (rank, list) in schedule.ranks.iter().enumerate() {
            let _ = writeln!(out, "\nrank {rank}:");
            for (index, (instruction, t)) in list.iter().zip(&sim.times[rank]).enumerate() {
                let _ = writeln!(
                    out,
                    "{index:>6}  {:>9} {:>9}  {instruction}",
                    time(t.start),
                    time(t.end)
                );
            }
        }
    }
    out
}
