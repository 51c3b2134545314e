//! `dualpipe tune`: every family at every micro-batch size, ranked by simulated step time
//! within a memory cap; the best schedule written out.

use std::fmt::Write as _;
use std::path::PathBuf;

use dualpipe_planner::plan_for;
use dualpipe_schedule::{Costs, ValidSchedule};
use dualpipe_tune::{Candidate, TuneError, TuneRequest, tune};
use serde::Serialize;

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
    #[arg(long, short = 'v', default_value_t = 2)]
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

#[derive(Clone, Serialize)]
struct Row {
    family: String,
    microbatch_size: u32,
    microbatches: u32,
    stages: u32,
    basis: &'static str,
    step_time: f64,
    time_per_sample: f64,
    bubble_share: f64,
    peak_memory: f64,
    parameter_bytes: f64,
    activation_bytes: f64,
    peak_activations: u32,
    parameter_copies: f64,
}

impl Row {
    fn new(c: &Candidate) -> Row {
        Row {
            family: c.family().to_string(),
            microbatch_size: c.microbatch_size,
            microbatches: c.microbatches,
            stages: c.stages,
            basis: c.basis.name(),
            step_time: c.step_time,
            time_per_sample: c.time_per_sample,
            bubble_share: c.bubble_share,
            peak_memory: c.peak_memory,
            parameter_bytes: c.parameter_bytes,
            activation_bytes: c.peak_memory - c.parameter_bytes,
            peak_activations: c.peak_activations,
            parameter_copies: c.parameter_copies,
        }
    }
}

#[derive(Serialize)]
struct NotApplicable {
    family: String,
    microbatch_size: u32,
    microbatches: u32,
    reason: String,
}

#[derive(Serialize)]
struct Report {
    ranks: u32,
    global_batch: u32,
    model: String,
    /// Time unit of every time (`""`: abstract units).
    unit: String,
    /// The micro-batch size the costs were measured at.
    measured_microbatch_size: f64,
    memory_cap: Option<f64>,
    microbatch_sizes: Vec<u32>,
    skipped_sizes: Vec<u32>,
    best: Option<Row>,
    ranked: Vec<Row>,
    over_cap: Vec<Row>,
    not_applicable: Vec<NotApplicable>,
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
    // The synthesiser: one row per micro-batch size, the seconds shared equally.
    let mut synthesized: Vec<(Row, ValidSchedule)> = Vec::new();
    if let Some(seconds) = args.synthesize {
        let each = seconds / tuning.sizes.len().max(1) as f64;
        for &size in &tuning.sizes {
            if let Some(found) = synthesize_row(&request, &costs, size, each)? {
                synthesized.push(found);
            }
        }
    }
    let mut report = Report {
        ranks: args.ranks,
        global_batch: args.global_batch,
        model: dualpipe_schedule::ExecutionModel::from(args.model).to_string(),
        unit: costs.unit.clone(),
        measured_microbatch_size: costs.microbatch_size.unwrap_or(1.0),
        memory_cap: args.memory_cap,
        microbatch_sizes: tuning.sizes.clone(),
        skipped_sizes: tuning.skipped_sizes.clone(),
        best: tuning.best().map(Row::new),
        ranked: tuning.ranked.iter().map(Row::new).collect(),
        over_cap: tuning.over_cap.iter().map(Row::new).collect(),
        not_applicable: tuning
            .not_applicable
            .iter()
            .map(|n| NotApplicable {
                family: n.family.to_string(),
                microbatch_size: n.microbatch_size,
                microbatches: n.microbatches,
                reason: n.reason.clone(),
            })
            .collect(),
    };
    let mut schedules: Vec<(u32, ValidSchedule)> = Vec::new();
    for (row, valid) in synthesized {
        schedules.push((row.microbatch_size, valid));
        if args.memory_cap.is_some_and(|cap| row.peak_memory > cap) {
            let at = report
                .over_cap
                .partition_point(|r| r.peak_memory <= row.peak_memory);
            report.over_cap.insert(at, row);
        } else {
            let at = report.ranked.partition_point(|r| {
                (r.step_time, r.peak_memory) <= (row.step_time, row.peak_memory)
            });
            report.ranked.insert(at, row);
        }
    }
    report.best = report.ranked.first().cloned();
    // The synthesised schedule when it ranks first.
    let synthesized_best = report
        .best
        .as_ref()
        .filter(|b| b.family == dualpipe_tune::synth::LABEL)
        .and_then(|b| {
            schedules
                .iter()
                .find(|(size, _)| *size == b.microbatch_size)
                .map(|(_, v)| v.clone())
        });
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&report).expect("report serializes");
        text.push('\n');
        text
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
        let schedule = plan_for(&best.request, &best.costs)
            .map_err(|e| Failure::invalid(format!("internal error, please report it: {e}")))?;
        let valid = ValidSchedule::new(schedule).map_err(|e| {
            Failure::invalid(format!(
                "internal planner error, please report it: {} is invalid: {e}",
                best.family()
            ))
        })?;
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

/// The synthesiser at one micro-batch size, as a row of the table, with its schedule; `None`
/// when no start point fits the memory cap there.
fn synthesize_row(
    request: &TuneRequest,
    costs: &Costs,
    size: u32,
    seconds: f64,
) -> Result<Option<(Row, ValidSchedule)>, Failure> {
    use dualpipe_planner::{Family, PlanRequest, plan};
    use dualpipe_tune::synth::{LABEL, MemoryCap, SynthCosts, SynthError, SynthRequest};
    let internal = |e: &dyn std::fmt::Display| {
        Failure::invalid(format!("internal error, please report it: {e}"))
    };
    let scaled = costs
        .at_microbatch_size(f64::from(size))
        .map_err(|e| Failure::usage(e.to_string()))?;
    let n = request.ranks;
    let c = request.global_batch / size;
    // The cap in bytes as activation memory in N-ths of the model: what is left beside one
    // N-th of the parameters, over one N-th of the activations of a micro-batch.
    let layout = plan(&PlanRequest::new(Family::Zbv, n, c))
        .map_err(|e| internal(&e))
        .and_then(|s| ValidSchedule::new(s).map_err(|e| internal(&e)))?;
    let (per_stage, _) = dualpipe_tune::stage_costs(&scaled, &layout);
    let stages = layout.topology().num_stages();
    let params: f64 = (0..stages).map(|s| per_stage.stage(s).param_bytes).sum();
    let activations: f64 = (0..stages)
        .map(|s| per_stage.stage(s).activation_bytes)
        .sum();
    let memory = match request.memory_cap {
        Some(cap) if activations > 0.0 => {
            let share = (cap - params / f64::from(n)) / (activations / f64::from(n));
            if share <= 0.0 {
                return Ok(None);
            }
            MemoryCap::Share(share)
        }
        _ => MemoryCap::None,
    };
    let mut synth = SynthRequest::new(n, c);
    synth.memory = memory;
    synth.evaluations = 1_000_000;
    synth.seconds = Some(seconds);
    let scaled_for_basis = scaled.clone();
    let result = match dualpipe_tune::synth::synthesize(&synth, &SynthCosts::File(scaled)) {
        Ok(result) => result,
        Err(SynthError::Internal(why)) => return Err(internal(&why)),
        Err(_) => return Ok(None),
    };
    let valid = result.schedule;
    let sim = dualpipe_schedule::simulate(&valid, &result.costs, request.model)
        .map_err(|e| internal(&e))?;
    let topology = valid.topology();
    let (mut peak_memory, mut parameter_bytes, mut peak_activations) = (0.0f64, 0.0, 0);
    for (rank, summary) in sim.ranks.iter().enumerate() {
        let held: Vec<_> = topology
            .stages_on(rank as u32)
            .into_iter()
            .map(|s| result.costs.stage(s))
            .collect();
        let p: f64 = held.iter().map(|c| c.param_bytes).sum();
        let largest = held.iter().map(|c| c.activation_bytes).fold(0.0, f64::max);
        let m = p + f64::from(summary.peak_activations) * largest;
        if m > peak_memory || rank == 0 {
            peak_memory = m;
            parameter_bytes = p;
        }
        peak_activations = peak_activations.max(summary.peak_activations);
    }
    let row = Row {
        family: LABEL.to_string(),
        microbatch_size: size,
        microbatches: c,
        stages: topology.num_stages(),
        basis: dualpipe_tune::stage_costs(&scaled_for_basis, &valid)
            .1
            .name(),
        step_time: sim.makespan,
        time_per_sample: sim.makespan / f64::from(request.global_batch),
        bubble_share: sim.bubble_share(),
        peak_memory,
        parameter_bytes,
        activation_bytes: peak_memory - parameter_bytes,
        peak_activations,
        parameter_copies: result.copies,
    };
    Ok(Some((row, valid)))
}
