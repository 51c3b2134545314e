//! `dualpipe compare`: every family that accepts (N ranks, C micro-batches), side by side.

use std::fmt::Write as _;

use dualpipe_planner::{Family, PlanRequest, check, plan};
use dualpipe_schedule::{ValidSchedule, rank_stats};
use serde::Serialize;

use crate::io::{Failure, write_stdout};
use crate::options::{self, CostOptions, time};

/// Compare the schedule families on the same ranks, micro-batches and model: simulated step
/// time, bubble share, peak activations, parameters held per rank and messages per step.
#[derive(clap::Args)]
#[command(after_help = "\
The costs (--cost, --costs) are those of one N-th of the model, i.e. one stage of 1F1B. A family
that cuts the model into S stages runs each of them at N/S of that (DualPipeV's 2N stages cost
half as much each), so every family does the same work. Activation memory and parameters per rank
are counted in the same unit: one N-th of the model. Per-stage overrides in a cost file name the
stages of one family and are refused here.

Examples:
  dualpipe compare --ranks 8 --microbatches 20
  dualpipe compare -n 4 -c 16 --cost f=1,b=2,w=1,fb=2.5,comm=0.1 --model async
  dualpipe compare -n 4 -c 8 --json")]
pub struct Args {
    /// Number of ranks N.
    #[arg(long, short = 'n')]
    ranks: u32,
    /// Number of micro-batches C.
    #[arg(long, short = 'c')]
    microbatches: u32,
    /// Stages per rank for interleaved-1f1b.
    #[arg(long, short = 'v', default_value_t = 2)]
    chunks_per_rank: u32,
    #[command(flatten)]
    options: CostOptions,
    /// Print JSON: one object per family that accepts (N, C), and the families that do not.
    #[arg(long)]
    json: bool,
}

/// One family's line.
#[derive(Serialize)]
struct Row {
    family: String,
    stages: u32,
    step_time: f64,
    bubble_share: f64,
    /// Most live activations on one rank, in the family's own stages.
    peak_activations: u32,
    /// The same in N-ths of the model.
    activation_memory: f64,
    /// Most distinct stages held by one rank.
    stages_per_rank: u32,
    /// Parameters held by the busiest rank, in N-ths of the model (2 for DualPipe's copies).
    parameters_per_rank: f64,
    /// Sends (= receives) in one step, all ranks together.
    messages: u64,
}

#[derive(Serialize)]
struct Skipped {
    family: String,
    reason: String,
}

#[derive(Serialize)]
struct Comparison {
    ranks: u32,
    microbatches: u32,
    model: String,
    costs: String,
    families: Vec<Row>,
    not_applicable: Vec<Skipped>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let (n, c) = (args.ranks, args.microbatches);
    let costs = args.options.costs()?;
    if !costs.stages.is_empty() {
        return Err(Failure::usage(
            "compare takes uniform costs only: per-stage overrides name the stages of one family",
        ));
    }
    let model = args.options.model();
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for family in Family::ALL {
        let mut request = PlanRequest::new(family, n, c);
        if family == Family::Interleaved1F1B {
            request = request.chunks_per_rank(args.chunks_per_rank);
        }
        if let Err(why) = check(&request) {
            skipped.push(Skipped {
                family: family.to_string(),
                reason: why.to_string(),
            });
            continue;
        }
        let schedule = plan(&request).map_err(|e| Failure::usage(e.to_string()))?;
        let valid = ValidSchedule::new(schedule).map_err(|e| {
            Failure::invalid(format!(
                "internal planner error, please report it: {family} is invalid: {e}"
            ))
        })?;
        let stages = valid.topology().num_stages();
        let per_stage = f64::from(n) / f64::from(stages);
        let sim = options::run(
            &valid,
            &costs.scale_compute(per_stage),
            model,
            family.name(),
        )?;
        let peak = sim
            .ranks
            .iter()
            .map(|r| r.peak_activations)
            .max()
            .unwrap_or(0);
        let held = valid
            .topology()
            .stages_per_rank()
            .into_iter()
            .max()
            .unwrap_or(0);
        rows.push(Row {
            family: family.to_string(),
            stages,
            step_time: sim.makespan,
            bubble_share: sim.bubble_share(),
            peak_activations: peak,
            activation_memory: f64::from(peak) * per_stage,
            stages_per_rank: held,
            parameters_per_rank: f64::from(held) * per_stage,
            messages: rank_stats(valid.schedule())
                .iter()
                .map(|s| u64::from(s.sends))
                .sum(),
        });
    }
    if rows.is_empty() {
        let reasons: Vec<String> = skipped
            .iter()
            .map(|s| format!("  {}: {}", s.family, s.reason))
            .collect();
        return Err(Failure::usage(format!(
            "no schedule family accepts {n} ranks and {c} micro-batches:\n{}",
            reasons.join("\n")
        )));
    }
    let comparison = Comparison {
        ranks: n,
        microbatches: c,
        model: model.to_string(),
        costs: costs.to_string(),
        families: rows,
        not_applicable: skipped,
    };
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&comparison).expect("rows serialize");
        text.push('\n');
        text
    } else {
        table(&comparison)
    };
    write_stdout(&text)
}

fn table(comparison: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ranks, {} micro-batches; {} model; costs {} per N-th of the model\n",
        comparison.ranks, comparison.microbatches, comparison.model, comparison.costs
    );
    let _ = writeln!(
        out,
        "{:<17} {:>6} {:>10} {:>7} {:>9} {:>9} {:>12} {:>11} {:>9}",
        "family",
        "stages",
        "step time",
        "bubble",
        "peak act",
        "act mem",
        "stages/rank",
        "params/rank",
        "messages"
    );
    for r in &comparison.families {
        let _ = writeln!(
            out,
            "{:<17} {:>6} {:>10} {:>6.1}% {:>9} {:>9} {:>12} {:>10}x {:>9}",
            r.family,
            r.stages,
            time(r.step_time),
            100.0 * r.bubble_share,
            r.peak_activations,
            time(r.activation_memory),
            r.stages_per_rank,
            time(r.parameters_per_rank),
            r.messages
        );
    }
    out.push_str(
        "\npeak act: most live activations on one rank, in the family's stages; act mem and \
         params/rank: the same and the parameters held, in N-ths of the model.\n",
    );
    for s in &comparison.not_applicable {
        let _ = writeln!(out, "not applicable: {}: {}", s.family, s.reason);
    }
    out
}
