//! `dualpipe`: plan, check and look at pipeline-parallel schedules.

mod cmd;
mod io;
mod options;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  dualpipe plan --schedule dualpipev --ranks 4 --microbatches 10 -o v.json
  dualpipe validate v.json
  dualpipe inspect v.json
  dualpipe plan --schedule dualpipe --ranks 8 --microbatches 20 | dualpipe inspect -
  dualpipe simulate v.json --cost f=1,b=2,w=1,fb=3 --model async
  dualpipe render v.json --format svg -o v.svg
  dualpipe compare --ranks 8 --microbatches 20
  dualpipe partition --layers layers.json --schedule dualpipev --ranks 4 --microbatches 16
  dualpipe tune --ranks 4 --global-batch 64 --costs costs.json -o best.json
  dualpipe synthesize --ranks 8 --microbatches 32 --memory-like dualpipev -o s.json
  dualpipe convert v.json --to torch-csv -o v.csv
  dualpipe run --schedule dualpipev --ranks 4 --microbatches 10
  dualpipe bench-gpu
  dualpipe gpu-info

Exit codes: 0 success, 1 invalid schedule, 2 usage error.";

/// Schedule compiler for bidirectional pipeline parallelism (DualPipe, DualPipeV and the
/// classic schedules).
#[derive(Parser)]
#[command(name = "dualpipe", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Plan(cmd::plan::Args),
    Validate(cmd::validate::Args),
    Inspect(cmd::inspect::Args),
    Simulate(cmd::simulate::Args),
    Render(cmd::render::Args),
    Compare(cmd::compare::Args),
    Partition(cmd::partition::Args),
    Tune(cmd::tune::Args),
    Synthesize(cmd::synthesize::Args),
    Convert(cmd::convert::Args),
    Run(cmd::run::Args),
    BenchGpu(cmd::bench_gpu::Args),
    GpuInfo(cmd::gpu_info::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Plan(args) => cmd::plan::run(args),
        Command::Validate(args) => cmd::validate::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Simulate(args) => cmd::simulate::run(args),
        Command::Render(args) => cmd::render::run(args),
        Command::Compare(args) => cmd::compare::run(args),
        Command::Partition(args) => cmd::partition::run(args),
        Command::Tune(args) => cmd::tune::run(args),
        Command::Synthesize(args) => cmd::synthesize::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::BenchGpu(args) => cmd::bench_gpu::run(args),
        Command::GpuInfo(args) => cmd::gpu_info::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
