//! `dualpipe run`: train the reference model under a schedule on CPU threads, checked step by
//! step against the same model run in one process.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dualpipe_executor::{Options, Profile};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_reference::conformance::{CAL_DIFF_LIMIT, Mismatch, compare};
use dualpipe_reference::model::{Batch, ModelSpec, Sequential};
use dualpipe_reference::{Backend, CpuBackend};
use dualpipe_schedule::{Costs, ExecutionModel, ValidSchedule, simulate};
use indicatif::{ProgressBar, ProgressStyle};

use crate::io::{Failure, check_output, load_schedule, source_name, write_output, write_stdout};

mod gpu;

/// Train the reference model (per stage Linear(h, 4h) -> GELU -> Linear(4h, h), mean squared
/// error at the last stage) on synthetic data under a schedule, one CPU thread per rank. Every
/// step is also run in a single process from the same parameters: the losses must be equal
/// bit for bit and the gradients within cal_diff 1e-13, or the run fails.
#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  dualpipe run --schedule dualpipev --ranks 4 --microbatches 10
  dualpipe run --schedule dualpipe --ranks 8 --microbatches 20 --steps 5 --trace trace.json
  dualpipe run schedules/dualpipev-4x10.json --hidden 256 --model async
  dualpipe plan -s zb1p -n 4 -c 8 | dualpipe run -
  dualpipe run -s dualpipe -n 4 -c 8 --costs-out measured.json
  dualpipe simulate schedules/dualpipe-4x8.json --costs measured.json
  dualpipe run -s dualpipev -n 4 -c 10 --device cuda
  torchrun --nproc-per-node 4 --no-python dualpipe run -s dualpipe -n 4 -c 8 --device cuda --launch

With --device cuda the ranks run on GPU --gpu as virtual ranks (one process, a stream set per
rank), or with --launch one process per GPU over NCCL, placed by RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT (the rendezvous listens on MASTER_PORT + 1, or on
DUALPIPE_RENDEZVOUS_PORT). The first step is set beside the CPU model; --trace and --costs-out
are for CPU runs.

The simulated bubble uses the last step's measured mean costs per stage (ms), with free messages.
--costs-out writes them as a cost file (docs/costs.md) that simulate --costs reads back.

Exit codes: 0 success, 1 invalid schedule or failed step, 2 usage error or no GPU.")]
pub struct Args {
    /// Schedule file, or - for standard input. Instead, plan one with --schedule, --ranks and
    /// --microbatches.
    file: Option<String>,
    /// Schedule family to plan: dualpipe, dualpipev, 1f1b, gpipe, zb1p, zbv, interleaved-1f1b.
    #[arg(long, short = 's', value_parser = parse_family)]
    schedule: Option<Family>,
    /// Number of ranks (one CPU thread each).
    #[arg(long, short = 'n')]
    ranks: Option<u32>,
    /// Number of micro-batches per step.
    #[arg(long, short = 'c')]
    microbatches: Option<u32>,
    #[arg(long, short = 'v', help = format!(
        "Stages per rank, for interleaved-1f1b (default {})",
        dualpipe_planner::DEFAULT_CHUNKS_PER_RANK
    ))]
    chunks_per_rank: Option<u32>,
    /// Plan an inference step: forwards only (outputs are compared instead of gradients).
    #[arg(long)]
    forward_only: bool,
    /// Hidden size h of the model.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Rows per micro-batch (micro-batch size times sequence length).
    #[arg(long, default_value_t = 32)]
    rows: usize,
    /// Training steps.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Learning rate of plain gradient descent (default 8 / (stages x micro-batches): the
    /// gradients of every micro-batch add up, and every stage learns at once).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Seed of the parameters and the data.
    #[arg(long, default_value_t = 233)]
    seed: u64,
    /// Execution model: blocking (commits wait for their whole batch, as the reference
    /// implementation) or async (computes wait only for the data they need).
    #[arg(long, default_value = "blocking", value_parser = parse_model)]
    model: ExecutionModel,
    /// Seconds any rank waits for a message before the step fails.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Write the last step's measured timeline as a Chrome trace (Perfetto, chrome://tracing).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write the last step's measured mean costs per stage as a cost file (unit "ms", with the
    /// model's message, parameter and activation bytes), for simulate --costs.
    #[arg(long, value_name = "FILE")]
    costs_out: Option<PathBuf>,
    /// Overwrite the trace and cost files if they exist.
    #[arg(long)]
    force: bool,
    /// Where the ranks run: cpu (one thread each, checked against the single-process model)
    /// or cuda (the CUDA backend).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// The GPU of a --device cuda run on one GPU.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// One process per GPU over NCCL (with --device cuda), placed by torchrun-style
    /// variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
    #[arg(long)]
    launch: bool,
    /// Seconds the host waits for one step's GPU work before the step fails; an NCCL run then
    /// aborts its communicator, so a stalled peer becomes an error instead of a hang.
    #[arg(long, default_value_t = 300.0)]
    host_timeout: f64,
}

fn parse_family(name: &str) -> Result<Family, String> {
    name.parse()
        .map_err(|e: dualpipe_planner::PlanError| e.to_string())
}

fn parse_model(name: &str) -> Result<ExecutionModel, String> {
    match name {
        "blocking" => Ok(ExecutionModel::Blocking),
        "async" => Ok(ExecutionModel::Async),
        _ => Err(format!("unknown model `{name}`; use blocking or async")),
    }
}

/// The most memory a run may ask for: parameters, gradients and saved activations.
const MEMORY_LIMIT: f64 = 8.0 * (1u64 << 30) as f64;

pub fn run(args: Args) -> Result<(), Failure> {
    let (source, schedule) = schedule(&args)?;
    check_sizes(&args, &schedule)?;
    check_output(args.trace.as_deref(), args.force)?;
    check_output(args.costs_out.as_deref(), args.force)?;
    if let (Some(trace), Some(costs)) = (&args.trace, &args.costs_out)
        && trace == costs
        && trace.as_os_str() != "-"
    {
        return Err(Failure::usage(format!(
            "--trace and --costs-out both name {}; give two files",
            trace.display()
        )));
    }
    let cuda = args.device == "cuda";
    let gpu_run = if cuda {
        if args.trace.is_some() || args.costs_out.is_some() {
            return Err(Failure::usage(
                "--trace and --costs-out are for CPU runs, not --device cuda",
            ));
        }
        Some(gpu::GpuRun::check(
            args.launch,
            args.gpu,
            args.host_timeout,
            &schedule,
            |name| std::env::var(name).ok(),
        )?)
    } else if args.launch || args.gpu != 0 {
        return Err(Failure::usage("--launch and --gpu need --device cuda"));
    } else {
        None
    };
    let doc = schedule.schedule();
    let training = !doc.forward_only;
    let lr = args
        .lr
        .unwrap_or(8.0 / (doc.num_stages as f32 * doc.num_microbatches.max(1) as f32));
    let (num_ranks, num_stages, microbatches) =
        (doc.num_ranks, doc.num_stages, doc.num_microbatches);
    let spec = ModelSpec {
        hidden: args.hidden,
        rows: args.rows,
        stages: num_stages,
        seed: args.seed,
    };
    let options = Options {
        message_shape: Some(spec.message_shape()),
        keep_outputs: !training,
        model: args.model,
        timeout: Duration::from_secs_f64(args.timeout),
        profile: true,
    };
    let copies = schedule.topology().stages_per_rank().iter().sum::<u32>();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{source}: {} schedule, {num_ranks} ranks, {num_stages} stages{}, {microbatches} micro-batches, {}",
        doc.schedule,
        if copies > num_stages {
            format!(" ({copies} stage copies)")
        } else {
            String::new()
        },
        if training { "training" } else { "forward only" }
    );
    let _ = writeln!(
        out,
        "model: {num_stages} x (Linear({h}, {h4}) -> GELU -> Linear({h4}, {h})), {rows} rows per micro-batch, {params:.2} M parameters; learning rate {lr}; {} model, {}",
        args.model,
        match &gpu_run {
            None => format!("{num_ranks} CPU threads"),
            Some(run) if run.launch.is_some() => "one process per GPU".to_string(),
            Some(_) => format!("{num_ranks} virtual ranks on one GPU"),
        },
        h = args.hidden,
        h4 = 4 * args.hidden,
        rows = args.rows,
        params = (spec.parameters_per_stage() as f64 * f64::from(num_stages)) / 1e6,
    );
    if let Some(run) = &gpu_run {
        let mut options = options;
        options.profile = false;
        gpu::train(run, schedule, options, &spec, args.steps, lr, &mut out)?;
        return write_stdout(&out);
    }
    write_stdout(&out)?;

    let mut pipeline = CpuBackend::new(schedule.clone(), options, &spec)
        .map_err(|e| Failure::invalid(e.to_string()))?;
    let mut reference = Sequential::new(&spec);
    let bar = progress_bar(args.steps);
    let print = |text: String| match &bar {
        Some(bar) => bar.suspend(|| write_stdout(&text)),
        None => write_stdout(&text),
    };

    let mut pipelined_ms = Vec::new();
    let mut reference_ms = Vec::new();
    let mut max_cal_diff = 0.0f64;
    let mut profile = None;
    for step in 0..args.steps {
        let batch = Batch::synthetic(&spec, microbatches, u64::from(step));
        let started = Instant::now();
        let mut output = pipeline
            .step(&batch)
            .map_err(|e| Failure::invalid(format!("step {}: {e}", step + 1)))?;
        pipelined_ms.push(started.elapsed().as_secs_f64() * 1e3);

        // The reference starts from the pipeline's parameters, so that every step is held
        // to bitwise equal losses, not only the first.
        for stage in &mut reference.stages {
            stage.load_parameters(pipeline.pipeline().copies(stage.index())[0]);
            stage.zero_gradients();
        }
        let started = Instant::now();
        let theirs = reference
            .reference_run(&batch, training)
            .map_err(|e| Failure::invalid(format!("step {}: reference: {e}", step + 1)))?;
        reference_ms.push(started.elapsed().as_secs_f64() * 1e3);

        let step_profile = output.profile.take();
        let Ok(ours) = pipeline.reference_run(output);
        let agreement = compare(&ours, &theirs).map_err(|e| {
            let step = step + 1;
            Failure::invalid(match e {
                Mismatch::Differs(why) => format!(
                    "step {step}: the pipelined run differs from the single-process reference: {why}"
                ),
                Mismatch::Diverged(why) => format!(
                    "step {step}: the training diverged ({why}); try a smaller --lr (now {lr})"
                ),
                Mismatch::Unchecked(why) => format!(
                    "step {step}: the single-process reference cannot check this run: {why}"
                ),
            })
        })?;
        max_cal_diff = max_cal_diff.max(agreement.max_cal_diff);

        let mean_loss = theirs
            .losses
            .iter()
            .flatten()
            .map(|&l| f64::from(l))
            .sum::<f64>()
            / f64::from(microbatches);
        print(format!(
            "step {:>3}  loss {mean_loss:.6}  {:>8.1} ms\n",
            step + 1,
            pipelined_ms[step as usize]
        ))?;
        if training {
            let Ok(()) = pipeline.sgd(lr);
        }
        profile = step_profile;
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let profile = profile.unwrap_or_default();
    let measured = measured_costs(&schedule, &profile, &spec, training);
    let mut out = summary(&schedule, &profile, &measured, args.model);
    let _ = writeln!(
        out,
        "reference (single process): losses bitwise equal in {steps} of {steps} steps; {}; {:.1} ms per step against {:.1} ms pipelined",
        if training && max_cal_diff == 0.0 {
            "gradients bitwise equal".to_string()
        } else if training {
            format!("gradients within cal_diff {max_cal_diff:.1e} (limit {CAL_DIFF_LIMIT:.0e})")
        } else {
            "outputs bitwise equal".to_string()
        },
        median(&reference_ms),
        median(&pipelined_ms),
        steps = args.steps,
    );
    if let Some(path) = &args.trace {
        write_output(Some(path), &profile.chrome_trace(&schedule), args.force)?;
        let _ = writeln!(
            out,
            "trace: {} (open in https://ui.perfetto.dev or chrome://tracing)",
            path.display()
        );
    }
    if let Some(path) = &args.costs_out {
        write_output(Some(path), &measured.to_json(), args.force)?;
        if path.as_os_str() != "-" {
            let _ = writeln!(
                out,
                "costs: {} (per stage, in ms; read it with simulate --costs)",
                path.display()
            );
        }
    }
    write_stdout(&out)
}

/// The last step's measured mean costs per stage in milliseconds, with the micro-batch size
/// they were measured at (the rows of a micro-batch, so `tune` can scale them to other sizes)
/// and the reference model's sizes in bytes (f32): the activation between stages, the
/// parameters of a stage, and what a stage keeps per micro-batch between its forward and its
/// backward (its input and two `4h`-wide buffers, and the loss gradient at the last stage).
fn measured_costs(
    schedule: &ValidSchedule,
    profile: &Profile,
    spec: &ModelSpec,
    training: bool,
) -> Costs {
    let doc = schedule.schedule();
    let mut costs = profile.measured_costs_ms(doc);
    costs.microbatch_size = Some(spec.rows as f64);
    let floats = |n: usize| 4.0 * n as f64;
    let (rows, h) = (spec.rows, spec.hidden);
    costs.uniform.bytes = floats(rows * h);
    costs.uniform.param_bytes = floats(spec.parameters_per_stage());
    if training {
        costs.uniform.activation_bytes = floats(9 * rows * h);
        let last = doc.num_stages.saturating_sub(1);
        costs.stages.entry(last).or_default().activation_bytes = Some(floats(10 * rows * h));
    }
    costs
}

/// The schedule to run, from a file or planned from the options, with a name for messages.
fn schedule(args: &Args) -> Result<(String, ValidSchedule), Failure> {
    let planning = args.schedule.is_some()
        || args.ranks.is_some()
        || args.microbatches.is_some()
        || args.chunks_per_rank.is_some()
        || args.forward_only;
    match (&args.file, args.schedule, args.ranks, args.microbatches) {
        (Some(_), ..) if planning => Err(Failure::usage(
            "give either a schedule file or --schedule, --ranks and --microbatches, not both",
        )),
        (Some(file), ..) => {
            let schedule = load_schedule(file)?;
            let name = source_name(file).to_string();
            let valid = ValidSchedule::new(schedule)
                .map_err(|errors| Failure::violations(&name, &errors))?;
            Ok((name, valid))
        }
        (None, Some(family), Some(ranks), Some(microbatches)) => {
            let mut request = PlanRequest::new(family, ranks, microbatches);
            request.forward_only = args.forward_only;
            request.chunks_per_rank = args.chunks_per_rank;
            let valid = plan(&request).map_err(crate::cmd::plan::failure)?;
            Ok((format!("{family} {ranks}x{microbatches}"), valid))
        }
        _ => Err(Failure::usage(
            "give a schedule file, or --schedule, --ranks and --microbatches to plan one",
        )),
    }
}

fn check_sizes(args: &Args, schedule: &ValidSchedule) -> Result<(), Failure> {
    if args.hidden == 0 || args.rows == 0 || args.steps == 0 {
        return Err(Failure::usage(
            "--hidden, --rows and --steps must be at least 1",
        ));
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(Failure::usage(
            "--timeout must be a positive number of seconds",
        ));
    }
    if let Some(lr) = args.lr
        && !(lr.is_finite() && lr > 0.0)
    {
        return Err(Failure::usage(format!(
            "--lr {lr}: the learning rate must be a positive number"
        )));
    }
    let doc = schedule.schedule();
    let (h, rows) = (args.hidden as f64, args.rows as f64);
    let copies = f64::from(schedule.topology().stages_per_rank().iter().sum::<u32>());
    // Parameters and gradients of every copy plus the reference model, and up to every
    // micro-batch's saved activations (input, two 4h-wide buffers) per stage.
    let parameters = (copies + f64::from(doc.num_stages)) * 2.0 * (8.0 * h * h + 5.0 * h);
    let activations = f64::from(doc.num_stages) * f64::from(doc.num_microbatches) * rows * h * 11.0;
    let bytes = 4.0 * (parameters + activations);
    if bytes > MEMORY_LIMIT {
        return Err(Failure::usage(format!(
            "--hidden {} and --rows {} would need about {:.1} GiB for this schedule; the limit is {:.0} GiB",
            args.hidden,
            args.rows,
            bytes / (1u64 << 30) as f64,
            MEMORY_LIMIT / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

fn progress_bar(steps: u32) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(u64::from(steps));
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {elapsed}") {
        bar.set_style(style);
    }
    Some(bar)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// The per-rank table of the last step and the measured bubble.
fn summary(
    schedule: &ValidSchedule,
    profile: &Profile,
    measured: &Costs,
    model: ExecutionModel,
) -> String {
    let doc = schedule.schedule();
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let _ = writeln!(
        out,
        "\nlast step, measured ({} ranks on {cores} CPU core{}):",
        doc.num_ranks,
        if cores == 1 { "" } else { "s" }
    );
    let _ = writeln!(out, "rank   busy ms  comm wait ms   idle ms");
    for s in profile.summary(doc) {
        let _ = writeln!(
            out,
            "{:>4} {:>9.2} {:>13.2} {:>9.2}",
            s.rank,
            s.busy_us / 1e3,
            s.comm_wait_us / 1e3,
            s.idle_us / 1e3
        );
    }
    let _ = writeln!(
        out,
        "bubble: {:.1}% of rank time not computing (step {:.2} ms)",
        100.0 * profile.bubble(doc),
        profile.makespan_us() / 1e3
    );
    // The schedule's own bubble at the measured speed: the simulator with the mean measured
    // costs per stage and free messages, under the same execution model.
    let means = profile.mean_costs(doc);
    let ms = |us: Option<f64>| us.map_or("-".to_string(), |us| format!("{:.2}", us / 1e3));
    match simulate(schedule, measured, model) {
        Ok(simulation) => {
            let _ = writeln!(
                out,
                "simulated: {:.1}% with the measured mean costs per stage (ms, mean over stages: F {}, B {}, B defer_w {}, W {}, FB {}; messages free)",
                100.0 * simulation.bubble_share(),
                ms(means.forward),
                ms(means.backward),
                ms(means.backward_input),
                ms(means.weight),
                ms(means.forward_backward),
            );
        }
        Err(e) => {
            let _ = writeln!(out, "simulated: not available ({e})");
        }
    }
    if doc.num_ranks as usize > cores {
        let _ = writeln!(
            out,
            "({} ranks share {cores} cores: measured times include waiting for a core)",
            doc.num_ranks
        );
    }
    out
}
