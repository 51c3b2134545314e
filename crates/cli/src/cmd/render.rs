//! `dualpipe render`: draw a simulated schedule, or a measured run's trace, as text, SVG or a
//! Chrome trace.

use std::path::PathBuf;

use dualpipe_schedule::{Timeline, ValidSchedule, chrome_trace, timeline_svg, timeline_text};

use crate::io::{Failure, check_output, load_schedule, read_input, source_name, write_output};
use crate::options::{CostOptions, simulate_file};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Time-scaled grid, one row per rank, like the DualPipe README figures.
    Text,
    /// SVG picture with colours per kind and direction and a legend.
    Svg,
    /// Chrome trace JSON (chrome://tracing, Perfetto): pid = rank, tid 0 = compute, tid 1 =
    /// communication, flow arrows from each send to its receive.
    Chrome,
}

/// Simulate a schedule and draw its timeline, or draw a measured run (--trace).
#[derive(clap::Args)]
#[command(after_help = "\
Labels: F forward, B full backward, I backward with deferred weights, W weight gradient, then the
micro-batch; F3+b7 is an overlapped pair. Upper case (dark in SVG) is the first stage a rank holds
along the route (DualPipe's direction 0 -> N-1, the way down DualPipeV's V), lower case (light)
the second. In the Chrome trace one time unit is one millisecond. With --trace the times are
those of the run that wrote the trace, in microseconds.

Examples:
  dualpipe render schedules/dualpipe-8x20.json --format text
  dualpipe render v.json --format svg -o v.svg
  dualpipe render v.json --format chrome --model async --cost comm=0.2 -o v.trace.json
  dualpipe plan -s zb1p -n 4 -c 8 | dualpipe render - --format text --columns 3
  dualpipe plan -s 1f1b -n 4 -c 8 -o s.json && dualpipe run s.json --trace t.json
  dualpipe render s.json --trace t.json --format svg -o measured.svg")]
pub struct Args {
    /// Schedule file, or - for standard input.
    file: String,
    /// What to draw.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Draw the measured run of this Chrome trace (as `dualpipe run --trace` writes for the
    /// same schedule) instead of simulating.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["cost", "costs", "model"])]
    trace: Option<String>,
    #[command(flatten)]
    options: CostOptions,
    /// Text format: characters per time unit, fractions allowed (default: the fewest that fit
    /// the labels, within 1000 columns).
    #[arg(long, value_name = "N")]
    columns: Option<f64>,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    check_output(args.output.as_deref(), args.force)?;
    if let Some(columns) = args.columns {
        if args.format != Format::Text {
            return Err(Failure::usage("--columns applies to --format text only"));
        }
        if !(columns.is_finite() && columns > 0.0) {
            return Err(Failure::usage(format!(
                "--columns {columns}: characters per time unit must be a positive number"
            )));
        }
    }
    let (valid, timeline) = match &args.trace {
        Some(trace) => measured(&args.file, trace)?,
        None => {
            let (valid, _, sim) = simulate_file(&args.file, &args.options)?;
            let timeline = sim.timeline(valid.schedule());
            (valid, timeline)
        }
    };
    let text = match args.format {
        Format::Text => timeline_text(&valid, &timeline, args.columns),
        Format::Svg => timeline_svg(&valid, &timeline),
        Format::Chrome => chrome_trace(&valid, &timeline),
    };
    write_output(args.output.as_deref(), &text, args.force)
}

/// The schedule in `file` and the measured timeline of its run in the Chrome trace `trace`.
fn measured(file: &str, trace: &str) -> Result<(ValidSchedule, Timeline), Failure> {
    if file == "-" && trace == "-" {
        return Err(Failure::usage(
            "the schedule and the trace cannot both come from standard input",
        ));
    }
    let name = source_name(file);
    let valid = ValidSchedule::new(load_schedule(file)?)
        .map_err(|errors| Failure::violations(name, &errors))?;
    let text = read_input(trace)?;
    let timeline = Timeline::from_chrome_trace(&valid, &text)
        .map_err(|e| Failure::usage(format!("{}: {e}", source_name(trace))))?;
    Ok((valid, timeline))
}
