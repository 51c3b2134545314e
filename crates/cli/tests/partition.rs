//! `dualpipe partition` end to end: the table, the JSON document, a planned or given schedule,
//! and usage errors (exit code 2) that say what is wrong.

mod common;

use common::{assert_usage_error, dualpipe_in as dualpipe, text};

fn layers(count: usize) -> String {
    let mut items: Vec<String> = (0..count)
        .map(|i| format!(r#"{{"name": "l{i}", "f": 1, "b": 2, "w": 1, "param_bytes": 100, "activation_bytes": 10}}"#))
        .collect();
    items[0] =
        r#"{"name": "embed", "f": 5, "b": 10, "w": 5, "param_bytes": 100, "activation_bytes": 10}"#
            .into();
    format!(r#"{{"unit": "ms", "layers": [{}]}}"#, items.join(", "))
}

#[test]
fn partitions_for_a_planned_schedule_and_a_schedule_file() {
    let args = [
        "partition",
        "--layers",
        "-",
        "-s",
        "dualpipev",
        "-n",
        "2",
        "-c",
        "8",
    ];
    let table = dualpipe(&args, Some(&layers(12)));
    assert!(table.status.success(), "{}", text(&table.stderr));
    let out = text(&table.stdout);
    assert!(
        out.contains("12 layers over dualpipev, 2 ranks, 4 stages, 8 micro-batches"),
        "{out}"
    );
    assert!(out.contains("equal-layer cut"), "{out}");
    assert!(out.contains("stage  layers"), "{out}");

    let json = dualpipe(&[&args[..], &["--json"]].concat(), Some(&layers(12)));
    assert!(json.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["objective"], "step");
    assert_eq!(doc["ranges"].as_array().unwrap().len(), 4);
    // The heavy first layer shares rank 0 with the last stage: rank 0 gets fewer layers.
    let ranges = doc["ranges"].as_array().unwrap();
    let count = |r: &serde_json::Value| r[1].as_u64().unwrap() - r[0].as_u64().unwrap();
    assert!(count(&ranges[0]) + count(&ranges[3]) < 6, "{ranges:?}");
    assert!(doc["predicted_step"].as_f64().unwrap() <= doc["equal_cut_step"].as_f64().unwrap());

    let dir = std::env::temp_dir().join(format!("dualpipe-partition-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schedule = dir.join("v.json");
    let plan = dualpipe(&["plan", "-s", "dualpipev", "-n", "2", "-c", "8"], None);
    std::fs::write(&schedule, &plan.stdout).unwrap();
    let from_file = dualpipe(
        &[
            "partition",
            "--layers",
            "-",
            schedule.to_str().unwrap(),
            "--json",
        ],
        Some(&layers(12)),
    );
    assert!(from_file.status.success(), "{}", text(&from_file.stderr));
    assert_eq!(from_file.stdout, json.stdout);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_say_what_and_where() {
    let plan = [
        "partition",
        "--layers",
        "-",
        "-s",
        "dualpipev",
        "-n",
        "4",
        "-c",
        "8",
    ];
    assert_usage_error(
        &dualpipe(&plan, Some(&layers(5))),
        "<stdin>: 5 layers cannot fill 8 stages",
    );
    assert_usage_error(
        &dualpipe(&plan, Some(r#"{"layers": [{"f": 1, "b": -2}]}"#)),
        "<stdin>: layers[0]: b is -2",
    );
    assert_usage_error(
        &dualpipe(&plan, Some(r#"{"layers": [{"f": 1, "b": 2, "flops": 1}]}"#)),
        "layers[0]: unknown field `flops`",
    );
    assert_usage_error(
        &dualpipe(
            &[&plan[..], &["--memory-cap", "100"]].concat(),
            Some(&layers(16)),
        ),
        "no cut keeps every rank within the memory cap of 100 bytes",
    );
    assert_usage_error(
        &dualpipe(&["partition", "--layers", "-"], Some(&layers(8))),
        "give a schedule file",
    );
    assert_usage_error(
        &dualpipe(
            &[
                "partition",
                "--layers",
                "missing.json",
                "-s",
                "1f1b",
                "-n",
                "2",
                "-c",
                "2",
            ],
            None,
        ),
        "cannot read missing.json",
    );
    assert_usage_error(
        &dualpipe(
            &[
                "partition",
                "--layers",
                "-",
                "-s",
                "dualpipe",
                "-n",
                "3",
                "-c",
                "8",
            ],
            Some(&layers(8)),
        ),
        "dualpipe needs",
    );
}

#[test]
fn help_has_examples() {
    let help = dualpipe(&["partition", "--help"], None);
    assert!(help.status.success());
    assert!(text(&help.stdout).contains("Examples:\n  dualpipe partition --layers layers.json"));
}
