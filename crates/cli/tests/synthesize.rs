//! `dualpipe synthesize` end to end: the table beside the families, the JSON report, the
//! schedule written (and never overwritten without `--force`), `-o -`, and usage errors
//! (exit code 2) that name the flag.

mod common;

use common::{assert_usage_error, dualpipe, text};

use serde_json::Value;

const BASE: [&str; 9] = [
    "synthesize",
    "-n",
    "2",
    "-c",
    "6",
    "--model-cost",
    "f=4,b=8,w=4,fb=9.6,comm=0.1",
    "--evaluations",
    "200",
];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [&BASE[..], extra].concat()
}

#[test]
fn the_table_shows_the_result_beside_the_families() {
    let output = dualpipe(&args(&["--memory-like", "dualpipev"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("times in abstract units"), "{stdout}");
    assert!(stdout.contains("memory in N-ths"), "{stdout}");
    for name in ["synthesized", "dualpipev", "zbv", "zb1p", "dualpipe "] {
        assert!(stdout.contains(name), "{name} in {stdout}");
    }
    assert!(stdout.contains("started from "), "{stdout}");
}

#[test]
fn families_with_more_parameter_copies_are_not_compared_against() {
    // DualPipe holds two copies: the fastest here, but not what one copy (the default) allows.
    let output = dualpipe(&args(&[]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let row = stdout.lines().find(|l| l.starts_with("dualpipe ")).unwrap();
    assert!(row.ends_with("(more copies)"), "{stdout}");
    let last = stdout.lines().rfind(|l| !l.is_empty()).unwrap();
    assert!(
        last.contains("best family within the cap (dualpipev)"),
        "{stdout}"
    );
    // With --copies 2 it counts.
    let output = dualpipe(&args(&["--copies", "2", "--json"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let doc: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(doc["copies"], 2);
    let output = dualpipe(&args(&["--copies", "2"]));
    let stdout = text(&output.stdout);
    assert!(!stdout.contains("(more copies)"), "{stdout}");
    assert!(
        stdout.contains("best family within the cap (dualpipe)"),
        "{stdout}"
    );
}

#[test]
fn json_report_and_the_schedule_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.json");
    let out = out.to_str().unwrap();
    let output = dualpipe(&args(&["--memory-like", "dualpipev", "--json", "-o", out]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let doc: Value = serde_json::from_slice(&output.stdout).unwrap();
    let result = &doc["result"];
    assert_eq!(result["name"], "synthesized");
    let cap = doc["memory_cap"].as_f64().unwrap();
    assert!(result["peak_memory"].as_f64().unwrap() <= cap + 1e-9);
    let worst = result["blocking"]
        .as_f64()
        .unwrap()
        .max(result["async"].as_f64().unwrap());
    let start = doc["baselines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == doc["start"])
        .unwrap();
    assert!(
        worst
            <= start["blocking"]
                .as_f64()
                .unwrap()
                .max(start["async"].as_f64().unwrap())
    );
    let valid = dualpipe(&["validate", out]);
    assert!(valid.status.success(), "{}", text(&valid.stderr));
    // The same seed writes the same schedule; an existing file is kept without --force.
    let again = dualpipe(&args(&["--memory-like", "dualpipev", "-o", out]));
    assert_usage_error(&again, "already exists; pass --force");
    let forced = dualpipe(&args(&["--memory-like", "dualpipev", "-o", "-"]));
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_eq!(text(&forced.stdout), std::fs::read_to_string(out).unwrap());
    assert!(text(&forced.stderr).contains("synthesized"));
}

#[test]
fn usage_errors_name_the_flag() {
    let cases: [(&[&str], &str); 9] = [
        (&["-n", "2", "-c", "0"], "--microbatches 0"),
        (
            &["-n", "4", "-c", "6", "--start", "dualpipev"],
            "--start dualpipev",
        ),
        (
            &["-n", "4", "-c", "8", "--memory-cap", "0.5"],
            "--memory-cap",
        ),
        (
            &["-n", "4", "-c", "8", "--memory-cap=-2"],
            "--memory-cap -2",
        ),
        (&["-n", "4", "-c", "8", "--copies", "3"], "--copies 3"),
        (&["-n", "4", "-c", "8", "--stages", "6"], "--stages 6"),
        (
            &["-n", "4", "-c", "8", "--model-cost", "f=x"],
            "--model-cost",
        ),
        (
            &["-n", "4", "-c", "8", "--memory-like", "nope"],
            "--memory-like",
        ),
        (
            &["-n", "4", "-c", "8", "--costs", "/nonexistent/c.json"],
            "c.json",
        ),
    ];
    for (args, names) in cases {
        assert_usage_error(&dualpipe(&[&["synthesize"], args].concat()), names);
    }
}
