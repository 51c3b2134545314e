//! Cost units end to end: per-stage costs (`simulate`, `render`, `compare --cost`), whole-model
//! costs (`compare --model-cost`), units in every header and `--json` document, the cost-file
//! schema, and `run --costs-out` read back by `simulate --costs`.

mod common;

use std::path::Path;

/// Runs `dualpipe` with `args`, feeding `stdin`: exit code, stdout, stderr.
fn dualpipe(args: &[&str], stdin: &str) -> (i32, String, String) {
    let output = common::dualpipe_in(args, Some(stdin));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8 errors");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).expect("UTF-8 output"),
        stderr,
    )
}

fn ok(args: &[&str], stdin: &str) -> String {
    let (code, stdout, stderr) = dualpipe(args, stdin);
    assert_eq!(code, 0, "dualpipe {args:?} failed: {stderr}");
    stdout
}

fn fails(args: &[&str], stdin: &str, message: &str) {
    let (code, _, stderr) = dualpipe(args, stdin);
    assert_eq!(code, 2, "dualpipe {args:?}: {stderr}");
    assert!(
        stderr.contains(message),
        "dualpipe {args:?}: expected `{message}` in: {stderr}"
    );
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn planned(family: &str, n: u32, c: u32) -> String {
    ok(
        &[
            "plan",
            "-s",
            family,
            "-n",
            &n.to_string(),
            "-c",
            &c.to_string(),
        ],
        "",
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn row<'a>(report: &'a serde_json::Value, family: &str) -> &'a serde_json::Value {
    report["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["family"] == family)
        .unwrap_or_else(|| panic!("{family} missing: {report}"))
}

#[test]
fn simulate_and_compare_agree_on_per_stage_costs() {
    // The issue's example: DualPipeV 8x32 takes 206 in simulate (F=1 per stage) and 103 in
    // compare's default, whose whole-model costs give DualPipeV's 16 stages F=0.5 each.
    let v = planned("dualpipev", 8, 32);
    let simulated = json(&ok(&["simulate", "-", "--json"], &v));
    assert_eq!(simulated["makespan"], 206.0);
    assert_eq!(simulated["unit"], "");
    assert_eq!(simulated["costs_per"], "stage");

    let per_stage = json(&ok(
        &[
            "compare",
            "-n",
            "8",
            "-c",
            "32",
            "--cost",
            "f=1,b=2,w=1",
            "--json",
        ],
        "",
    ));
    assert_eq!(per_stage["costs_per"], "stage");
    assert_eq!(row(&per_stage, "dualpipev")["step_time"], 206.0);
    assert_eq!(
        row(&per_stage, "dualpipev")["stage_costs"],
        "f=1,b=2,w=1,fb=f+b,comm=0"
    );

    let model = json(&ok(&["compare", "-n", "8", "-c", "32", "--json"], ""));
    assert_eq!(model["costs_per"], "model");
    assert_eq!(model["costs"], "f=8,b=16,w=8,fb=f+b,comm=0");
    assert_eq!(row(&model, "dualpipev")["step_time"], 103.0);
    assert_eq!(
        row(&model, "dualpipev")["stage_costs"],
        "f=0.5,b=1,w=0.5,fb=f+b,comm=0"
    );
    // The default is --model-cost f=N,b=2N,w=N: the same numbers when spelled out.
    let spelled = json(&ok(
        &[
            "compare",
            "-n",
            "8",
            "-c",
            "32",
            "--model-cost",
            "f=8,b=16,w=8",
            "--json",
        ],
        "",
    ));
    assert_eq!(spelled["families"], model["families"]);
    // Twice the model, twice the step; messages are per message, not divided.
    let doubled = json(&ok(
        &[
            "compare",
            "-n",
            "4",
            "-c",
            "8",
            "--model-cost",
            "f=8,b=16,w=8,comm=0.5",
            "--json",
        ],
        "",
    ));
    assert_eq!(
        row(&doubled, "zbv")["stage_costs"],
        "f=1,b=2,w=1,fb=f+b,comm=0.5"
    );
}

#[test]
fn every_header_names_the_unit_and_the_basis() {
    let v = planned("1f1b", 2, 4);
    let table = ok(&["simulate", "-"], &v);
    assert!(
        table.contains("costs per stage in abstract units: f=1,b=2,w=1,fb=f+b,comm=0"),
        "{table}"
    );
    let table = ok(&["compare", "-n", "2", "-c", "4"], "");
    assert!(
        table.contains(
            "whole-model costs per micro-batch in abstract units: f=2,b=4,w=2,fb=f+b,comm=0 (f, b, w, fb divided over each family's stages; comm per message)"
        ),
        "{table}"
    );
    let table = ok(&["compare", "-n", "2", "-c", "4", "--cost", "f=2"], "");
    assert!(
        table.contains(
            "costs per stage in abstract units: f=2,b=2,w=1,fb=f+b,comm=0 (every family as given)"
        ),
        "{table}"
    );

    let dir = tempfile::tempdir().unwrap();
    let ms = write(
        dir.path(),
        "ms.json",
        r#"{"unit": "ms", "f": 0.5, "b": 1, "w": 0.5}"#,
    );
    let table = ok(&["simulate", "-", "--costs", &ms], &v);
    assert!(
        table.contains("costs per stage in ms: f=0.5,b=1,w=0.5"),
        "{table}"
    );
    assert!(table.contains("step time 7.5 ms, bubble"), "{table}");
    let report = json(&ok(&["simulate", "-", "--costs", &ms, "--json"], &v));
    assert_eq!(report["unit"], "ms");
    assert_eq!(report["makespan"], 7.5);
    let grid = ok(&["render", "-", "--costs", &ms], &v);
    assert!(
        grid.lines().next().unwrap().contains("step time 7.5 ms;"),
        "{grid}"
    );
    assert!(
        grid.lines().next().unwrap().ends_with("columns per ms"),
        "{grid}"
    );
    let svg = ok(&["render", "-", "--costs", &ms, "--format", "svg"], &v);
    assert!(svg.contains("step time 7.5 ms, bubble"));
    let compared = json(&ok(
        &["compare", "-n", "2", "-c", "4", "--costs", &ms, "--json"],
        "",
    ));
    assert_eq!(compared["unit"], "ms");
    assert!(
        ok(&["compare", "-n", "2", "-c", "4", "--costs", &ms], "")
            .contains("costs per stage in ms:")
    );
}

#[test]
fn chrome_traces_are_in_real_time_when_the_unit_is_named() {
    let v = planned("1f1b", 2, 2);
    let dir = tempfile::tempdir().unwrap();
    let duration = |args: &[&str]| {
        let trace = json(&ok(args, &v));
        trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["ph"] == "X" && e["tid"] == 0)
            .map(|e| e["dur"].as_f64().unwrap())
            .unwrap()
    };
    let abstract_units = duration(&["render", "-", "--format", "chrome"]);
    assert_eq!(abstract_units, 1000.0, "one abstract unit reads as 1 ms");
    let us = write(dir.path(), "us.json", r#"{"unit": "us"}"#);
    assert_eq!(
        duration(&["render", "-", "--format", "chrome", "--costs", &us]),
        1.0
    );
    let s = write(dir.path(), "s.json", r#"{"unit": "s"}"#);
    assert_eq!(
        duration(&["render", "-", "--format", "chrome", "--costs", &s]),
        1e6
    );
}

#[test]
fn compare_takes_per_stage_costs_and_skips_layouts_they_do_not_describe() {
    let dir = tempfile::tempdir().unwrap();
    // Four stages described: the families of 4 ranks with 4 stages run, the 8-stage ones are
    // skipped with the reason.
    let four = write(
        dir.path(),
        "four.json",
        r#"{"unit": "ms", "stages": [{"stage": 0, "f": 1.5}, {"stage": 3, "b": 3}]}"#,
    );
    let report = json(&ok(
        &["compare", "-n", "4", "-c", "8", "--costs", &four, "--json"],
        "",
    ));
    let ran: Vec<&str> = report["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["family"].as_str().unwrap())
        .collect();
    assert_eq!(ran, ["dualpipe", "1f1b", "gpipe", "zb1p"], "{report}");
    let skipped = report["not_applicable"].as_array().unwrap();
    assert_eq!(skipped.len(), 3, "{report}");
    assert_eq!(skipped[0]["family"], "dualpipev");
    assert_eq!(
        skipped[0]["reason"],
        "the per-stage costs describe 4 stages (entries up to stage 3), this family has 8"
    );
    // The same file through simulate gives the same 1F1B step, on the schedule planned (its
    // messages placed) for those costs, as compare plans it.
    let lowered = ok(
        &["plan", "-s", "1f1b", "-n", "4", "-c", "8", "--costs", &four],
        "",
    );
    let simulated = json(&ok(
        &["simulate", "-", "--costs", &four, "--json"],
        &lowered,
    ));
    assert_eq!(row(&report, "1f1b")["step_time"], simulated["makespan"]);
    let table = ok(&["compare", "-n", "4", "-c", "8", "--costs", &four], "");
    assert!(
        table.contains("not applicable: zbv: the per-stage costs describe 4 stages"),
        "{table}"
    );

    fails(
        &[
            "compare",
            "-n",
            "4",
            "-c",
            "8",
            "--model-cost",
            "f=1",
            "--costs",
            &four,
        ],
        "",
        "cannot be used with",
    );
    fails(
        &["compare", "-n", "4", "-c", "8", "--model-cost", "w=9"],
        "",
        "--model-cost: w (9) exceeds b (8)",
    );
}

#[test]
fn every_cost_file_shape_loads_and_errors_name_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let v = planned("zb1p", 2, 4);
    // The torch profiler's document, with and without its unit.
    let profiler = r#""f": 0.5, "b": 1.0, "w": 0.4, "fb": 1.3,
        "stages": [{"stage": 0, "f": 0.5, "b": 1.0, "w": 0.4, "fb": 1.3},
                   {"stage": 1, "f": 0.6, "b": 1.1, "w": 0.5, "fb": 1.4}]"#;
    let before = write(dir.path(), "before.json", &format!("{{{profiler}}}"));
    let after = write(
        dir.path(),
        "after.json",
        &format!("{{\"unit\": \"ms\", {profiler}}}"),
    );
    let a = json(&ok(&["simulate", "-", "--costs", &before, "--json"], &v));
    let b = json(&ok(&["simulate", "-", "--costs", &after, "--json"], &v));
    assert_eq!(a["makespan"], b["makespan"]);
    assert_eq!(
        (a["unit"].as_str(), b["unit"].as_str()),
        (Some(""), Some("ms"))
    );
    // The partitioner's layer file is a cost file too (its stage costs are the defaults).
    let layers = write(
        dir.path(),
        "layers.json",
        r#"{"unit": "ms", "layers": [
            {"name": "embed", "f": 1.0, "b": 2.0, "w": 1.0, "param_bytes": 4096, "activation_bytes": 1024},
            {"name": "head", "f": 0.5, "b": 1.0, "w": 0.5, "param_bytes": 4096, "activation_bytes": 512}]}"#,
    );
    let c = json(&ok(&["simulate", "-", "--costs", &layers, "--json"], &v));
    assert_eq!(c["unit"], "ms");

    for (text, message) in [
        (
            r#"{"layers": [{"name": "a", "f": 1, "b": 2, "w": 1}, {"name": "b", "f": -1, "b": 2, "w": 1}]}"#,
            "layers[1] (b): f is -1",
        ),
        (
            r#"{"stages": [{"stage": 0}, {"stage": 1, "w": 3}]}"#,
            "stages[1] (stage 1): w (3) exceeds b (2)",
        ),
        (r#"{"unit": "minutes"}"#, "unit `minutes` is not known"),
        (
            r#"{"stages": [{"stage": 0, "f": "x"}]}"#,
            "stages[0].f: invalid type",
        ),
    ] {
        let bad = write(dir.path(), "bad.json", text);
        fails(&["simulate", "-", "--costs", &bad], &v, message);
        fails(
            &["compare", "-n", "2", "-c", "4", "--costs", &bad],
            "",
            message,
        );
    }
}
