//! The `dualpipe` command end to end: outputs, exit codes, messages, and no overwriting.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn dualpipe(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_clean_error(output: &Output, code: i32, contains: &str) {
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

#[test]
fn plan_validate_inspect_through_pipes() {
    let plan = dualpipe(
        &[
            "plan",
            "--schedule",
            "dualpipev",
            "--ranks",
            "4",
            "--microbatches",
            "10",
        ],
        None,
    );
    assert!(plan.status.success(), "{}", text(&plan.stderr));
    let json = text(&plan.stdout);
    let validate = dualpipe(&["validate", "-"], Some(&json));
    assert!(validate.status.success());
    assert!(
        text(&validate.stdout)
            .contains("valid dualpipev schedule: 4 ranks, 8 stages, 10 micro-batches")
    );
    let inspect = dualpipe(&["inspect", "-"], Some(&json));
    assert!(inspect.status.success());
    let out = text(&inspect.stdout);
    // Rank 0 of DualPipeV (4, 10): 9 FB, 7 deferred backwards, 21 commits, peak 9 = PP + 1.
    let row0 = out
        .lines()
        .find(|l| l.trim_start().starts_with("0 "))
        .unwrap();
    let numbers: Vec<u32> = row0
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(numbers, vec![0, 20, 20, 9, 7, 7, 20, 20, 21, 9, 1]);
    let grid0 = out.lines().find(|l| l.starts_with("rank 0 |")).unwrap();
    let cells: Vec<&str> = grid0
        .split('|')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        cells[..10],
        ["F0", "F1", "F2", "F3", "F4", "F5", "F6", "f0", "i0", "w0"]
    );
    assert_eq!(cells[17..19], ["F7+b3", "f4+B0"]);
}

#[test]
fn every_family_plans_a_valid_schedule() {
    for name in [
        "dualpipe",
        "dualpipev",
        "1f1b",
        "gpipe",
        "zb1p",
        "zbv",
        "interleaved-1f1b",
    ] {
        let plan = dualpipe(&["plan", "-s", name, "-n", "4", "-c", "8"], None);
        assert!(plan.status.success(), "{name}: {}", text(&plan.stderr));
        let validate = dualpipe(&["validate", "-"], Some(&text(&plan.stdout)));
        assert!(
            validate.status.success(),
            "{name}: {}",
            text(&validate.stderr)
        );
    }
}

#[test]
fn family_constraints_are_usage_errors() {
    let out = dualpipe(&["plan", "-s", "dualpipe", "-n", "3", "-c", "8"], None);
    assert_clean_error(&out, 2, "dualpipe needs an even number of ranks N >= 2");
    let out = dualpipe(&["plan", "-s", "dualpipev", "-n", "4", "-c", "7"], None);
    assert_clean_error(
        &out,
        2,
        "micro-batches C >= 2N; got 4 ranks and 7 micro-batches",
    );
    let out = dualpipe(
        &[
            "plan",
            "-s",
            "1f1b",
            "-n",
            "4",
            "-c",
            "8",
            "--chunks-per-rank",
            "2",
        ],
        None,
    );
    assert_clean_error(
        &out,
        2,
        "--chunks-per-rank applies to interleaved-1f1b only",
    );
    let out = dualpipe(&["plan", "-s", "pipedream", "-n", "4", "-c", "8"], None);
    assert_clean_error(&out, 2, "unknown schedule `pipedream`");
    let out = dualpipe(&["plan", "-s", "1f1b", "-n", "-4", "-c", "8"], None);
    assert_clean_error(&out, 2, "error");
}

#[test]
fn invalid_schedules_exit_with_1_and_say_where() {
    let plan = dualpipe(&["plan", "-s", "1f1b", "-n", "2", "-c", "2"], None);
    let broken = text(&plan.stdout).replacen(r#""peer": 1}"#, r#""peer": 0}"#, 1);
    let out = dualpipe(&["validate", "-"], Some(&broken));
    assert_clean_error(
        &out,
        1,
        "rank 0, instruction 1 `send act s0 m0 -> r0`: rule 3 (communication)",
    );
    let out = dualpipe(
        &["validate", "-"],
        Some("{\"format\": \"dualpipe-schedule/v1\""),
    );
    assert_clean_error(&out, 1, "not a dualpipe-schedule/v1 document");
    let unknown = text(&plan.stdout).replacen(r#""op": "F","#, r#""op": "F", "extra": 1,"#, 1);
    let out = dualpipe(&["inspect", "-"], Some(&unknown));
    assert_clean_error(&out, 1, "rank 0, instruction 0: unknown field `extra`");
}

#[test]
fn unreadable_input_is_a_usage_error() {
    let out = dualpipe(&["validate", "no/such/file.json"], None);
    assert_clean_error(&out, 2, "cannot read no/such/file.json");
}

#[test]
fn plan_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.json");
    std::fs::write(&path, "my own notes").unwrap();
    let target = path.to_str().unwrap();
    let out = dualpipe(
        &["plan", "-s", "1f1b", "-n", "2", "-c", "2", "-o", target],
        None,
    );
    assert_clean_error(&out, 2, "already exists; pass --force to overwrite it");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "my own notes");
    let out = dualpipe(
        &[
            "plan", "-s", "1f1b", "-n", "2", "-c", "2", "-o", target, "--force",
        ],
        None,
    );
    assert!(out.status.success());
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("{\n  \"format\": \"dualpipe-schedule/v1\"")
    );
}

#[test]
fn help_has_examples() {
    for sub in ["plan", "validate", "inspect"] {
        let out = dualpipe(&[sub, "--help"], None);
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("Examples:"), "{sub}");
    }
    let out = dualpipe(&["--help"], None);
    assert!(text(&out.stdout).contains("Exit codes: 0 success, 1 invalid schedule, 2 usage error"));
    let out = dualpipe(&[], None);
    assert_eq!(out.status.code(), Some(2));
}
