//! `dualpipe partition`: cut a model's layers into the stages of a schedule.

use std::fmt::Write as _;

use dualpipe_partition::{Layers, Model, Options, Partition, partition_model};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::ValidSchedule;

use crate::io::{Failure, load_schedule, read_input, source_name, write_stdout};
use crate::options::time;

/// Cut a model's layers into contiguous stages that minimise the simulated step time of a
/// schedule, optionally under a per-rank memory cap.
#[derive(clap::Args)]
#[command(after_help = "\
The layers file lists every layer in model order with its costs (docs/partition.md):
  {\"unit\": \"ms\", \"layers\": [{\"name\": \"embed\", \"f\": 1.0, \"b\": 2.0, \"w\": 1.0,
                             \"param_bytes\": 4096, \"activation_bytes\": 1024}, ...]}
f, b, w: forward, full backward and its weight-gradient part for one micro-batch; param_bytes:
the layer's parameters; activation_bytes: what it keeps per micro-batch until its backward.

The cut first minimises the bottleneck (the most loaded rank, given where the schedule puts each
stage), exactly for every family but interleaved-1f1b, then the simulated step time by moving
single layers across boundaries. The memory cap counts, per rank, the parameters of its stages
plus each stage's activation bytes times its peak live count on that rank.

Examples:
  dualpipe partition --layers layers.json --schedule dualpipev --ranks 4 --microbatches 16
  dualpipe partition --layers layers.json v.json --memory-cap 8e9
  dualpipe partition --layers layers.json -s dualpipe -n 8 -c 20 --json")]
pub struct Args {
    /// Layers file (JSON), or - for standard input.
    #[arg(long)]
    layers: String,
    /// Schedule file to partition for, or - for standard input (instead of --schedule).
    #[arg(conflicts_with_all = ["schedule", "ranks", "microbatches", "chunks_per_rank"])]
    file: Option<String>,
    /// Schedule family to plan: dualpipe, dualpipev, 1f1b, gpipe, zb1p, zbv, interleaved-1f1b.
    #[arg(long, short = 's', value_parser = parse_family, requires_all = ["ranks", "microbatches"])]
    schedule: Option<Family>,
    /// Number of ranks, with --schedule.
    #[arg(long, short = 'n')]
    ranks: Option<u32>,
    /// Number of micro-batches, with --schedule.
    #[arg(long, short = 'c')]
    microbatches: Option<u32>,
    #[arg(long, short = 'v', help = format!(
        "Stages per rank, for interleaved-1f1b (default {})",
        dualpipe_planner::DEFAULT_CHUNKS_PER_RANK
    ))]
    chunks_per_rank: Option<u32>,
    /// Most bytes any rank may hold (parameters plus peak activations), e.g. 8e9.
    #[arg(long, value_name = "BYTES")]
    memory_cap: Option<f64>,
    /// Most simulations the refinement may run (0: keep the bottleneck optimum).
    #[arg(long, default_value_t = Options::default().max_evaluations)]
    max_evaluations: usize,
    /// Print JSON: {"objective", "ranges", "stages", "predicted_step", "bottleneck", ...}.
    #[arg(long)]
    json: bool,
}

fn parse_family(name: &str) -> Result<Family, String> {
    name.parse()
        .map_err(|e: dualpipe_planner::PlanError| e.to_string())
}

fn schedule(args: &Args) -> Result<ValidSchedule, Failure> {
    let schedule = match (&args.file, args.schedule) {
        (Some(file), _) => load_schedule(file)?,
        (None, Some(family)) => {
            let mut request = PlanRequest::new(
                family,
                args.ranks.unwrap_or_default(),
                args.microbatches.unwrap_or_default(),
            );
            request.chunks_per_rank = args.chunks_per_rank;
            return plan(&request).map_err(crate::cmd::plan::failure);
        }
        (None, None) => {
            return Err(Failure::usage(
                "give a schedule file, or --schedule NAME --ranks N --microbatches C",
            ));
        }
    };
    let name = args
        .file
        .as_deref()
        .map_or("the planned schedule", source_name);
    ValidSchedule::new(schedule).map_err(|errors| Failure::violations(name, &errors))
}

pub fn run(args: Args) -> Result<(), Failure> {
    if args.layers == "-" && args.file.as_deref() == Some("-") {
        return Err(Failure::usage(
            "the layers file and the schedule cannot both come from standard input",
        ));
    }
    let source = source_name(&args.layers);
    let layers = Layers::from_json(&read_input(&args.layers)?)
        .map_err(|e| Failure::usage(format!("{source}: {e}")))?;
    let valid = schedule(&args)?;
    let model = Model::new(&layers, &valid);
    let options = Options {
        memory_cap: args.memory_cap,
        max_evaluations: args.max_evaluations,
    };
    let result =
        partition_model(&model, &options).map_err(|e| Failure::usage(format!("{source}: {e}")))?;
    let text = if args.json {
        result.to_json(&model)
    } else {
        table(source, &valid, &layers, &result)
    };
    write_stdout(&text)
}

fn bytes(value: f64) -> String {
    if value >= 1e9 {
        format!("{:.2} GB", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.2} MB", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.2} kB", value / 1e3)
    } else {
        format!("{value} B")
    }
}

fn table(source: &str, valid: &ValidSchedule, layers: &Layers, result: &Partition) -> String {
    let schedule = valid.schedule();
    let unit = layers
        .unit
        .as_deref()
        .map(|u| format!(" {u}"))
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{source}: {} layers over {}, {} ranks, {} stages, {} micro-batches",
        layers.layers.len(),
        schedule.schedule,
        schedule.num_ranks,
        schedule.num_stages,
        schedule.num_microbatches
    );
    let gain = if result.equal_cut_step > 0.0 {
        format!(
            " ({:+.1}%)",
            100.0 * (result.predicted_step / result.equal_cut_step - 1.0)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "predicted step time {}{unit}{gain}; equal-layer cut {}{unit}; bottleneck optimum {}{unit}",
        time(result.predicted_step),
        time(result.equal_cut_step),
        time(result.bottleneck_step),
    );
    let _ = writeln!(
        out,
        "bottleneck {}{unit} (optimum {}{unit}, {}; equal-layer cut {}{unit}); objective: {}, {} simulations\n",
        time(result.bottleneck),
        time(result.bottleneck_optimum),
        if result.exact {
            "exact"
        } else {
            "local search"
        },
        time(result.equal_cut_bottleneck),
        result.objective,
        result.evaluations,
    );
    let _ = writeln!(
        out,
        "stage  layers        count          f          b          w       params   act/mb  ranks"
    );
    for (stage, (start, end)) in result.ranges().into_iter().enumerate() {
        let range = &layers.layers[start..end];
        let sum = |g: fn(&dualpipe_partition::Layer) -> f64| range.iter().map(g).sum::<f64>();
        let ranks: Vec<String> = (0..schedule.num_ranks)
            .filter(|&r| valid.topology().stages_on(r).contains(&(stage as u32)))
            .map(|r| r.to_string())
            .collect();
        let _ = writeln!(
            out,
            "{stage:>5}  {:<12} {:>5} {:>10} {:>10} {:>10} {:>12} {:>8}  {}",
            format!("{start}..{end}"),
            end - start,
            time(sum(|l| l.f)),
            time(sum(|l| l.b)),
            time(sum(|l| l.w)),
            bytes(sum(|l| l.param_bytes)),
            bytes(sum(|l| l.activation_bytes)),
            ranks.join(",")
        );
    }
    let _ = writeln!(out, "\nrank        load  peak memory");
    for (rank, (load, memory)) in result.rank_load.iter().zip(&result.peak_memory).enumerate() {
        let _ = writeln!(out, "{rank:>4} {:>11} {:>12}", time(*load), bytes(*memory));
    }
    out
}
