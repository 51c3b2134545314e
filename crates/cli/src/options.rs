//! Options shared by the subcommands that simulate: the cost model and the execution model.

use std::path::PathBuf;

use dualpipe_schedule::{Costs, ExecutionModel, Simulation, ValidSchedule, simulate};

use crate::io::{Failure, load_schedule, read_input, source_name};

/// The execution model, as typed on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// A commit returns when every op of its batch has met its partner (the reference).
    Blocking,
    /// A commit launches its batch on a communication stream; compute waits only for its data.
    Async,
}

impl From<Model> for ExecutionModel {
    fn from(model: Model) -> Self {
        match model {
            Model::Blocking => ExecutionModel::Blocking,
            Model::Async => ExecutionModel::Async,
        }
    }
}

/// `--cost`, `--costs` and `--model`.
#[derive(Clone, Debug, clap::Args)]
pub struct CostOptions {
    /// Costs of one stage for one micro-batch, the same on every stage, as name=value pairs:
    /// f (forward), b (full backward), w (weight gradient; a backward with deferred weights
    /// costs b - w), fb (overlapped pair; default f + b), comm (latency of every message),
    /// bytes (per message) and bandwidth (bytes per time unit). In the cost file's unit, else
    /// abstract units. Defaults: f=1,b=2,w=1,fb=f+b,comm=0.
    #[arg(long, value_name = "LIST")]
    pub cost: Option<String>,
    /// JSON cost file: costs per stage, with its time unit and per-stage overrides (see
    /// docs/costs.md); --cost applies on top of it.
    #[arg(long, value_name = "FILE")]
    pub costs: Option<PathBuf>,
    /// Execution model.
    #[arg(long, value_enum, default_value_t = Model::Blocking)]
    pub model: Model,
}

impl CostOptions {
    /// The cost model the options describe.
    pub fn costs(&self) -> Result<Costs, Failure> {
        let mut costs = match &self.costs {
            Some(path) => {
                let name = path.display().to_string();
                let text = read_input(&name)?;
                Costs::from_json(&text)
                    .map_err(|e| Failure::usage(format!("{}: {e}", source_name(&name))))?
            }
            None => Costs::default(),
        };
        if let Some(list) = &self.cost {
            costs
                .apply_assignments(list)
                .map_err(|e| Failure::usage(format!("--cost: {e}")))?;
        }
        Ok(costs)
    }

    /// The execution model.
    pub fn model(&self) -> ExecutionModel {
        self.model.into()
    }
}

/// Loads, validates and simulates the schedule at `path`.
pub fn simulate_file(
    path: &str,
    options: &CostOptions,
) -> Result<(ValidSchedule, Costs, Simulation), Failure> {
    let costs = options.costs()?;
    let schedule = load_schedule(path)?;
    let name = source_name(path);
    let valid =
        ValidSchedule::new(schedule).map_err(|errors| Failure::violations(name, &errors))?;
    let simulation = run(&valid, &costs, options.model(), name)?;
    Ok((valid, costs, simulation))
}

/// Simulates a valid schedule, with the CLI's error policy.
pub fn run(
    valid: &ValidSchedule,
    costs: &Costs,
    model: ExecutionModel,
    name: &str,
) -> Result<Simulation, Failure> {
    simulate(valid, costs, model).map_err(|e| match e {
        dualpipe_schedule::SimulateError::Costs(e) => Failure::usage(format!("{name}: {e}")),
        stalled => Failure::invalid(format!("{name}: {stalled}")),
    })
}

/// How the costs of a table are given, for its header: `costs per stage in ms: f=1,...`.
pub fn costs_header(costs: &Costs) -> String {
    format!("costs per stage in {}: {costs}", costs.unit_label())
}

/// ` ms` after a time in a named unit; nothing for abstract units.
pub fn unit_suffix(costs: &Costs) -> String {
    if costs.unit.is_empty() {
        String::new()
    } else {
        format!(" {}", costs.unit)
    }
}

/// A time for people: integers without a fraction, others with up to three decimals.
pub fn time(value: f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}
