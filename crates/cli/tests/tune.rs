//! `dualpipe tune` end to end: the ranking, the memory cap, the best schedule written, the JSON
//! document, and usage errors (exit code 2) that say what is wrong.

mod common;

use common::{assert_usage_error, dualpipe, text};

use std::path::Path;

use serde_json::Value;

/// Per-sample costs of a model measured on 4 stages (2 GB of parameters each).
const COSTS: &str = r#"{"unit": "ms", "per": "sample", "f": 0.5, "b": 1.0, "w": 0.5,
    "latency": 0.05, "param_bytes": 2e9, "activation_bytes": 1e8,
    "stages": [{"stage": 0, "f": 0.25, "b": 0.5, "w": 0.25}, {"stage": 3, "f": 0.3}]}"#;

fn costs_file(dir: &Path, text: &str) -> String {
    let path = dir.join("costs.json");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn json(args: &[&str]) -> Value {
    let output = dualpipe(args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_ranking_is_by_step_time_and_names_its_basis() {
    let dir = tempfile::tempdir().unwrap();
    let costs = costs_file(dir.path(), COSTS);
    let output = dualpipe(&["tune", "-n", "4", "-g", "32", "--costs", &costs]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("global batch 32"), "{stdout}");
    assert!(
        stdout.contains("measured at micro-batches of 1 samples"),
        "{stdout}"
    );
    assert!(stdout.contains("peak mem (B)"), "{stdout}");
    assert!(stdout.contains("best: "), "{stdout}");
    // 1F1B has the file's 4 stages; DualPipeV's 8 come from the whole model.
    assert!(stdout.contains(" stages "), "{stdout}");
    assert!(stdout.contains(" model "), "{stdout}");
    assert!(
        stdout.contains("not applicable: dualpipe with C = 4, 2, 1"),
        "{stdout}"
    );

    let doc = json(&["tune", "-n", "4", "-g", "32", "--costs", &costs, "--json"]);
    let ranked = doc["ranked"].as_array().unwrap();
    assert!(ranked.len() > 10);
    for pair in ranked.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let (ta, tb) = (
            a["step_time"].as_f64().unwrap(),
            b["step_time"].as_f64().unwrap(),
        );
        assert!(
            ta < tb || (ta == tb && a["peak_memory"].as_f64() <= b["peak_memory"].as_f64()),
            "{a} before {b}"
        );
    }
    for row in ranked {
        let (mb, c) = (
            row["microbatch_size"].as_u64().unwrap(),
            row["microbatches"].as_u64().unwrap(),
        );
        assert_eq!(mb * c, 32);
        let per_sample = row["time_per_sample"].as_f64().unwrap();
        assert!((per_sample * 32.0 - row["step_time"].as_f64().unwrap()).abs() < 1e-9);
        let basis = row["basis"].as_str().unwrap();
        let stages = row["stages"].as_u64().unwrap();
        assert_eq!(basis, if stages == 4 { "stages" } else { "model" }, "{row}");
        let copies = row["parameter_copies"].as_f64().unwrap();
        let family = row["family"].as_str().unwrap();
        assert_eq!(
            copies,
            if family == "dualpipe" { 2.0 } else { 1.0 },
            "{row}"
        );
    }
    assert_eq!(doc["best"], ranked[0]);
    for key in [
        "ranks",
        "global_batch",
        "unit",
        "measured_microbatch_size",
        "memory_cap",
        "microbatch_sizes",
        "skipped_sizes",
        "over_cap",
        "not_applicable",
    ] {
        assert!(doc.get(key).is_some(), "{key} missing: {doc}");
    }
    assert_eq!(doc["unit"], "ms");
    assert_eq!(
        doc["microbatch_sizes"],
        serde_json::json!([1, 2, 4, 8, 16, 32])
    );
}

#[test]
fn the_memory_cap_drops_and_lists_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let costs = costs_file(dir.path(), COSTS);
    let args = ["tune", "-n", "4", "-g", "32", "--costs", &costs, "--json"];
    let all = json(&args);
    let capped = json(&[&args[..], &["--memory-cap", "3e9"]].concat());
    let ranked = capped["ranked"].as_array().unwrap();
    let over = capped["over_cap"].as_array().unwrap();
    assert!(!ranked.is_empty() && !over.is_empty());
    assert!(
        ranked
            .iter()
            .all(|r| r["peak_memory"].as_f64().unwrap() <= 3e9)
    );
    assert!(
        over.iter()
            .all(|r| r["peak_memory"].as_f64().unwrap() > 3e9)
    );
    // DualPipe holds two 2 GB copies: over the cap at any size.
    assert!(ranked.iter().all(|r| r["family"] != "dualpipe"));
    assert!(over.iter().any(|r| r["family"] == "dualpipe"));
    assert_eq!(
        ranked.len() + over.len(),
        all["ranked"].as_array().unwrap().len()
    );

    let output = dualpipe(&[
        "tune",
        "-n",
        "4",
        "-g",
        "32",
        "--costs",
        &costs,
        "--memory-cap",
        "3e9",
    ]);
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("over the memory cap, least memory first:"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "dualpipe at micro-batches of 1 (C = 32): 4500000000 bytes = 4000000000 parameters"
        ),
        "{stdout}"
    );

    let output = dualpipe(&[
        "tune",
        "-n",
        "4",
        "-g",
        "32",
        "--costs",
        &costs,
        "--memory-cap",
        "1e9",
    ]);
    assert_usage_error(
        &output,
        "nothing fits the memory cap of 1000000000 bytes; the least any candidate needs is 2400000000 bytes",
    );
}

#[test]
fn the_best_schedule_is_written_and_valid() {
    let dir = tempfile::tempdir().unwrap();
    let costs = costs_file(dir.path(), COSTS);
    let out = dir.path().join("best.json");
    let out = out.to_str().unwrap();
    let doc = json(&[
        "tune", "-n", "4", "-g", "32", "--costs", &costs, "--json", "-o", out,
    ]);
    let output = dualpipe(&["validate", out]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let schedule: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_eq!(schedule["schedule"], doc["best"]["family"]);
    assert_eq!(schedule["num_microbatches"], doc["best"]["microbatches"]);
    // Never overwritten without --force.
    let again = dualpipe(&["tune", "-n", "4", "-g", "32", "--costs", &costs, "-o", out]);
    assert_usage_error(&again, "already exists; pass --force");
    let forced = dualpipe(&[
        "tune", "-n", "4", "-g", "32", "--costs", &costs, "-o", out, "--force",
    ]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
}

#[test]
fn the_synthesiser_is_ranked_as_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let costs = costs_file(dir.path(), COSTS);
    let out = dir.path().join("best.json");
    let out = out.to_str().unwrap();
    let doc = json(&[
        "tune",
        "-n",
        "2",
        "-g",
        "8",
        "--microbatch-sizes",
        "1,2",
        "--costs",
        &costs,
        "--synthesize",
        "2",
        "--json",
        "-o",
        out,
    ]);
    let ranked = doc["ranked"].as_array().unwrap();
    let synthesized: Vec<&Value> = ranked
        .iter()
        .filter(|r| r["family"] == "synthesized")
        .collect();
    assert_eq!(synthesized.len(), 2, "one row per micro-batch size: {doc}");
    for pair in ranked.windows(2) {
        assert!(pair[0]["step_time"].as_f64() <= pair[1]["step_time"].as_f64());
    }
    let output = dualpipe(&["validate", out]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let schedule: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_eq!(schedule["schedule"], doc["best"]["family"]);
    // The table shows it too.
    let output = dualpipe(&[
        "tune",
        "-n",
        "2",
        "-g",
        "8",
        "--microbatch-sizes",
        "2",
        "--costs",
        &costs,
        "--synthesize",
        "1",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("synthesized"));
}

#[test]
fn usage_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let costs = costs_file(dir.path(), COSTS);
    let run = |extra: &[&str]| dualpipe(&[&["tune", "--costs", &costs][..], extra].concat());
    assert_usage_error(
        &run(&["-n", "4", "-g", "6", "--microbatch-sizes", "4,5"]),
        "no micro-batch size given (4, 5) divides the global batch of 6 samples; its divisors are 1, 2, 3, 6",
    );
    assert_usage_error(
        &run(&["-n", "0", "-g", "8"]),
        "no schedule family accepts 0 ranks",
    );
    assert_usage_error(
        &run(&["-n", "4", "-g", "0"]),
        "the global batch is 0 samples",
    );
    assert_usage_error(
        &run(&["-n", "4", "-g", "8", "--synthesize=-1"]),
        "--synthesize -1: give a number of seconds",
    );
    assert_usage_error(
        &run(&["-n", "4", "-g", "8", "--memory-cap=-1"]),
        "the memory cap is -1",
    );
    // A skipped size is named, the others tried.
    let output = run(&["-n", "2", "-g", "8", "--microbatch-sizes", "2,3"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout)
            .contains("skipped micro-batch sizes 3: they do not divide the global batch of 8")
    );

    let bad = costs_file(
        dir.path(),
        r#"{"per": "sample", "stages": [{"stage": 0, "f": -1}]}"#,
    );
    assert_usage_error(
        &dualpipe(&["tune", "-n", "2", "-g", "8", "--costs", &bad]),
        "costs.json: stages[0] (stage 0): f is -1",
    );
    let unsized_costs = costs_file(dir.path(), r#"{"f": 1}"#);
    let output = dualpipe(&["tune", "-n", "2", "-g", "8", "--costs", &unsized_costs]);
    assert_usage_error(
        &output,
        "costs.json: the costs do not say the micro-batch size",
    );
    assert_usage_error(&output, "or pass --measured-at SAMPLES");
    let output = dualpipe(&[
        "tune",
        "-n",
        "2",
        "-g",
        "8",
        "--costs",
        &unsized_costs,
        "--measured-at",
        "2",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("measured at micro-batches of 2 samples"));
    let missing = dir.path().join("nope.json");
    assert_usage_error(
        &dualpipe(&[
            "tune",
            "-n",
            "2",
            "-g",
            "8",
            "--costs",
            missing.to_str().unwrap(),
        ]),
        "nope.json",
    );
}
