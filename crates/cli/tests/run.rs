//! `dualpipe run` end to end: what it prints, what it refuses, and what it never overwrites.

mod common;

use common::{dualpipe, text};

use std::process::Output;

const SMALL: &[&str] = &["--hidden", "16", "--rows", "4", "--steps", "2"];

fn run_small(extra: &[&str]) -> Output {
    let mut args = vec!["run"];
    args.extend_from_slice(extra);
    args.extend_from_slice(SMALL);
    dualpipe(&args)
}

#[test]
fn trains_and_agrees_with_the_single_process_run() {
    for (family, n, c) in [
        ("dualpipe", "4", "8"),
        ("dualpipev", "2", "4"),
        ("zb1p", "3", "6"),
    ] {
        for model in ["blocking", "async"] {
            let out = run_small(&["-s", family, "-n", n, "-c", c, "--model", model]);
            let stdout = text(&out.stdout);
            assert!(
                out.status.success(),
                "{family} {model}: {}",
                text(&out.stderr)
            );
            assert!(stdout.contains("step   1  loss "), "{stdout}");
            assert!(stdout.contains("step   2  loss "), "{stdout}");
            assert!(
                stdout.contains("losses bitwise equal in 2 of 2 steps; gradients "),
                "{stdout}"
            );
            assert!(stdout.contains("bubble: "), "{stdout}");
            assert!(
                stdout.contains("simulated: ") && stdout.contains("% with the measured mean costs"),
                "{stdout}"
            );
            assert!(out.stderr.is_empty(), "no progress bar without a terminal");
        }
    }
}

#[test]
fn forward_only_compares_outputs() {
    let out = run_small(&["-s", "dualpipev", "-n", "2", "-c", "4", "--forward-only"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("forward only"), "{stdout}");
    assert!(stdout.contains("outputs bitwise equal"), "{stdout}");
}

#[test]
fn runs_a_schedule_file_and_writes_a_trace_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("v.json");
    let trace = dir.path().join("trace.json");
    let schedule_arg = schedule.to_str().unwrap();
    let trace_arg = trace.to_str().unwrap();
    let planned = dualpipe(&[
        "plan",
        "-s",
        "dualpipev",
        "-n",
        "2",
        "-c",
        "4",
        "-o",
        schedule_arg,
    ]);
    assert!(planned.status.success());

    let out = run_small(&[schedule_arg, "--trace", trace_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert!(written["traceEvents"].as_array().unwrap().len() > 10);

    std::fs::write(&trace, "mine").unwrap();
    let out = run_small(&[schedule_arg, "--trace", trace_arg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("already exists; pass --force"));
    assert!(out.stdout.is_empty(), "refused before running");
    assert_eq!(std::fs::read_to_string(&trace).unwrap(), "mine");

    let out = run_small(&[schedule_arg, "--trace", trace_arg, "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(std::fs::read_to_string(&trace).unwrap(), "mine");
}

#[test]
fn render_draws_the_trace_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("z.json");
    let other = dir.path().join("other.json");
    let trace = dir.path().join("trace.json");
    let (schedule_arg, other_arg, trace_arg) = (
        schedule.to_str().unwrap(),
        other.to_str().unwrap(),
        trace.to_str().unwrap(),
    );
    for (family, path) in [("zb1p", schedule_arg), ("1f1b", other_arg)] {
        let planned = dualpipe(&["plan", "-s", family, "-n", "2", "-c", "4", "-o", path]);
        assert!(planned.status.success(), "{}", text(&planned.stderr));
    }
    let out = run_small(&[schedule_arg, "--trace", trace_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = dualpipe(&["render", schedule_arg, "--trace", trace_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let drawn = text(&out.stdout);
    assert!(
        drawn.starts_with("zb1p: 2 ranks, 2 stages, 4 micro-batches; measured; step time "),
        "{drawn}"
    );
    assert!(drawn.contains(" us; "), "{drawn}");
    for rank in ["rank 0 ", "rank 1 "] {
        let row = drawn.lines().find(|l| l.starts_with(rank)).unwrap();
        assert!(row.contains("F0") && row.contains("W3"), "{drawn}");
    }

    let out = dualpipe(&[
        "render",
        schedule_arg,
        "--trace",
        trace_arg,
        "--format",
        "svg",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("measured, step time"));

    let out = dualpipe(&[
        "render",
        schedule_arg,
        "--trace",
        trace_arg,
        "--format",
        "chrome",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let spans = |v: &serde_json::Value| {
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X")
            .count()
    };
    assert_eq!(spans(&again), spans(&original));

    // The trace of another schedule, and costs beside a trace, are refused.
    let out = dualpipe(&["render", other_arg, "--trace", trace_arg]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("trace of another schedule"),
        "{}",
        text(&out.stderr)
    );
    let out = dualpipe(&[
        "render",
        schedule_arg,
        "--trace",
        trace_arg,
        "--cost",
        "f=2",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.json");
    let planned = dualpipe(&["plan", "-s", "1f1b", "-n", "2", "-c", "2"]);
    let mut doc: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    doc["ranks"][1].as_array_mut().unwrap().pop();
    std::fs::write(&broken, doc.to_string()).unwrap();
    let broken = broken.to_str().unwrap();

    // (arguments, exit code, part of the message)
    let cases: &[(&[&str], i32, &str)] = &[
        (&["run"], 2, "give a schedule file, or --schedule"),
        (
            &["run", "-s", "1f1b", "-n", "2"],
            2,
            "give a schedule file, or --schedule",
        ),
        (&["run", "x.json", "-s", "1f1b"], 2, "not both"),
        (
            &["run", "-s", "dualpipe", "-n", "3", "-c", "6"],
            2,
            "dualpipe needs an even number of ranks",
        ),
        (
            &["run", "-s", "1f1b", "-n", "2", "-c", "2", "--hidden", "0"],
            2,
            "must be at least 1",
        ),
        (
            &["run", "-s", "1f1b", "-n", "2", "-c", "2", "--steps", "0"],
            2,
            "must be at least 1",
        ),
        (
            &[
                "run", "-s", "1f1b", "-n", "2", "-c", "2", "--hidden", "100000",
            ],
            2,
            "GiB",
        ),
        (
            &[
                "run", "-s", "1f1b", "-n", "2", "-c", "2", "--model", "eager",
            ],
            2,
            "unknown model",
        ),
        (
            &["run", "-s", "1f1b", "-n", "2", "-c", "2", "--timeout", "0"],
            2,
            "--timeout must be",
        ),
        (
            &["run", "-s", "1f1b", "-n", "2", "-c", "2", "--lr=-1"],
            2,
            "--lr -1: the learning rate must be a positive number",
        ),
        (
            &["run", "-s", "1f1b", "-n", "2", "-c", "2", "--lr", "0"],
            2,
            "must be a positive number",
        ),
        (&["run", "missing.json"], 2, "cannot read missing.json"),
        (&["run", broken], 1, "invalid schedule"),
    ];
    for (args, code, says) in cases {
        let out = dualpipe(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn deep_pipelines_are_checked_not_refused() {
    // 64 stages: the reference model's gradient used to vanish at this depth, and the run
    // failed with "the reference gradient of w1 is zero".
    for (family, n, c) in [("dualpipev", "32", "64"), ("1f1b", "64", "64")] {
        let out = dualpipe(&[
            "run", "-s", family, "-n", n, "-c", c, "--hidden", "8", "--rows", "2", "--steps", "2",
        ]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{family}: {}", text(&out.stderr));
        assert!(
            stdout.contains("losses bitwise equal in 2 of 2 steps"),
            "{stdout}"
        );
    }
}

#[test]
fn divergence_is_reported_as_divergence() {
    let out = dualpipe(&[
        "run", "-s", "1f1b", "-n", "4", "-c", "8", "--lr", "50", "--steps", "20", "--hidden", "16",
        "--rows", "4",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the training diverged"), "{stderr}");
    assert!(stderr.contains("try a smaller --lr (now 50)"), "{stderr}");
    assert!(!stderr.contains("differs"), "{stderr}");
}

#[test]
fn measured_costs_are_written_as_a_cost_file_that_simulate_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("zb.json");
    let costs = dir.path().join("measured.json");
    let (schedule_arg, costs_arg) = (schedule.to_str().unwrap(), costs.to_str().unwrap());
    let planned = dualpipe(&[
        "plan",
        "-s",
        "zb1p",
        "-n",
        "2",
        "-c",
        "4",
        "-o",
        schedule_arg,
    ]);
    assert!(planned.status.success());

    let out = run_small(&[schedule_arg, "--costs-out", costs_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("(per stage, in ms; read it with simulate --costs)"),
        "{stdout}"
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&costs).unwrap()).unwrap();
    assert_eq!(written["unit"], "ms");
    // Measured at 4 rows per micro-batch: tune can scale the costs to other sizes.
    assert_eq!(written["microbatch_size"], 4.0);
    // 4 rows x 16 wide f32 activations; Linear(16, 64) and Linear(64, 16) per stage.
    assert_eq!(written["bytes"], 4.0 * 4.0 * 16.0);
    assert_eq!(
        written["param_bytes"],
        4.0 * (2.0 * 16.0 * 64.0 + 64.0 + 16.0)
    );
    let stages = written["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{written}");
    for (stage, entry) in stages.iter().enumerate() {
        assert_eq!(entry["stage"], stage);
        for kind in ["f", "b", "w"] {
            assert!(entry[kind].as_f64().unwrap() > 0.0, "{written}");
        }
    }

    // simulate reads it back, in ms, and finds the bubble run printed.
    let simulated = dualpipe(&["simulate", schedule_arg, "--costs", costs_arg, "--json"]);
    assert!(simulated.status.success(), "{}", text(&simulated.stderr));
    let report: serde_json::Value = serde_json::from_slice(&simulated.stdout).unwrap();
    assert_eq!(report["unit"], "ms");
    let bubble = format!(
        "simulated: {:.1}% with the measured mean costs per stage",
        100.0 * report["bubble_share"].as_f64().unwrap()
    );
    assert!(stdout.contains(&bubble), "{bubble}\n{stdout}");

    // tune reads it too and scales it to other micro-batch sizes (measure -> tune -> run).
    let tuned = dualpipe(&[
        "tune",
        "--ranks",
        "2",
        "--global-batch",
        "16",
        "--costs",
        costs_arg,
        "--json",
    ]);
    assert!(tuned.status.success(), "{}", text(&tuned.stderr));
    let table: serde_json::Value = serde_json::from_slice(&tuned.stdout).unwrap();
    assert_eq!(table["measured_microbatch_size"], 4.0, "{table}");
    let sizes: Vec<f64> = table["ranked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["microbatch_size"].as_f64().unwrap())
        .collect();
    assert!(sizes.contains(&2.0) && sizes.contains(&8.0), "{table}");

    // Never overwritten without --force, and refused before running.
    std::fs::write(&costs, "mine").unwrap();
    let out = run_small(&[schedule_arg, "--costs-out", costs_arg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("already exists; pass --force"));
    assert!(out.stdout.is_empty(), "refused before running");
    assert_eq!(std::fs::read_to_string(&costs).unwrap(), "mine");
    let out = run_small(&[schedule_arg, "--costs-out", costs_arg, "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(std::fs::read_to_string(&costs).unwrap(), "mine");

    let both = dir.path().join("both.json");
    let both = both.to_str().unwrap();
    let out = run_small(&[schedule_arg, "--costs-out", both, "--trace", both]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--trace and --costs-out both name"));
}
