//! `dualpipe simulate`, `render`, `compare` and `convert` end to end: exit codes, outputs and
//! errors.

mod common;

/// What a run of `dualpipe` gave back.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `dualpipe` with `args`, feeding `stdin`.
fn dualpipe(args: &[&str], stdin: &str) -> Run {
    let output = common::dualpipe_in(args, Some(stdin));
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 output"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 errors"),
    }
}

/// Runs `dualpipe` and expects success.
fn ok(args: &[&str], stdin: &str) -> String {
    let run = dualpipe(args, stdin);
    assert_eq!(run.code, 0, "dualpipe {args:?} failed: {}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run.stdout
}

/// Runs `dualpipe` and expects exit `code` with `message` in the error.
fn fails(args: &[&str], stdin: &str, code: i32, message: &str) {
    let run = dualpipe(args, stdin);
    assert_eq!(run.code, code, "dualpipe {args:?}: {}", run.stderr);
    assert!(
        run.stderr.contains(message),
        "dualpipe {args:?}: expected `{message}` in: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
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

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn simulate_reports_the_readme_bubble() {
    let v = planned("dualpipev", 4, 10);
    let table = ok(&["simulate", "-"], &v);
    assert!(table.contains("step time 66,"), "{table}");
    let report = json(&ok(&["simulate", "-", "--json"], &v));
    assert_eq!(report["makespan"], 66.0);
    assert_eq!(report["model"], "blocking");
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (rank, r) in ranks.iter().enumerate() {
        assert_eq!(r["rank"], rank);
        assert_eq!(r["idle"], 6.0);
        assert_eq!(r["busy"], 60.0);
        assert_eq!(r["peak_activations"], 9);
        assert_eq!(r["peak_pending_w"], rank + 1);
    }
}

#[test]
fn simulate_takes_costs_models_and_files() {
    let v = planned("dualpipe", 4, 8);
    let blocking = json(&ok(&["simulate", "-", "--json", "--cost", "comm=0.5"], &v));
    let overlapped = json(&ok(
        &[
            "simulate", "-", "--json", "--cost", "comm=0.5", "--model", "async",
        ],
        &v,
    ));
    let (b, a) = (
        blocking["makespan"].as_f64().unwrap(),
        overlapped["makespan"].as_f64().unwrap(),
    );
    let base = json(&ok(&["simulate", "-", "--json"], &v))["makespan"]
        .as_f64()
        .unwrap();
    assert!(
        a <= b && b > base,
        "async {a}, blocking {b}, without latency {base}"
    );
    let dir = tempfile::tempdir().unwrap();
    let costs = dir.path().join("costs.json");
    std::fs::write(
        &costs,
        r#"{"f": 2, "b": 4, "w": 2, "stages": [{"stage": 0, "f": 3}]}"#,
    )
    .unwrap();
    let costs = costs.to_str().unwrap();
    let doubled = json(&ok(&["simulate", "-", "--json", "--costs", costs], &v));
    assert!(doubled["makespan"].as_f64().unwrap() > 2.0 * base);
    // --cost applies on top of the file.
    let patched = json(&ok(
        &[
            "simulate",
            "-",
            "--json",
            "--costs",
            costs,
            "--cost",
            "f=1,b=2,w=1",
        ],
        &v,
    ));
    assert!(patched["makespan"].as_f64().unwrap() < doubled["makespan"].as_f64().unwrap());
    let timeline = json(&ok(&["simulate", "-", "--json", "--timeline"], &v));
    let first = &timeline["instructions"][0][0];
    assert_eq!(first["instruction"], "F s0 m0");
    assert_eq!(
        (first["start"].as_f64(), first["end"].as_f64()),
        (Some(0.0), Some(1.0))
    );
}

#[test]
fn simulate_errors_have_exit_codes() {
    let v = planned("1f1b", 2, 2);
    fails(
        &["simulate", "-", "--cost", "f=x"],
        &v,
        2,
        "`x` is not a number",
    );
    fails(
        &["simulate", "-", "--cost", "w=5"],
        &v,
        2,
        "w (5) exceeds b (2)",
    );
    fails(
        &["simulate", "-", "--costs", "/nonexistent/c.json"],
        &v,
        2,
        "cannot read",
    );
    fails(
        &["simulate", "-", "--model", "eager"],
        &v,
        2,
        "invalid value 'eager'",
    );
    let dir = tempfile::tempdir().unwrap();
    let costs = dir.path().join("costs.json");
    std::fs::write(&costs, r#"{"stages": [{"stage": 9, "f": 3}]}"#).unwrap();
    fails(
        &["simulate", "-", "--costs", costs.to_str().unwrap()],
        &v,
        2,
        "override stage 9, but the schedule has 2 stages",
    );
    std::fs::write(&costs, r#"{"f": 1, "flops": 3}"#).unwrap();
    fails(
        &["simulate", "-", "--costs", costs.to_str().unwrap()],
        &v,
        2,
        "unknown field `flops`",
    );
    let broken = v.replacen(r#""op": "B""#, r#""op": "F""#, 1);
    fails(&["simulate", "-"], &broken, 1, "invalid schedule");
}

#[test]
fn render_text_is_a_time_scaled_grid() {
    let v = planned("dualpipev", 2, 4);
    let text = ok(&["render", "-", "--format", "text", "--columns", "3"], &v);
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("rank ")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    // Rank 0 starts with three forwards down the V, then the way back up (lower case), and
    // waits one time unit (three columns) before its first weight gradient.
    assert!(
        rows[0].starts_with("rank 0 F0 F1 F2 f0 i0 ...w0 "),
        "{text}"
    );
    // Rank 1 waits one time unit for its first input.
    assert!(rows[1].starts_with("rank 1 ...F0 "), "{text}");
    assert!(text.contains("step time 26"), "{text}");
    fails(
        &["render", "-", "--format", "svg", "--columns", "3"],
        &v,
        2,
        "--columns",
    );
}

#[test]
fn render_svg_has_every_compute_and_a_legend() {
    let v = planned("dualpipe", 8, 20);
    let svg = ok(&["render", "-", "--format", "svg"], &v);
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    // One box per F, B, W and one per half of an FB.
    let schedule = json(&v);
    let halves: usize = schedule["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|list| list.as_array().unwrap())
        .map(|i| match i["op"].as_str().unwrap() {
            "FB" => 2,
            "F" | "B" | "W" => 1,
            _ => 0,
        })
        .sum();
    assert_eq!(svg.matches("<title>").count(), halves);
    for legend in [
        "F forward",
        "B backward",
        "I backward, weights deferred",
        "W weight gradient",
    ] {
        assert!(svg.contains(legend), "{legend}");
    }
}

#[test]
fn render_chrome_is_a_trace_with_flows_inside_their_spans() {
    let v = planned("dualpipev", 4, 10);
    let trace = json(&ok(
        &[
            "render",
            "-",
            "--format",
            "chrome",
            "--cost",
            "comm=0.25",
            "--model",
            "async",
        ],
        &v,
    ));
    let events = trace["traceEvents"].as_array().unwrap();
    let spans: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert!(spans.iter().all(|e| e["dur"].as_f64().unwrap() >= 0.0));
    let inside = |e: &serde_json::Value| {
        let ts = e["ts"].as_f64().unwrap();
        spans.iter().any(|s| {
            let start = s["ts"].as_f64().unwrap();
            s["pid"] == e["pid"]
                && s["tid"] == e["tid"]
                && start <= ts
                && ts <= start + s["dur"].as_f64().unwrap()
        })
    };
    let starts: Vec<_> = events.iter().filter(|e| e["ph"] == "s").collect();
    let ends: Vec<_> = events.iter().filter(|e| e["ph"] == "f").collect();
    let sends = v.matches(r#""op": "send""#).count();
    assert_eq!((starts.len(), ends.len()), (sends, sends));
    for e in starts.iter().chain(&ends) {
        assert!(inside(e), "flow event outside every span: {e}");
    }
    // Compute spans: one time unit is one millisecond.
    let first = spans
        .iter()
        .find(|s| s["pid"] == 0 && s["tid"] == 0)
        .unwrap();
    assert_eq!(
        (first["ts"].as_f64(), first["dur"].as_f64()),
        (Some(0.0), Some(1000.0))
    );
}

#[test]
fn render_keeps_existing_files_unless_forced() {
    let v = planned("1f1b", 2, 2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.txt");
    std::fs::write(&out, "mine").unwrap();
    let path = out.to_str().unwrap();
    fails(
        &["render", "-", "-o", path],
        &v,
        2,
        "already exists; pass --force",
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "mine");
    ok(&["render", "-", "-o", path, "--force"], &v);
    assert!(std::fs::read_to_string(&out).unwrap().contains("rank 1"));
}

#[test]
fn compare_lines_up_every_family() {
    let report = json(&ok(&["compare", "-n", "4", "-c", "8", "--json"], ""));
    let rows = report["families"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["family"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {report}"))
    };
    assert_eq!(rows.len(), 7, "{report}");
    // 1F1B: 8 micro-batches of F + B = 3, plus the (N - 1)(F + B) bubble.
    assert_eq!(row("1f1b")["step_time"], 33.0);
    assert_eq!(row("1f1b")["peak_activations"], 4);
    // DualPipe: (N/2 - 1)(F&B + B - 3W) = 2; two copies of each stage.
    assert_eq!(row("dualpipe")["step_time"], 26.0);
    assert_eq!(row("dualpipe")["parameters_per_rank"], 2.0);
    // DualPipeV: 8 stages at half the cost each; one N-th of the model per rank.
    assert_eq!(row("dualpipev")["stages"], 8);
    assert_eq!(row("dualpipev")["parameters_per_rank"], 1.0);
    assert_eq!(row("dualpipev")["activation_memory"], 4.5);
    assert_eq!(row("zb1p")["step_time"], 27.0);
    assert!(report["not_applicable"].as_array().unwrap().is_empty());

    let odd = json(&ok(&["compare", "-n", "3", "-c", "5", "--json"], ""));
    let skipped = odd["not_applicable"].as_array().unwrap();
    let names: Vec<&str> = skipped
        .iter()
        .map(|s| s["family"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dualpipe", "dualpipev"], "{odd}");
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap()
            .contains("even number of ranks")
    );

    let table = ok(&["compare", "-n", "3", "-c", "5"], "");
    assert!(table.contains("not applicable: dualpipe:"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("zbv ")), "{table}");
}

#[test]
fn compare_skips_families_that_per_stage_costs_do_not_describe() {
    let dir = tempfile::tempdir().unwrap();
    let costs = dir.path().join("costs.json");
    std::fs::write(&costs, r#"{"stages": [{"stage": 0, "f": 3}]}"#).unwrap();
    fails(
        &[
            "compare",
            "-n",
            "2",
            "-c",
            "4",
            "--costs",
            costs.to_str().unwrap(),
        ],
        "",
        2,
        "no schedule family fits the costs for 2 ranks and 4 micro-batches",
    );
    fails(&["compare", "-n", "2"], "", 2, "--microbatches");
}

#[test]
fn convert_to_torch_and_back() {
    let v = planned("dualpipev", 4, 10);
    let csv = ok(&["convert", "-", "--to", "torch-csv"], &v);
    assert_eq!(csv.lines().count(), 4);
    assert!(
        csv.starts_with("0F0,0F1,0F2,0F3,0F4,0F5,0F6,7F0,7I0,7W0,7F1,"),
        "{csv}"
    );
    assert!(csv.contains(",(0F7;7B3)OVERLAP_F_B,"), "{csv}");
    let comms = ok(&["convert", "-", "--to", "torch-csv", "--with-comms"], &v);
    assert!(comms.starts_with("0F0,0SEND_F0,"), "{comms}");
    assert!(
        comms.contains("7RECV_F0") && comms.contains("7SEND_B0"),
        "{comms}"
    );
    let back = ok(
        &["convert", "-", "--from", "torch-csv", "--name", "dualpipev"],
        &csv,
    );
    let back = json(&back);
    assert_eq!(back["schedule"], "dualpipev");
    assert_eq!(back["num_stages"], 8);
    assert_eq!(back["pipelines"][0]["route"], json("[0,1,2,3,3,2,1,0]"));
    // What was imported validates and simulates.
    let report = json(&ok(&["simulate", "-", "--json"], &back.to_string()));
    assert_eq!(report["ranks"][0]["peak_activations"], 9);
}

#[test]
fn convert_errors_have_exit_codes() {
    let dualpipe = planned("dualpipe", 4, 8);
    fails(
        &["convert", "-", "--to", "torch-csv"],
        &dualpipe,
        2,
        "keeps two copies of a stage on two ranks",
    );
    fails(
        &["convert", "-", "--from", "torch-csv"],
        "0F0,0Q1\n",
        1,
        "column 2 `0Q1`",
    );
    fails(
        &["convert", "-", "--from", "torch-csv"],
        "0F0,0SEND_F0\n1F0\n",
        1,
        "give the compute-only CSV",
    );
    // Stage 1 never gets its input back from the stage 0 backward: a cycle.
    fails(
        &["convert", "-", "--from", "torch-csv"],
        "0B0,0F0\n1F0,1B0\n",
        1,
        "cannot",
    );
    fails(&["convert", "-"], "", 2, "--to <TO>|--from <FROM>");
    fails(
        &["convert", "-", "--from", "torch-csv", "--with-comms"],
        "",
        2,
        "--to torch-csv only",
    );
    fails(
        &["convert", "-", "--to", "torch-csv", "--name", "x"],
        "",
        2,
        "--from torch-csv only",
    );
    fails(
        &["convert", "-", "--to", "torch-csv", "--from", "torch-csv"],
        "",
        2,
        "cannot be used",
    );
}

#[test]
fn render_stays_small_with_large_costs() {
    let v = planned("dualpipe", 8, 20);
    let cost = ["--cost", "f=1500,b=3000,w=1500,fb=4000"];
    let text = ok(&[&["render", "-"][..], &cost[..]].concat(), &v);
    let widest = text.lines().map(str::len).max().unwrap();
    assert!(widest <= 1020, "{widest} columns");
    assert!(text.contains("F0 "), "{text}");
    let svg = ok(
        &[&["render", "-", "--format", "svg"][..], &cost[..]].concat(),
        &v,
    );
    assert!(svg.matches("<line").count() <= 120, "too many ticks");
    let tiny = ok(&["render", "-", "--columns", "0.25"], &v);
    assert!(tiny.contains("0.25 columns per time unit"), "{tiny}");
    fails(
        &["render", "-", "--columns", "0"],
        &v,
        2,
        "must be a positive number",
    );
}
