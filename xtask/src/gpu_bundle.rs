//! `cargo xtask gpu-bundle`: everything a GPU machine without Rust needs to run
//! `scripts/gpu_check.sh`, built here into `gpu-bundle/` (ignored by git):
//!
//! - `dualpipe`: the command line, release, stripped;
//! - `tests/gpu`, `tests/backends`, `tests/dualpipe_cuda`: the CUDA crate's test binaries
//!   (the GPU checks, the shared backend tests on the GPU, the crate's unit tests);
//! - `scripts/`: `gpu_check.sh`, `gpu_bench.sh`, `gpu_bench_torch.py`, `torch_gpu_check.py`;
//! - `wheels/`: the torch runtime's wheel (Python package `dualpipe_rs`), when
//!   `python/pyproject.toml` exists and maturin is installed in the virtual environment
//!   `$DUALPIPE_VENV` (default `~/.cache/dualpipe/venv`).
//!
//! Binaries build in `target/gpu-bundle` with symbols stripped, apart from everyday builds.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The most a bundle may weigh: what a GPU machine is sent must stay well under 64 MiB.
const LIMIT_BYTES: u64 = 48 << 20;

/// The scripts the check runs, copied from `scripts/`.
const SCRIPTS: [&str; 4] = [
    "gpu_check.sh",
    "gpu_bench.sh",
    "gpu_bench_torch.py",
    "torch_gpu_check.py",
];

pub fn run(root: &Path) -> Result<(), String> {
    let out = root.join("gpu-bundle");
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    for dir in ["tests", "scripts"] {
        std::fs::create_dir_all(out.join(dir)).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let target = root.join("target").join("gpu-bundle");
    let cargo = |args: &[&str]| {
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        command
            .current_dir(root)
            .args(args)
            .env("CARGO_TARGET_DIR", &target)
            .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
        command
    };

    println!("building the command line (release, stripped)");
    status(cargo(&[
        "build",
        "--release",
        "--locked",
        "-p",
        "dualpipe-cli",
    ]))?;
    copy(
        &target.join("release").join("dualpipe"),
        &out.join("dualpipe"),
    )?;

    println!("building the CUDA crate's tests (release, stripped)");
    let listing = output(cargo(&[
        "test",
        "--release",
        "--locked",
        "-p",
        "dualpipe-cuda",
        "--no-run",
        "--message-format=json",
    ]))?;
    let tests = test_executables(&listing);
    for name in ["gpu", "backends", "dualpipe_cuda"] {
        let path = tests
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| format!("cargo built no test binary named {name}"))?;
        copy(path, &out.join("tests").join(name))?;
    }

    for script in SCRIPTS {
        copy(
            &root.join("scripts").join(script),
            &out.join("scripts").join(script),
        )?;
    }

    wheel(root, &out)?;

    let bytes = size(&out);
    println!(
        "{}: {:.1} MiB in all",
        out.display(),
        bytes as f64 / f64::from(1 << 20)
    );
    if bytes > LIMIT_BYTES {
        return Err(format!(
            "the bundle weighs {:.1} MiB, over the {} MiB it may weigh",
            bytes as f64 / f64::from(1 << 20),
            LIMIT_BYTES >> 20
        ));
    }
    println!("on the GPU machine: gpu-bundle/scripts/gpu_check.sh");
    Ok(())
}

/// The torch runtime's wheel, when its package exists here and maturin is installed.
fn wheel(root: &Path, out: &Path) -> Result<(), String> {
    let python = root.join("python");
    if !python.join("pyproject.toml").is_file() {
        println!("note: no python/pyproject.toml; the bundle has no torch runtime wheel");
        return Ok(());
    }
    let venv = std::env::var_os("DUALPIPE_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dualpipe/venv")))
        .ok_or(
            "neither DUALPIPE_VENV nor HOME is set: no virtual environment to build the wheel",
        )?;
    let maturin = venv.join("bin").join("maturin");
    if !maturin.is_file() {
        println!(
            "note: no maturin in {}; the bundle has no torch runtime wheel",
            venv.display()
        );
        return Ok(());
    }
    println!("building the torch runtime wheel (maturin, release)");
    let wheels = out.join("wheels");
    let mut command = Command::new(&maturin);
    command
        .current_dir(&python)
        .args(["build", "--release", "--strip", "--out"])
        .arg(&wheels)
        .env("VIRTUAL_ENV", &venv);
    status(command)
}

/// `(name, executable)` of every test binary in cargo's JSON messages: integration tests by
/// their target name, the library's unit tests by the crate's.
fn test_executables(messages: &str) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for line in messages.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let executable = message.get("executable").and_then(|e| e.as_str());
        let is_test = message
            .pointer("/profile/test")
            .and_then(|t| t.as_bool())
            .unwrap_or(false);
        let name = message.pointer("/target/name").and_then(|n| n.as_str());
        if let (Some(executable), true, Some(name)) = (executable, is_test, name) {
            found.push((name.replace('-', "_"), PathBuf::from(executable)));
        }
    }
    found
}

fn status(mut command: Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(|e| format!("could not start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

fn output(mut command: Command) -> Result<String, String> {
    let shown = format!("{command:?}");
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("could not start {shown}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("{shown} failed ({})", output.status))
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

fn size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => size(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_binaries_are_named_by_target() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"dualpipe-cuda","kind":["lib"]},"profile":{"test":true},"executable":"/t/deps/dualpipe_cuda-1"}
{"reason":"compiler-artifact","target":{"name":"dualpipe-cuda","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"gpu","kind":["test"]},"profile":{"test":true},"executable":"/t/deps/gpu-2"}
not json
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executables(messages),
            vec![
                (
                    "dualpipe_cuda".to_string(),
                    PathBuf::from("/t/deps/dualpipe_cuda-1")
                ),
                ("gpu".to_string(), PathBuf::from("/t/deps/gpu-2")),
            ]
        );
    }
}
