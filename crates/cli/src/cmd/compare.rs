//! `dualpipe compare`: every family that accepts (N ranks, C micro-batches), side by side.

use std::fmt::Write as _;

use dualpipe_planner::{Family, PlanRequest, check, plan_for};
use dualpipe_schedule::{Costs, rank_stats};
use serde::Serialize;

use crate::io::{Failure, write_stdout};
use crate::options::{self, CostOptions, time};

/// Compare the schedule families on the same ranks, micro-batches and model: simulated step
/// time, bubble share, peak activations, parameters held per rank and messages per step.
#[derive(clap::Args)]
#[command(after_help = "\
Costs come one of two ways:
  --model-cost LIST   whole-model costs for one micro-batch (the default). f, b, w and fb are
                      divided over each family's S stages, so every family does the same work;
                      comm (and bytes, bandwidth) stay per message. The default is
                      f=N,b=2N,w=N: one N-th of the model costs F=1, B=2, W=1 (the DualPipe
                      README's units for a stage of 1F1B or DualPipe); DualPipeV's 2N stages
                      then cost F=0.5 each.
  --cost, --costs     costs per stage, applied to every family as given, as in simulate. A cost
                      file with per-stage entries describes (highest stage + 1) stages; families
                      with another number of stages are skipped with a note.
Activation memory and parameters per rank are counted in N-ths of the model in both cases.

Examples:
  dualpipe compare --ranks 8 --microbatches 20
  dualpipe compare -n 4 -c 16 --model-cost f=4,b=8,w=4,fb=10,comm=0.1 --model async
  dualpipe compare -n 4 -c 8 --cost f=1,b=2,w=1
  dualpipe compare -n 8 -c 20 --costs measured.json
  dualpipe compare -n 4 -c 8 --json")]
pub struct Args {
    /// Number of ranks N.
    #[arg(long, short = 'n')]
    ranks: u32,
    /// Number of micro-batches C.
    #[arg(long, short = 'c')]
    microbatches: u32,
    /// Stages per rank for interleaved-1f1b.
    #[arg(long, short = 'v', default_value_t = dualpipe_planner::DEFAULT_CHUNKS_PER_RANK)]
    chunks_per_rank: u32,
    /// Whole-model costs for one micro-batch as name=value pairs (f, b, w, fb, comm, bytes,
    /// bandwidth as in --cost); f, b, w and fb are divided over each family's stages. Default:
    /// f=N,b=2N,w=N,fb=f+b,comm=0.
    #[arg(long, value_name = "LIST", conflicts_with_all = ["cost", "costs"])]
    model_cost: Option<String>,
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
    /// The costs of one of its stages, as simulated.
    stage_costs: String,
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
    /// Time unit of the costs and times (`""`: abstract units).
    unit: String,
    /// `"model"`: whole-model costs divided over each family's stages; `"stage"`: costs per
    /// stage, as given.
    costs_per: &'static str,
    families: Vec<Row>,
    not_applicable: Vec<Skipped>,
}

/// The costs of the comparison: whole-model, divided over each family's stages, or per stage.
enum Basis {
    Model(Costs),
    Stage(Costs),
}

impl Basis {
    fn new(args: &Args) -> Result<Basis, Failure> {
        if args.options.cost.is_some() || args.options.costs.is_some() {
            return Ok(Basis::Stage(args.options.costs()?));
        }
        // One N-th of the model at the README's units, unless told otherwise.
        let mut model = Costs::default().scale_compute(f64::from(args.ranks));
        if let Some(list) = &args.model_cost {
            model
                .apply_assignments(list)
                .map_err(|e| Failure::usage(format!("--model-cost: {e}")))?;
        }
        Ok(Basis::Model(model))
    }

    fn costs(&self) -> &Costs {
        match self {
            Basis::Model(costs) | Basis::Stage(costs) => costs,
        }
    }

    /// The costs of one stage of a family with `stages` stages, or why they do not fit it.
    fn for_stages(&self, stages: u32) -> Result<Costs, String> {
        match self {
            Basis::Model(model) => Ok(model.per_stage_of_model(stages)),
            Basis::Stage(costs) => match costs.described_stages() {
                Some(described) if described != stages => Err(format!(
                    "the per-stage costs describe {described} stages (entries up to stage {}), this family has {stages}",
                    described - 1
                )),
                _ => Ok(costs.clone()),
            },
        }
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    let (n, c) = (args.ranks, args.microbatches);
    let basis = Basis::new(&args)?;
    let model = args.options.model();
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut costs_skipped = false;
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
        let stages = request.num_stages();
        let costs = match basis.for_stages(stages) {
            Ok(costs) => costs,
            Err(reason) => {
                costs_skipped = true;
                skipped.push(Skipped {
                    family: family.to_string(),
                    reason,
                });
                continue;
            }
        };
        // Place the messages for the costs the families are compared under.
        let valid = plan_for(&request, &costs).map_err(crate::cmd::plan::failure)?;
        let per_stage = f64::from(n) / f64::from(stages);
        let sim = options::run(&valid, &costs, model, family.name())?;
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
            stage_costs: costs.to_string(),
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
        let what = if costs_skipped {
            "no schedule family fits the costs for"
        } else {
            "no schedule family accepts"
        };
        return Err(Failure::usage(format!(
            "{what} {n} ranks and {c} micro-batches:\n{}",
            reasons.join("\n")
        )));
    }
    let comparison = Comparison {
        ranks: n,
        microbatches: c,
        model: model.to_string(),
        costs: basis.costs().to_string(),
        unit: basis.costs().unit.clone(),
        costs_per: match basis {
            Basis::Model(_) => "model",
            Basis::Stage(_) => "stage",
        },
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
    let unit = if comparison.unit.is_empty() {
        "abstract units"
    } else {
        &comparison.unit
    };
    let costs = match comparison.costs_per {
        "model" => format!(
            "whole-model costs per micro-batch in {unit}: {} (f, b, w, fb divided over each family's stages; comm per message)",
            comparison.costs
        ),
        _ => format!(
            "costs per stage in {unit}: {} (every family as given)",
            comparison.costs
        ),
    };
    let _ = writeln!(
        out,
        "{} ranks, {} micro-batches; {} model; {costs}\n",
        comparison.ranks, comparison.microbatches, comparison.model
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
