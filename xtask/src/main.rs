//! `cargo xtask`: repository automation. Run with no arguments for help.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use dualpipe_planner::plan;

mod gpu_bundle;

const HELP: &str = "\
cargo xtask <task>

Tasks:
  schedules            regenerate schedules/ (the canonical schedules) and
                       docs/schedule-v1.schema.json
  mutations [N] [SEED] run N mutations of valid schedules (default 100000) and print how many
                       the validator rejected, accepted (each proven runnable by the
                       brute-force interpreter and simulated under both models) and
                       panicked on
  gpu-bundle           build into gpu-bundle/ what a GPU machine without Rust needs for
                       scripts/gpu_check.sh: the command line and the CUDA tests (release,
                       stripped), the scripts, and the torch runtime wheel when
                       python/pyproject.toml exists (maturin from $DUALPIPE_VENV)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("schedules") => schedules(),
        Some("mutations") => mutations(&args[1..]),
        Some("gpu-bundle") => gpu_bundle::run(&root()),
        None | Some("help" | "--help" | "-h") => {
            println!("{HELP}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository root")
        .to_path_buf()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    let unchanged = std::fs::read_to_string(path).is_ok_and(|old| old == text);
    if !unchanged {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn schedules() -> Result<(), String> {
    let dir = root().join("schedules");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for (file, request) in dualpipe_tests::canonical() {
        let valid = plan(&request).map_err(|e| format!("{file}: {e}"))?;
        write(&dir.join(file), &valid.schedule().to_json())?;
    }
    write(
        &root().join("docs").join("schedule-v1.schema.json"),
        &dualpipe_schedule::json_schema(),
    )?;
    Ok(())
}

fn mutations(args: &[String]) -> Result<(), String> {
    let count: u64 = match args.first() {
        Some(n) => n.parse().map_err(|_| format!("not a count: {n}"))?,
        None => 100_000,
    };
    let seed: u64 = match args.get(1) {
        Some(n) => n.parse().map_err(|_| format!("not a seed: {n}"))?,
        None => 0,
    };
    let start = Instant::now();
    let tally = dualpipe_tests::campaign(count, seed, &dualpipe_tests::simulates);
    let seconds = start.elapsed().as_secs_f64();
    println!("mutations: {count} (seed {seed}) in {seconds:.1} s");
    println!(
        "  rejected:  {:>8}  (of which the brute-force interpreter could run {})",
        tally.rejected, tally.rejected_but_runnable
    );
    println!(
        "  accepted:  {:>8}  (each run to the end by the brute-force interpreter and the simulator, both models)",
        tally.accepted
    );
    for example in &tally.stricter_examples {
        println!("    rejected, yet run by the interpreter: {example}");
    }
    println!("  panicked:  {:>8}", tally.panicked);
    println!("  failures:  {:>8}", tally.failures.len());
    for failure in tally.failures.iter().take(20) {
        println!("    {failure}");
    }
    if tally.failures.is_empty() && tally.panicked == 0 {
        Ok(())
    } else {
        Err("the mutation campaign found failures".into())
    }
}
