//! `dualpipe tune`: every family at every micro-batch size, ranked by simulated step time
//! within a memory cap; the best schedule written out.

use std::fmt::Write as _;
use std::path::PathBuf;

use dualpipe_planner::plan_for;
use dualpipe_schedule::Costs;
use dualpipe_tune::{Report, Row, TuneError, TuneRequest, tune};

use crate::io::{Failure, check_output, read_input, source_name, write_output, write_stdout};
use crate::options::{Model, time};

/// Find the fastest schedule for a global batch: every family at every micro-batch size that
/// divides it, simulated under measured costs scaled to that size, over the memory cap dropped.
#[derive(clap::Args)]
#[command(after_help = "\
The cost file is the one the profilers write (dualpipe run --costs-out, the torch runtime's
pipe.profile.costs(...)); it must say the micro-batch size it was measured at
(\"microbatch_size\": K, or \"per\": \"sample\"), or pass --measured-at K. Times, message
bytes and activation bytes scale linearly with the micro-batch size; parameter bytes do not.
Each row's basis says where its per-stage costs come from: stages (the file's per-stage
entries, when they describe the family's stage count), layers (the file's layers cut by the
partitioner), model (whole-model costs divided over the family's stages). See docs/tune.md.

Examples:
  dualpipe tune --ranks 4 --global-batch 64 --costs costs.json
  dualpipe tune -n 8 -g 256 --costs costs.json --memory-cap 80e9 -o best.json
  dualpipe tune -n 4 -g 64 --microbatch-sizes 1,2,4 --costs costs.json --json")]
pub struct Args {
    /// Number of ranks N.
    #[arg(long, short = 'n')]
    ranks: u32,
    /// Samples in one training step, G.
    #[arg(long, short = 'g')]
    global_batch: u32,
    /// Micro-batch sizes to try (comma-separated); default: every divisor of G.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    microbatch_sizes: Option<Vec<u32>>,
    /// JSON cost file (see docs/costs.md), as the profilers write it.
    #[arg(long, value_name = "FILE")]
    costs: PathBuf,
    /// The micro-batch size the costs were measured at, for a file that does not say.
    #[arg(long, value_name = "SAMPLES")]
    measured_at: Option<f64>,
    /// Most bytes one rank may hold: parameters plus live activations.
    #[arg(long, value_name = "BYTES")]
    memory_cap: Option<f64>,
    /// Also synthesise a schedule at every micro-batch size, searching this many seconds in
    /// all (shared equally by the sizes); it is ranked as the row `synthesized`.
    #[arg(long, value_name = "SECONDS")]
    synthesize: Option<f64>,
    /// Stages per rank for interleaved-1f1b.
    #[arg(long, short = 'v', default_value_t = dualpipe_planner::DEFAULT_CHUNKS_PER_RANK)]
    chunks_per_rank: u32,
    /// Execution model simulated.
    #[arg(long, value_enum, default_value_t = Model::Blocking)]
    model: Model,
    /// Print the whole ranking as JSON.
    #[arg(long)]
    json: bool,
    /// Write the best schedule (format v1) to this file.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    if let Some(t) = args.synthesize
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(Failure::usage(format!(
            "--synthesize {t}: give a number of seconds, not negative"
        )));
    }
    check_output(args.output.as_deref(), args.force)?;
    let name = args.costs.display().to_string();
    let text = read_input(&name)?;
    let name = source_name(&name).to_string();
    let mut costs = Costs::from_json(&text).map_err(|e| Failure::usage(format!("{name}: {e}")))?;
    if let Some(size) = args.measured_at {
        match costs.microbatch_size {
            Some(said) if said != size => {
                return Err(Failure::usage(format!(
                    "--measured-at {size}: {name} says its costs were measured at micro-batches of {said} samples"
                )));
            }
            _ => costs.microbatch_size = Some(size),
        }
    }
    let request = TuneRequest {
        ranks: args.ranks,
        global_batch: args.global_batch,
        microbatch_sizes: args.microbatch_sizes.clone(),
        memory_cap: args.memory_cap,
        chunks_per_rank: args.chunks_per_rank,
        model: args.model.into(),
    };
    let tuning = tune(&request, &costs).map_err(|e| match e {
        TuneError::Costs(why) => Failure::usage(format!(
            "{name}: {why}{}",
            if costs.microbatch_size.is_none() {
                ", or pass --measured-at SAMPLES"
            } else {
                ""
            }
        )),
        TuneError::Internal(why) => {
            Failure::invalid(format!("internal error, please report it: {why}"))
        }
        other => Failure::usage(other.to_string()),
    })?;
    let mut report = Report::new(&request, &costs, &tuning);
    // The synthesiser: one row per micro-batch size, the seconds shared equally.
    let synthesized_best = match args.synthesize {
        Some(seconds) => report
            .add_synthesized(&request, &costs, seconds)
            .map_err(|e| Failure::invalid(e.to_string()))?,
        None => None,
    };
    let text = if args.json {
        report.to_json()
    } else {
        table(&report, &name, &costs)
    };
    write_stdout(&text)?;
    if let (Some(output), Some(valid)) = (&args.output, &synthesized_best) {
        write_output(Some(output), &valid.schedule().to_json(), args.force)?;
        return Ok(());
    }
    let Some(best) = tuning.best() else {
        let least = &report.over_cap[0];
        return Err(Failure::usage(format!(
            "nothing fits the memory cap of {} bytes; the least any candidate needs is {:.0} bytes ({} at micro-batches of {})",
            args.memory_cap.unwrap_or(0.0),
            least.peak_memory,
            least.family,
            least.microbatch_size
        )));
    };
    if let Some(output) = &args.output {
        let valid = plan_for(&best.request, &best.costs)
            .map_err(|e| Failure::invalid(format!("internal error, please report it: {e}")))?;
        write_output(Some(output), &valid.schedule().to_json(), args.force)?;
    }
    Ok(())
}

fn bytes(value: f64) -> String {
    format!("{value:.0}")
}

fn table(report: &Report, name: &str, costs: &Costs) -> String {
    let mut out = String::new();
    let unit = costs.unit_label();
    let _ = writeln!(
        out,
        "{} ranks, global batch {}; {} model; costs from {name} in {unit}, measured at micro-batches of {} samples{}\n",
        report.ranks,
        report.global_batch,
        report.model,
        time(report.measured_microbatch_size),
        report
            .memory_cap
            .map(|cap| format!("; memory cap {} bytes per rank", bytes(cap)))
            .unwrap_or_default()
    );
    let header = format!(
        "{:>4} {:<17} {:>6} {:>5} {:>6} {:<6} {:>10} {:>10} {:>7} {:>14} {:>6}",
        "rank",
        "family",
        "mb",
        "C",
        "stages",
        "basis",
        "step time",
        "per sample",
        "bubble",
        "peak mem (B)",
        "copies"
    );
    let line = |rank: String, r: &Row| {
        format!(
            "{:>4} {:<17} {:>6} {:>5} {:>6} {:<6} {:>10} {:>10} {:>6.1}% {:>14} {:>6}",
            rank,
            r.family,
            r.microbatch_size,
            r.microbatches,
            r.stages,
            r.basis,
            time(r.step_time),
            time(r.time_per_sample),
            100.0 * r.bubble_share,
            bytes(r.peak_memory),
            time(r.parameter_copies)
        )
    };
    let _ = writeln!(out, "{header}");
    for (i, r) in report.ranked.iter().enumerate() {
        let _ = writeln!(out, "{}", line((i + 1).to_string(), r));
    }
    out.push_str(
        "\nmb: samples per micro-batch; C: micro-batches per step; basis: where the per-stage \
         costs come from (stages, layers, model); per sample: step time / global batch; peak \
         mem: parameters plus live activations on the fullest rank; copies: parameters held \
         per rank, in N-ths of the model.\n",
    );
    if !report.over_cap.is_empty() {
        let _ = writeln!(out, "\nover the memory cap, least memory first:");
        for r in &report.over_cap {
            let _ = writeln!(
                out,
                "  {} at micro-batches of {} (C = {}): {} bytes = {} parameters + {} activations ({} live) > {} bytes",
                r.family,
                r.microbatch_size,
                r.microbatches,
                bytes(r.peak_memory),
                bytes(r.parameter_bytes),
                bytes(r.activation_bytes),
                r.peak_activations,
                bytes(report.memory_cap.unwrap_or(0.0))
            );
        }
    }
    // One line per family: the micro-batch counts it does not accept.
    let mut families: Vec<&str> = Vec::new();
    for n in &report.not_applicable {
        if !families.contains(&n.family.as_str()) {
            families.push(&n.family);
        }
    }
    for family in families {
        let counts: Vec<String> = report
            .not_applicable
            .iter()
            .filter(|n| n.family == family)
            .map(|n| n.microbatches.to_string())
            .collect();
        let family = dualpipe_planner::Family::ALL
            .into_iter()
            .find(|f| f.name() == family)
            .expect("a known family");
        let _ = writeln!(
            out,
            "not applicable: {family} with C = {}: needs {}",
            counts.join(", "),
            family.constraint()
        );
    }
    if !report.skipped_sizes.is_empty() {
        let sizes: Vec<String> = report.skipped_sizes.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "skipped micro-batch sizes {}: they do not divide the global batch of {}",
            sizes.join(", "),
            report.global_batch
        );
    }
    if let Some(best) = &report.best {
        let _ = writeln!(
            out,
            "\nbest: {} with {} micro-batches of {} samples: step {} {unit} ({} per sample), peak {} bytes per rank",
            best.family,
            best.microbatches,
            best.microbatch_size,
            time(best.step_time),
            time(best.time_per_sample),
            bytes(best.peak_memory)
        );
    }
    out
}
