//! Schedule format v1 for bidirectional pipeline parallelism: the types, their JSON and compact
//! text forms, and the validator.
//!
//! A schedule says, for every rank, which forward (`F`), backward (`B`), weight-gradient (`W`),
//! overlapped forward-and-backward (`FB`), `send`, `recv` and `commit` runs, in order. This crate
//! owns that format: nothing else in the workspace parses or writes it.
//!
//! ```
//! use dualpipe_schedule::{Schedule, validate};
//! let text = r#"{
//!   "format": "dualpipe-schedule/v1", "schedule": "demo",
//!   "num_ranks": 1, "num_stages": 1, "num_microbatches": 1, "forward_only": false,
//!   "pipelines": [{"route": [0], "microbatches": [0]}],
//!   "ranks": [[{"op": "F", "stage": 0, "mb": 0}, {"op": "B", "stage": 0, "mb": 0}]]
//! }"#;
//! let schedule = Schedule::from_json(text).unwrap();
//! validate(&schedule).unwrap();
//! ```

mod batches;
mod compute_order;
mod costs;
mod diagnostics;
mod format;
mod json;
mod order;
mod render;
mod simulate;
mod timeline;
mod topology;
mod torch;
mod trace;
mod validate;

pub use batches::Batches;
pub use compute_order::{ComputeOrder, ComputeOrderError, Header};
pub use costs::{
    ComputeCosts, CostError, Costs, LayerCost, LayerCosts, StageCosts, StageOverride, UNITS,
    unit_us,
};
pub use diagnostics::{ExecutionModel, Location, Rule, Violation};
pub use format::{
    FORMAT_V1, Format, Instruction, Kind, Message, ParseInstructionError, Pipeline, Schedule, Work,
    parse_program,
};
pub use json::ParseError;
pub use order::{
    RankStats, Round, Stalled, compute_rounds, compute_times, order_grid, rank_stats, works,
};
pub use render::{timeline_svg, timeline_text};
pub use simulate::{Interval, RankSummary, SimulateError, Simulation, simulate};
pub use timeline::{Lane, Source, Span, TRACE_UNIT_US, Timeline, TraceError, bubble_share};
pub use topology::Topology;
pub use torch::{TorchCsvError, read_torch_csv, to_torch_csv};
pub use trace::chrome_trace;
pub use validate::{Links, Report, ValidSchedule, ValidationErrors, validate};

/// The JSON Schema of format v1, pretty-printed; checked in as `docs/schedule-v1.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Schedule);
    let mut text = serde_json::to_string_pretty(&schema).expect("schemas serialize");
    text.push('\n');
    text
}
