//! What the end-to-end tests of the `dualpipe` binary share: running it and reading what it
//! printed. Each test file uses a part of it.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Runs `dualpipe` with `args` and no input.
pub fn dualpipe(args: &[&str]) -> Output {
    dualpipe_in(args, None)
}

/// Runs `dualpipe` with `args`, feeding `stdin` when given. A command that fails before
/// reading its input closes the pipe early: not an error here.
pub fn dualpipe_in(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut input = child.stdin.take().expect("piped");
    if let Some(text) = stdin
        && let Err(e) = input.write_all(text.as_bytes())
    {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    drop(input);
    child.wait_with_output().expect("the binary ends")
}

/// Bytes the binary printed, as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `output` exited with `code` and a message containing `contains`, without a panic.
pub fn assert_clean_error(output: &Output, code: i32, contains: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(contains),
        "expected `{contains}` in: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

/// `output` is a usage error (exit code 2) whose message contains `contains`.
pub fn assert_usage_error(output: &Output, contains: &str) {
    assert_clean_error(output, 2, contains);
}
