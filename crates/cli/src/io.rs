//! Reading inputs and writing outputs for the subcommands, with the exit-code policy.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use dualpipe_schedule::{Schedule, ValidationErrors};

/// A subcommand's failure: what to print and which exit code to return.
#[derive(Debug)]
pub struct Failure {
    /// 1 for an invalid schedule, 2 for a usage error.
    pub code: u8,
    /// The message, without the `error: ` prefix.
    pub message: String,
}

impl Failure {
    /// A usage error (exit code 2): bad arguments, unreadable input, refused overwrite.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    /// An invalid schedule (exit code 1).
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// An invalid schedule from its validation errors.
    pub fn violations(source: &str, errors: &ValidationErrors) -> Self {
        Failure::invalid(format!("{source}: {errors}"))
    }
}

/// A readable name for an input path (`-` is standard input).
pub fn source_name(path: &str) -> &str {
    if path == "-" { "<stdin>" } else { path }
}

/// Reads a whole input: a file, or standard input for `-`.
pub fn read_input(path: &str) -> Result<String, Failure> {
    let mut text = String::new();
    if path == "-" {
        io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::usage(format!("cannot read standard input: {e}")))?;
    } else {
        text = fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("cannot read {path}: {e}")))?;
    }
    Ok(text)
}

/// Reads and parses a schedule document (not yet validated).
pub fn load_schedule(path: &str) -> Result<Schedule, Failure> {
    let text = read_input(path)?;
    Schedule::from_json(&text).map_err(|e| {
        let hint = if text.trim_start().starts_with(['{', '[']) || text.trim().is_empty() {
            ""
        } else {
            " (this is not JSON; a torch CSV is read by `dualpipe convert FILE --from torch-csv`)"
        };
        Failure::invalid(format!("{}: {e}{hint}", source_name(path)))
    })
}

/// Refuses, before any work is done, an output path that cannot be written: a directory, or
/// an existing file without `force`. `-` (standard output), devices and pipes are accepted.
pub fn check_output(output: Option<&Path>, force: bool) -> Result<(), Failure> {
    let Some(path) = output.filter(|p| p.as_os_str() != "-") else {
        return Ok(());
    };
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(Failure::usage(format!(
            "{} is a directory; give a file name",
            path.display()
        ))),
        Ok(meta) if meta.is_file() && !force => Err(Failure::usage(format!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Writes `text` to `output`, or to standard output when `output` is `None` or `-`. An existing
/// file is kept unless `force` is set; a directory is refused.
pub fn write_output(output: Option<&Path>, text: &str, force: bool) -> Result<(), Failure> {
    let Some(path) = output.filter(|p| p.as_os_str() != "-") else {
        return write_stdout(text);
    };
    check_output(Some(path), force)?;
    let mut options = fs::OpenOptions::new();
    options.write(true);
    let special = fs::metadata(path).is_ok_and(|m| !m.is_file());
    if special {
        // A device or a pipe (`/dev/null`, `/dev/stdout`): written as it is, nothing to keep.
    } else if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            Failure::usage(format!(
                "{} already exists; pass --force to overwrite it",
                path.display()
            ))
        } else {
            Failure::usage(format!("cannot write {}: {e}", path.display()))
        }
    })?;
    file.write_all(text.as_bytes())
        .map_err(|e| Failure::usage(format!("cannot write {}: {e}", path.display())))
}

/// Writes to standard output; a closed pipe (`| head`) ends the output quietly.
pub fn write_stdout(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(Failure::usage(format!("cannot write standard output: {e}")))
        }
        _ => Ok(()),
    }
}
