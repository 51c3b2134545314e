//! The `dualpipe` command end to end: outputs, exit codes, messages, and no overwriting.

mod common;

use common::{assert_clean_error, dualpipe_in as dualpipe, text};

use std::process::Command;

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

#[test]
fn huge_costs_are_drawn_or_refused_never_a_panic_or_a_hang() {
    let v = "../../schedules/dualpipev-4x10.json";
    let out = dualpipe(
        &[
            "render",
            v,
            "--format",
            "text",
            "--cost",
            "f=1e15,b=2e15,w=1e15",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("step time 6.6e16"));
    for args in [
        &["simulate", v, "--cost", "f=1e308,b=1e308"][..],
        &["render", v, "--format", "svg", "--cost", "f=1e308,b=1e308"],
        &["render", v, "--format", "text", "--cost", "f=1e308,b=1e308"],
    ] {
        let out = dualpipe(args, None);
        assert_clean_error(&out, 2, "the costs are too large");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn sizes_beyond_the_planner_limit_are_refused_at_once() {
    let started = std::time::Instant::now();
    let out = dualpipe(&["plan", "-s", "1f1b", "-n", "1000", "-c", "100000"], None);
    assert_clean_error(&out, 2, "the planner takes at most 1048576");
    let out = dualpipe(&["plan", "-s", "1f1b", "-n", "256", "-c", "20000"], None);
    assert_clean_error(&out, 2, "runs 5120000 (stage, micro-batch) pairs");
    assert!(started.elapsed().as_secs_f64() < 5.0);
    // Nothing accepts this size: compare says why instead of printing an empty table.
    let out = dualpipe(&["compare", "-n", "100000", "-c", "200000"], None);
    assert_clean_error(&out, 2, "no schedule family accepts 100000 ranks");
    assert!(text(&out.stderr).contains("dualpipev: "));
    assert!(out.stdout.is_empty());
}

#[test]
fn chrome_flows_end_at_or_after_their_start() {
    for model in ["blocking", "async"] {
        let out = dualpipe(
            &[
                "render",
                "../../schedules/dualpipev-4x10.json",
                "--format",
                "chrome",
                "--model",
                model,
                "--cost",
                "comm=0.3",
            ],
            None,
        );
        assert!(out.status.success());
        let trace: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let events = trace["traceEvents"].as_array().unwrap();
        let mut starts = std::collections::HashMap::new();
        for e in events.iter().filter(|e| e["ph"] == "s") {
            starts.insert(e["id"].as_u64().unwrap(), e["ts"].as_f64().unwrap());
        }
        let ends: Vec<_> = events.iter().filter(|e| e["ph"] == "f").collect();
        assert!(!ends.is_empty());
        for e in ends {
            let start = starts[&e["id"].as_u64().unwrap()];
            assert!(e["ts"].as_f64().unwrap() >= start, "{model}: {e}");
        }
    }
}

#[test]
fn outputs_go_where_asked_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let plan = |output: &str, force: bool| {
        let mut args = vec!["plan", "-s", "1f1b", "-n", "2", "-c", "2", "-o", output];
        if force {
            args.push("--force");
        }
        let mut command = Command::new(env!("CARGO_BIN_EXE_dualpipe"));
        command.args(&args).current_dir(dir.path());
        command.output().unwrap()
    };
    // `-o -` is standard output, not a file named `-`.
    let out = plan("-", false);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("\"schedule\": \"1f1b\""));
    assert!(!dir.path().join("-").exists());
    // A device needs no --force.
    assert!(plan("/dev/null", false).status.success());
    // A directory is refused before any work, with or without --force.
    let here = dir.path().to_str().unwrap();
    assert_clean_error(&plan(here, true), 2, "is a directory");
    // A CSV read as a schedule says what to do, in the user's words.
    let csv = dir.path().join("s.csv");
    std::fs::write(&csv, "0F0,0B0\n").unwrap();
    let out = dualpipe(
        &["convert", csv.to_str().unwrap(), "--to", "torch-csv"],
        None,
    );
    assert_clean_error(&out, 1, "--from torch-csv");
    assert!(!text(&out.stderr).contains("RawSchedule"));
}

#[test]
fn plan_places_messages_for_the_costs_given() {
    let planned = |extra: &[&str]| {
        let mut args = vec!["plan", "-s", "zbv", "-n", "4", "-c", "32"];
        args.extend_from_slice(extra);
        let out = dualpipe(&args, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let makespan = |schedule: &str, model: &str| {
        let out = dualpipe(
            &[
                "simulate",
                "-",
                "--cost",
                "f=1,b=1,w=0.5",
                "--model",
                model,
                "--json",
            ],
            Some(schedule),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["makespan"].as_f64().unwrap()
    };
    let default = planned(&[]);
    let lowered = planned(&["--cost", "f=1,b=1,w=0.5"]);
    assert_ne!(default, lowered);
    assert!(makespan(&default, "blocking") > makespan(&default, "async"));
    assert_eq!(makespan(&lowered, "blocking"), makespan(&lowered, "async"));
    // Costs that name a stage the schedule does not have are refused.
    let file = std::env::temp_dir().join(format!("plan-costs-{}.json", std::process::id()));
    std::fs::write(&file, r#"{"stages": [{"stage": 5, "f": 2}]}"#).unwrap();
    let out = dualpipe(
        &[
            "plan",
            "-s",
            "1f1b",
            "-n",
            "2",
            "-c",
            "4",
            "--costs",
            file.to_str().unwrap(),
        ],
        None,
    );
    std::fs::remove_file(&file).ok();
    assert_clean_error(&out, 2, "stage 5");
}
