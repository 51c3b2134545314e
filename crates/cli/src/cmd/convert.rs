//! `dualpipe convert`: schedules to and from torch.distributed.pipelining's CSV.

use std::path::PathBuf;

use dualpipe_planner::lower::lower_torch_order;
use dualpipe_schedule::{ValidSchedule, read_torch_csv, to_torch_csv, validate};

use crate::io::{Failure, check_output, load_schedule, read_input, source_name, write_output};

/// Foreign formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Foreign {
    /// torch.distributed.pipelining's CSV: one row per rank, actions like 0F3, 7I0, 7W0, 7B3,
    /// (0F7;7B3)OVERLAP_F_B.
    TorchCsv,
}

/// Convert a schedule to torch's CSV, or a torch CSV to a format-v1 schedule.
#[derive(clap::Args)]
#[command(
    group(clap::ArgGroup::new("direction").required(true).args(["to", "from"])),
    after_help = "\
--to torch-csv writes the compute order (torch's compute_only form, what _load_csv reads);
--with-comms adds the messages as torch's SEND_F, RECV_F, SEND_B, RECV_B actions (its
compute_comms form), each commit's sends before its receives. A stage must run on one rank:
dualpipe keeps two copies of every stage and is refused (dualpipev converts).

--from torch-csv reads a compute-only CSV: ranks are rows, stages and micro-batches are numbered
from 0, each stage's rank is the row it appears in; empty cells and UNSHARD, RESHARD, REDUCE_GRAD
are skipped. The lowering pass adds sends, receives and commits, and the result is validated.

Examples:
  dualpipe convert schedules/dualpipev-4x10.json --to torch-csv -o dualpipev_4rank_10mb.csv
  dualpipe plan -s zbv -n 4 -c 8 | dualpipe convert - --to torch-csv --with-comms
  dualpipe convert dualpipev_4rank_10mb.csv --from torch-csv --name dualpipev -o v.json")]
pub struct Args {
    /// Input: a schedule (--to) or a torch CSV (--from); - for standard input.
    file: String,
    /// Write the schedule in this format.
    #[arg(long, value_enum)]
    to: Option<Foreign>,
    /// Read the input in this format and write a format-v1 schedule.
    #[arg(long, value_enum)]
    from: Option<Foreign>,
    /// With --to torch-csv: include sends and receives (torch's compute_comms form).
    #[arg(long)]
    with_comms: bool,
    /// With --from: the `schedule` label of the document written (default: torch).
    #[arg(long)]
    name: Option<String>,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    check_output(args.output.as_deref(), args.force)?;
    if args.with_comms && args.to.is_none() {
        return Err(Failure::usage(
            "--with-comms applies to --to torch-csv only",
        ));
    }
    if args.name.is_some() && args.from.is_none() {
        return Err(Failure::usage("--name applies to --from torch-csv only"));
    }
    let name = source_name(&args.file);
    let text = if args.to.is_some() {
        let schedule = load_schedule(&args.file)?;
        let valid =
            ValidSchedule::new(schedule).map_err(|errors| Failure::violations(name, &errors))?;
        to_torch_csv(&valid, args.with_comms).map_err(|e| Failure::usage(e.to_string()))?
    } else {
        let csv = read_input(&args.file)?;
        let order = read_torch_csv(&csv).map_err(|e| Failure::invalid(format!("{name}: {e}")))?;
        let label = args.name.as_deref().unwrap_or("torch");
        let schedule = lower_torch_order(order, label)
            .map_err(|e| Failure::invalid(format!("{name}: {e}")))?;
        validate(&schedule).map_err(|errors| Failure::violations(name, &errors))?;
        schedule.to_json()
    };
    write_output(args.output.as_deref(), &text, args.force)
}
