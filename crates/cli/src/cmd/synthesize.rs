//! `dualpipe synthesize`: search compute orders for the given costs and memory cap, starting
//! from the planned families; print the result beside the families, write the schedule.

use std::fmt::Write as _;
use std::path::PathBuf;

use dualpipe_planner::Family;
use dualpipe_schedule::Costs;
use dualpipe_tune::synth::{Baseline, MemoryCap, SynthCosts, SynthError, SynthRequest, synthesize};
use serde::Serialize;

use crate::io::{Failure, check_output, read_input, source_name, write_output, write_stdout};
use crate::options::time;

/// Synthesise a schedule for your costs: search each rank's compute order, the FB pairs, the
/// deferred W and the placement (V, loop, one stage per rank) from the planned families,
/// within an activation-memory cap; lowered, validated, simulated under both models.
#[derive(clap::Args)]
#[command(after_help = "\
Costs: --model-cost gives whole-model costs per micro-batch (as compare --model-cost), divided
over the stages of each layout; comm is the latency of every message. --costs FILE takes a
cost file (docs/costs.md), made per stage for each layout as tune does. Memory is activation
memory in N-ths of the model's activations per micro-batch (1F1B holds N on its first rank);
--memory-like FAMILY caps it at that family's peak. The search is deterministic for a seed and
--evaluations; --seconds only cuts it short. The objective is max(blocking, async). See
docs/synthesis.md.

Examples:
  dualpipe synthesize --ranks 8 --microbatches 32 --model-cost f=8,b=16,w=8,fb=19.2,comm=0.1 --memory-like dualpipev -o s.json
  dualpipe synthesize -n 4 -c 16 --costs costs.json --memory-cap 4 --seconds 30 --json")]
pub struct Args {
    /// Number of ranks N.
    #[arg(long, short = 'n')]
    ranks: u32,
    /// Micro-batches per step C.
    #[arg(long, short = 'c')]
    microbatches: u32,
    /// Number of stages S, a multiple of N (default: every family's own layout, N or 2N
    /// stages).
    #[arg(long)]
    stages: Option<u32>,
    /// Whole-model costs for one micro-batch as name=value pairs (f, b, w, fb, comm, bytes,
    /// bandwidth), divided over each layout's stages. Default: f=N,b=2N,w=N,fb=f+b,comm=0.
    #[arg(long, value_name = "LIST", conflicts_with = "costs")]
    model_cost: Option<String>,
    /// JSON cost file (docs/costs.md), made per stage for each layout as tune does.
    #[arg(long, value_name = "FILE")]
    costs: Option<PathBuf>,
    /// Most activation memory on any rank, in N-ths of the model's activations per
    /// micro-batch.
    #[arg(long, value_name = "X", conflicts_with = "memory_like")]
    memory_cap: Option<f64>,
    /// Cap activation memory at this family's peak under the same costs.
    #[arg(long, value_name = "FAMILY", value_parser = parse_family)]
    memory_like: Option<Family>,
    /// Parameter copies per rank, in N-ths of the model: 1, or 2 (lets dualpipe start).
    #[arg(long, default_value_t = 1)]
    copies: u32,
    /// Start only from this family (default: every family with S stages that fits).
    #[arg(long, value_name = "FAMILY", value_parser = parse_family)]
    start: Option<Family>,
    /// Schedules evaluated by the search (lowered, validated, simulated).
    #[arg(long, value_name = "K", default_value_t = 4000)]
    evaluations: u64,
    /// Wall-time cap in seconds (cuts the search short; the result is then not reproducible).
    #[arg(long, value_name = "T")]
    seconds: Option<f64>,
    /// Seed of the search.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write the schedule (format v1) to this file; `-` for standard output (the report then
    /// goes to standard error).
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
}

fn parse_family(name: &str) -> Result<Family, String> {
    name.parse()
        .map_err(|e: dualpipe_planner::PlanError| e.to_string())
}

#[derive(Serialize)]
struct Row {
    name: String,
    stages: u32,
    blocking: f64,
    #[serde(rename = "async")]
    async_step: f64,
    peak_memory: f64,
    copies: f64,
}

impl Row {
    fn of(b: &Baseline) -> Row {
        Row {
            name: b.family.to_string(),
            stages: b.stages,
            blocking: b.blocking,
            async_step: b.async_step,
            peak_memory: b.peak_memory,
            copies: b.copies,
        }
    }
}

#[derive(Serialize)]
struct Report {
    ranks: u32,
    microbatches: u32,
    /// Time unit of every time (`""`: abstract units).
    unit: String,
    memory_cap: Option<f64>,
    /// Parameter copies a rank may hold, in N-ths of the model (`--copies`).
    copies: u32,
    seed: u64,
    evaluations: u64,
    cut_short: bool,
    start: String,
    result: Row,
    /// Gain against the start point, by max(blocking, async), as a share.
    gain_over_start: f64,
    baselines: Vec<Row>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    check_output(args.output.as_deref(), args.force)?;
    if let Some(t) = args.seconds
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(Failure::usage(format!(
            "--seconds {t}: give a number of seconds, not negative"
        )));
    }
    if let Some(x) = args.memory_cap
        && !(x.is_finite() && x > 0.0)
    {
        return Err(Failure::usage(format!(
            "--memory-cap {x}: give a positive number of N-ths of the model's activations per micro-batch"
        )));
    }
    if !(1..=2).contains(&args.copies) {
        return Err(Failure::usage(format!(
            "--copies {}: a rank holds 1 or 2 copies of its share of the parameters",
            args.copies
        )));
    }
    let (costs, source) = match &args.costs {
        Some(path) => {
            let name = path.display().to_string();
            let text = read_input(&name)?;
            let name = source_name(&name).to_string();
            let file =
                Costs::from_json(&text).map_err(|e| Failure::usage(format!("{name}: {e}")))?;
            (SynthCosts::File(file), name)
        }
        None => {
            let mut model = Costs::default().scale_compute(f64::from(args.ranks.max(1)));
            if let Some(list) = &args.model_cost {
                model
                    .apply_assignments(list)
                    .map_err(|e| Failure::usage(format!("--model-cost: {e}")))?;
            }
            (SynthCosts::Model(model), "--model-cost".to_string())
        }
    };
    let request = SynthRequest {
        ranks: args.ranks,
        microbatches: args.microbatches,
        stages: args.stages,
        memory: match (args.memory_cap, args.memory_like) {
            (Some(x), _) => MemoryCap::Share(x),
            (None, Some(f)) => MemoryCap::Like(f),
            (None, None) => MemoryCap::None,
        },
        copies: args.copies,
        start: args.start,
        seed: args.seed,
        evaluations: args.evaluations,
        seconds: args.seconds,
    };
    let result = synthesize(&request, &costs).map_err(|e| match e {
        SynthError::Internal(why) => {
            Failure::invalid(format!("internal error, please report it: {why}"))
        }
        SynthError::Costs(why) => Failure::usage(format!("{source}: {why}")),
        SynthError::Request(why) | SynthError::Cap(why) => Failure::usage(flagged(&why)),
    })?;
    let unit = match &costs {
        SynthCosts::Model(c) | SynthCosts::File(c) => c.unit.clone(),
    };
    let report = Report {
        ranks: args.ranks,
        microbatches: args.microbatches,
        unit: unit.clone(),
        memory_cap: result.memory_cap,
        copies: args.copies,
        seed: args.seed,
        evaluations: result.evaluations,
        cut_short: result.cut_short,
        start: result.start.to_string(),
        result: Row {
            name: dualpipe_tune::synth::LABEL.into(),
            stages: result.schedule.topology().num_stages(),
            blocking: result.blocking,
            async_step: result.async_step,
            peak_memory: result.peak_memory,
            copies: result.copies,
        },
        gain_over_start: 1.0 - result.objective() / result.start_objective(),
        baselines: result.baselines.iter().map(Row::of).collect(),
    };
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&report).expect("report serializes");
        text.push('\n');
        text
    } else {
        table(&report, &source)
    };
    let to_stdout = args.output.as_deref().is_some_and(|p| p.as_os_str() == "-");
    if to_stdout {
        eprint!("{text}");
    } else {
        write_stdout(&text)?;
    }
    if let Some(output) = &args.output {
        write_output(
            Some(output),
            &result.schedule.schedule().to_json(),
            args.force,
        )?;
    }
    Ok(())
}

/// The library's messages name the parameter (`microbatches: 0`); on the command line that is
/// the flag (`--microbatches 0`).
fn flagged(why: &str) -> String {
    for (name, flag) in [
        ("ranks: ", "--ranks "),
        ("microbatches: ", "--microbatches "),
        ("stages: ", "--stages "),
        ("copies: ", "--copies "),
        ("start: ", "--start "),
        ("memory cap: ", "--memory-cap "),
        ("memory like ", "--memory-like "),
        ("seconds: ", "--seconds "),
    ] {
        if let Some(rest) = why.strip_prefix(name) {
            return format!("{flag}{rest}");
        }
    }
    if why.starts_with("no family gives") {
        return format!("--microbatches/--stages: {why}");
    }
    if why.starts_with("memory cap ") {
        return format!("--memory-cap/--memory-like: {why}");
    }
    why.to_string()
}

fn table(report: &Report, source: &str) -> String {
    let mut out = String::new();
    let unit = if report.unit.is_empty() {
        "abstract units"
    } else {
        &report.unit
    };
    let _ = writeln!(
        out,
        "{} ranks, {} micro-batches; costs from {source}; times in {unit}; memory in N-ths of the model's activations per micro-batch{}\n",
        report.ranks,
        report.microbatches,
        report
            .memory_cap
            .map(|c| format!("; cap {}", time(c)))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "{:<17} {:>6} {:>10} {:>10} {:>10} {:>7}",
        "schedule", "stages", "blocking", "async", "memory", "copies"
    );
    let line = |r: &Row, mark: &str| {
        format!(
            "{:<17} {:>6} {:>10} {:>10} {:>10} {:>7}{mark}",
            r.name,
            r.stages,
            time(r.blocking),
            time(r.async_step),
            time(r.peak_memory),
            time(r.copies)
        )
    };
    let _ = writeln!(out, "{}", line(&report.result, ""));
    // Over the activation cap, or holding more parameter copies than --copies allows.
    let over_cap = |b: &Row| {
        report
            .memory_cap
            .is_some_and(|cap| b.peak_memory > cap + 1e-9)
    };
    let more_copies = |b: &Row| b.copies > f64::from(report.copies) + 1e-9;
    for b in &report.baselines {
        let mark = match (over_cap(b), more_copies(b)) {
            (true, true) => "  (over the cap; more copies)",
            (true, false) => "  (over the cap)",
            (false, true) => "  (more copies)",
            (false, false) => "",
        };
        let _ = writeln!(out, "{}", line(b, mark));
    }
    let best_other = report
        .baselines
        .iter()
        .filter(|b| !over_cap(b) && !more_copies(b))
        .min_by(|a, b| {
            a.blocking
                .max(a.async_step)
                .total_cmp(&b.blocking.max(b.async_step))
        });
    let _ = writeln!(
        out,
        "\nstarted from {}; {} evaluations (seed {}){}; {} {:.1}% shorter than the start by max(blocking, async){}",
        report.start,
        report.evaluations,
        report.seed,
        if report.cut_short {
            ", cut short by --seconds"
        } else {
            ""
        },
        dualpipe_tune::synth::LABEL,
        100.0 * report.gain_over_start,
        best_other
            .map(|b| format!(
                ", {:.1}% against the best family within the cap ({})",
                100.0
                    * (1.0
                        - report.result.blocking.max(report.result.async_step)
                            / b.blocking.max(b.async_step)),
                b.name
            ))
            .unwrap_or_default()
    );
    out
}
