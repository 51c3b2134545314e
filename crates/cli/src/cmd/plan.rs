//! `dualpipe plan`: generate a schedule.

use std::path::PathBuf;

use dualpipe_planner::{Family, PlanError, PlanRequest, families_help, plan_for};

use crate::io::{Failure, check_output, write_output};
use crate::options::{CostOptions, Model};

/// Generate a schedule and write it as format-v1 JSON.
#[derive(clap::Args)]
#[command(after_help = format!("\
Examples:
  dualpipe plan --schedule dualpipe --ranks 8 --microbatches 20
  dualpipe plan --schedule dualpipev --ranks 4 --microbatches 10 -o dualpipev-4x10.json
  dualpipe plan --schedule interleaved-1f1b --ranks 4 --microbatches 8 --chunks-per-rank 2
  dualpipe plan --schedule zb1p --ranks 4 --microbatches 8 --forward-only
  dualpipe plan --schedule zbv --ranks 4 --microbatches 8 --cost f=1,b=1,w=0.5

{families}", families = families_help()))]
pub struct Args {
    /// Schedule family (the list below).
    #[arg(long, short = 's', value_parser = parse_family)]
    schedule: Family,
    /// Number of ranks (pipeline-parallel processes).
    #[arg(long, short = 'n')]
    ranks: u32,
    /// Number of micro-batches per step.
    #[arg(long, short = 'c')]
    microbatches: u32,
    #[arg(long, short = 'v', help = format!(
        "Stages per rank, for interleaved-1f1b (default {})",
        dualpipe_planner::DEFAULT_CHUNKS_PER_RANK
    ))]
    chunks_per_rank: Option<u32>,
    /// Place the messages for these uniform costs (name=value pairs as for `simulate`); the
    /// compute order does not change. dualpipe and dualpipev carry the reference's messages
    /// whatever the costs.
    #[arg(long, value_name = "LIST")]
    cost: Option<String>,
    /// Place the messages for the costs of this JSON cost file (see docs/simulate.md); --cost
    /// applies on top of it.
    #[arg(long, value_name = "FILE")]
    costs: Option<PathBuf>,
    /// Plan an inference step: forwards only.
    #[arg(long)]
    forward_only: bool,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
}

fn parse_family(name: &str) -> Result<Family, String> {
    name.parse()
        .map_err(|e: dualpipe_planner::PlanError| e.to_string())
}

pub fn run(args: Args) -> Result<(), Failure> {
    check_output(args.output.as_deref(), args.force)?;
    let mut request = PlanRequest::new(args.schedule, args.ranks, args.microbatches);
    request.forward_only = args.forward_only;
    request.chunks_per_rank = args.chunks_per_rank;
    let costs = CostOptions {
        cost: args.cost,
        costs: args.costs,
        model: Model::Blocking,
    }
    .costs()?;
    let valid = plan_for(&request, &costs).map_err(failure)?;
    write_output(
        args.output.as_deref(),
        &valid.schedule().to_json(),
        args.force,
    )
}

/// A planner error as the command's failure: a planned schedule that fails validation is a
/// planner bug (exit 1); everything else is a request the planner refuses (exit 2).
pub fn failure(error: PlanError) -> Failure {
    match error {
        PlanError::Invalid(_) => Failure::invalid(error.to_string()),
        _ => Failure::usage(error.to_string()),
    }
}
