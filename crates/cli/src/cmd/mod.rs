//! One module per subcommand: its clap arguments and its `run`.

pub mod bench_gpu;
pub mod compare;
pub mod convert;
pub mod gpu_info;
pub mod inspect;
pub mod partition;
pub mod plan;
pub mod render;
pub mod run;
pub mod simulate;
pub mod synthesize;
pub mod tune;
pub mod validate;
