//! One module per subcommand: its clap arguments and its `run`.

pub mod inspect;
pub mod plan;
pub mod run;
pub mod validate;
