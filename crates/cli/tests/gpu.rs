//! The GPU subcommands without a GPU: a clear message and exit code 2, never a panic; what
//! `gpu-info` reports of the libraries it looked for. Built without the `cuda` feature, the
//! same subcommands say that the build has no CUDA support, with the same exit code.

use std::io::Write;
use std::process::Command;

#[test]
#[cfg(feature = "cuda")]
fn bench_gpu_without_a_gpu_exits_with_code_2_skipped_with_gpu() {
    if let Ok(info) = dualpipe_cuda::probe(0) {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: a GPU is present ({info}); scripts/gpu_bench.sh runs the benchmark"
        );
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
        .args(["bench-gpu", "--steps", "1"])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: no GPU found: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// A machine with a GPU answers differently; these checks are for the no-GPU path.
fn gpu_present(test: &str) -> bool {
    match dualpipe_cuda::probe(0) {
        Ok(info) => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: a GPU is present ({info}); scripts/gpu_check.sh covers it"
            );
            true
        }
        Err(_) => false,
    }
}

#[test]
#[cfg(feature = "cuda")]
fn gpu_info_without_a_gpu_lists_every_place_looked_and_exits_with_code_2() {
    if gpu_present("gpu_info_without_a_gpu") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
        .arg("gpu-info")
        .env_remove("DUALPIPE_CUDA_LIBS")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.starts_with("error: no GPU found: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "libraries (DUALPIPE_CUDA_LIBS=<unset>):");
    for (line, stem) in
        lines[1..6]
            .iter()
            .zip(["libcuda", "libnvrtc", "libcublasLt", "libcublas", "libnccl"])
    {
        assert!(line.starts_with(&format!("  {stem}: ")), "{stdout}");
    }
    assert!(
        lines[1].starts_with(
            "  libcuda: the CUDA driver (libcuda.so) was not found; looked in: the loader's \
             search path"
        ),
        "{stdout}"
    );
    assert_eq!(lines.last(), Some(&"no GPU"), "{stdout}");
}

#[test]
#[cfg(feature = "cuda")]
fn gpu_info_names_each_file_of_dualpipe_cuda_libs_that_fails_to_load() {
    if gpu_present("gpu_info_names_each_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let libcuda = dir.path().join("libcuda.so.1");
    std::fs::write(&libcuda, b"not a library").unwrap();
    // A real library under NVRTC's name: it loads, but its SONAME is not one cudarc opens.
    let impostor = ["/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib64/libz.so.1"]
        .iter()
        .find(|p| std::path::Path::new(p).is_file())
        .map(|p| {
            let to = dir.path().join("libnvrtc.so.13");
            std::fs::copy(p, &to).unwrap();
            to
        });
    let out = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
        .arg("gpu-info")
        .env("DUALPIPE_CUDA_LIBS", dir.path())
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!("libraries (DUALPIPE_CUDA_LIBS={}):", dir.path().display())
    );
    assert!(
        lines[1].contains(&format!(
            "looked in: {} (DUALPIPE_CUDA_LIBS); the loader's search path",
            dir.path().display()
        )),
        "{stdout}"
    );
    assert!(
        lines[1].contains(&format!(
            "found but failed to load: {}: ",
            libcuda.display()
        )),
        "{stdout}"
    );
    if let Some(impostor) = impostor {
        assert!(
            lines[2].starts_with(&format!(
                "  libnvrtc: NVRTC was found at {}, but cudarc does not reach it",
                impostor.display()
            )),
            "{stdout}"
        );
    }
}

fn gpu_check_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu_check.sh")
}

fn write_executable(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The row of `check` in the table `gpu_check.sh` prints: its result and note.
fn row<'a>(stdout: &'a str, check: &str) -> Option<(&'a str, &'a str)> {
    stdout.lines().find_map(|line| {
        let rest = line.strip_prefix(check)?.trim_start();
        let (result, rest) = rest.split_once("  ")?;
        let note = rest.trim_start().split_once("  ").map_or("", |(_, n)| n);
        Some((result.trim(), note))
    })
}

#[test]
#[cfg(feature = "cuda")]
fn gpu_check_without_a_gpu_checks_nothing_and_exits_with_code_2() {
    if gpu_present("gpu_check_without_a_gpu") {
        return;
    }
    let bundle = tempfile::tempdir().unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_dualpipe"),
        bundle.path().join("dualpipe"),
    )
    .unwrap();
    let out = Command::new("bash")
        .arg(gpu_check_script())
        .arg(bundle.path())
        .env_remove("DUALPIPE_CUDA_LIBS")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.starts_with("libraries (DUALPIPE_CUDA_LIBS=<unset>):"),
        "{stdout}"
    );
    let (result, note) = row(&stdout, "gpu-info").expect("a gpu-info row");
    assert_eq!(result, "no GPU", "{stdout}");
    assert!(note.starts_with("error: no GPU found: "), "{note}");
    for check in [
        "gpu-tests",
        "backend-tests",
        "unit-tests",
        "memcheck",
        "bench-gpu",
        "torch-runtime",
    ] {
        assert_eq!(
            row(&stdout, check),
            Some(("skipped", "no GPU")),
            "{check}: {stdout}"
        );
    }
    assert!(
        stdout.trim_end().ends_with("no GPU: nothing was checked"),
        "{stdout}"
    );

    let missing = Command::new("bash")
        .arg(gpu_check_script())
        .arg(bundle.path().join("absent"))
        .output()
        .expect("bash runs");
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).starts_with("error: no bundle at "),
        "{missing:?}"
    );
}

#[test]
fn gpu_check_reports_a_failing_check_in_its_table_and_exits_with_code_1() {
    if gpu_present("gpu_check_reports_a_failing_check") {
        return;
    }
    // A stand-in bundle: its command reports a GPU, one runner of checks fails, one skips.
    let bundle = tempfile::tempdir().unwrap();
    let b = bundle.path();
    write_executable(
        &b.join("dualpipe"),
        "#!/bin/sh\ncase \"$1\" in\n  gpu-info) echo 'GPU 0 of 1: Stand-in (compute capability 9.0, 1 GiB)' ;;\n  bench-gpu) printf 'step\\t1.0\\tms\\n' ;;\nesac\n",
    );
    write_executable(
        &b.join("tests/gpu"),
        "#!/bin/sh\necho 'check copies ... FAILED'\necho 'GPU checks: 0 passed, 1 failed'\nexit 1\n",
    );
    write_executable(
        &b.join("tests/backends"),
        "#!/bin/sh\necho 'skipped: no GPU (stand-in); 3 GPU checks not run, none counted as passed'\n",
    );
    write_executable(
        &b.join("tests/dualpipe_cuda"),
        "#!/bin/sh\necho 'test result: ok. 27 passed; 0 failed'\n",
    );
    let out = Command::new("bash")
        .arg(gpu_check_script())
        .arg(b)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(
        row(&stdout, "gpu-info"),
        Some(("ok", "GPU 0 of 1: Stand-in (compute capability 9.0, 1 GiB)")),
        "{stdout}"
    );
    assert_eq!(
        row(&stdout, "gpu-tests"),
        Some(("FAIL", "GPU checks: 0 passed, 1 failed")),
        "{stdout}"
    );
    assert_eq!(row(&stdout, "backend-tests").map(|r| r.0), Some("skipped"));
    assert_eq!(
        row(&stdout, "unit-tests"),
        Some(("ok", "test result: ok. 27 passed; 0 failed"))
    );
    assert_eq!(row(&stdout, "bench-gpu").map(|r| r.0), Some("ok"));
    assert_eq!(
        row(&stdout, "torch-runtime"),
        Some(("skipped", "the bundle has no dualpipe_rs wheel"))
    );
    assert!(
        stdout.contains("--- gpu-tests (last 20 lines of "),
        "{stdout}"
    );
    assert!(stdout.contains("check copies ... FAILED"), "{stdout}");
}

#[test]
fn gpu_check_stops_within_its_budget_and_fails_what_it_could_not_run() {
    if gpu_present("gpu_check_stops_within_its_budget") {
        return;
    }
    let bundle = tempfile::tempdir().unwrap();
    let b = bundle.path();
    write_executable(
        &b.join("dualpipe"),
        "#!/bin/sh\necho 'GPU 0 of 1: Stand-in (compute capability 9.0, 1 GiB)'\n",
    );
    write_executable(&b.join("tests/gpu"), "#!/bin/sh\nexec sleep 60\n");
    let start = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(gpu_check_script())
        .arg(b)
        .env("DUALPIPE_CHECK_BUDGET", "11")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(40),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let (result, note) = row(&stdout, "gpu-tests").expect("a gpu-tests row");
    assert_eq!(result, "FAIL");
    assert!(note.starts_with("out of time: killed after "), "{note}");
    assert_eq!(
        row(&stdout, "backend-tests"),
        Some((
            "FAIL",
            "out of time: not started: 11 s budget spent (DUALPIPE_CHECK_BUDGET)"
        )),
        "{stdout}"
    );
}

/// The mechanism the search relies on, end to end: a library loaded by its full path from a
/// directory of DUALPIPE_CUDA_LIBS, or from a wheel's directory under python3's site-packages,
/// is the one cudarc then gets by name, through its SONAME. The stand-in NVRTC is compiled here
/// with the C compiler (skipped where there is none).
#[test]
#[cfg(feature = "cuda")]
fn a_library_of_dualpipe_cuda_libs_is_the_one_cudarc_opens() {
    if gpu_present("a_library_of_dualpipe_cuda_libs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("stand_in.c");
    std::fs::write(&source, "int dualpipe_stand_in(void) { return 1; }\n").unwrap();
    let library = dir.path().join("lib").join("libnvrtc.so.13");
    std::fs::create_dir_all(library.parent().unwrap()).unwrap();
    let compiled = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libnvrtc.so.13", "-o"])
        .arg(&library)
        .arg(&source)
        .status();
    if !compiled.is_ok_and(|s| s.success()) {
        let _ = writeln!(
            std::io::stderr(),
            "skipped a_library_of_dualpipe_cuda_libs_is_the_one_cudarc_opens: no C compiler"
        );
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
        .arg("gpu-info")
        .env("DUALPIPE_CUDA_LIBS", library.parent().unwrap())
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert_eq!(
        stdout.lines().nth(2),
        Some(
            format!(
                "  libnvrtc: {} (from DUALPIPE_CUDA_LIBS)",
                library.display()
            )
            .as_str()
        ),
        "{stdout}"
    );

    // The same library where PyTorch's wheels put it, under the site-packages `python3` lists.
    let site = dir.path().join("site-packages");
    let wheel = site.join("nvidia/cu13/lib/libnvrtc.so.13");
    std::fs::create_dir_all(wheel.parent().unwrap()).unwrap();
    std::fs::copy(&library, &wheel).unwrap();
    write_executable(
        &dir.path().join("bin/python3"),
        &format!("#!/bin/sh\necho '{}'\n", site.display()),
    );
    let path = format!(
        "{}:{}",
        dir.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
        .arg("gpu-info")
        .env_remove("DUALPIPE_CUDA_LIBS")
        .env("PATH", path)
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!(
        "  libnvrtc: {} (from Python site-packages)",
        wheel.display()
    );
    assert_eq!(stdout.lines().nth(2), Some(expected.as_str()), "{stdout}");
}

/// Built without the `cuda` feature: the GPU subcommands refuse with the stand-in's message
/// and exit code 2, look for no library, and never panic.
#[cfg(not(feature = "cuda"))]
mod without_cuda {
    use std::process::Command;

    const NOT_COMPILED: &str = "error: this build has no CUDA support";

    #[test]
    fn bench_gpu_says_the_build_has_no_cuda_support_and_exits_with_code_2() {
        let out = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
            .args(["bench-gpu", "--steps", "1"])
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with(NOT_COMPILED), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.stdout.is_empty());
    }

    #[test]
    fn gpu_info_looks_for_no_library_and_exits_with_code_2() {
        let out = Command::new(env!("CARGO_BIN_EXE_dualpipe"))
            .arg("gpu-info")
            .env_remove("DUALPIPE_CUDA_LIBS")
            .output()
            .expect("the binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
        assert!(stderr.starts_with(NOT_COMPILED), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines[..2],
            [
                "libraries (DUALPIPE_CUDA_LIBS=<unset>):",
                "  none looked for (built without CUDA support)"
            ],
            "{stdout}"
        );
    }
}

/// `dualpipe run` with the given arguments and launch variables (the others removed).
fn run_with(args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dualpipe"));
    command.arg("run").args(args);
    for name in dualpipe_cuda::launch::VARIABLES {
        command.env_remove(name);
    }
    command.env_remove(dualpipe_cuda::launch::RENDEZVOUS_PORT_VAR);
    command.envs(vars.iter().copied());
    let out = command.output().expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const PLAN: [&str; 6] = ["-s", "dualpipev", "-n", "2", "-c", "4"];

#[test]
fn run_on_cuda_without_a_gpu_exits_with_code_2() {
    if gpu_present("run_on_cuda_without_a_gpu_exits_with_code_2") {
        return;
    }
    let (code, _, stderr) = run_with(
        &[&PLAN[..], &["--device", "cuda", "--steps", "1"]].concat(),
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.starts_with("error: --device cuda: "), "{stderr}");
    #[cfg(feature = "cuda")]
    assert!(
        stderr.starts_with("error: --device cuda: no GPU found: "),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_launch_without_its_variables_names_the_first_missing_one() {
    let launch = [&PLAN[..], &["--device", "cuda", "--launch"]].concat();
    let (code, stdout, stderr) = run_with(&launch, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: --launch: RANK is not set"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    let (code, _, stderr) = run_with(
        &launch,
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "two"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: --launch: WORLD_SIZE=\"two\""),
        "{stderr}"
    );
    let (code, _, stderr) = run_with(
        &launch,
        &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: --launch: MASTER_PORT is not set"),
        "{stderr}"
    );
    let (code, _, stderr) = run_with(
        &launch,
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
            ("DUALPIPE_RENDEZVOUS_PORT", "29500"),
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: --launch: DUALPIPE_RENDEZVOUS_PORT=\"29500\""),
        "{stderr}"
    );
}

#[test]
fn gpu_options_need_device_cuda() {
    for extra in [&["--launch"][..], &["--gpu", "1"][..]] {
        let (code, _, stderr) = run_with(&[&PLAN[..], extra].concat(), &[]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.starts_with("error: --launch and --gpu need --device cuda"),
            "{stderr}"
        );
    }
    let (code, _, stderr) = run_with(
        &[&PLAN[..], &["--device", "cuda", "--trace", "t.json"]].concat(),
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("are for CPU runs"), "{stderr}");
    let (code, _, stderr) = run_with(&[&PLAN[..], &["--device", "tpu"]].concat(), &[]);
    assert_eq!(code, Some(2), "{stderr}");
}

/// `gpu_bench.sh` hands the options both sides take (`--steps`, `--warmup`, `--large-rows`)
/// to torch's script as well as to `bench-gpu`, so both measure the same thing.
#[test]
fn gpu_bench_passes_the_shared_options_to_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("dualpipe");
    write_executable(&bin, "#!/bin/sh\necho \"ours: $*\"\n");
    let python = dir.path().join("path/python3");
    write_executable(
        &python,
        "#!/bin/sh\nshift\ncat \"$1\"\nshift\necho \"torch: $*\"\n",
    );
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu_bench.sh");
    let path = format!(
        "{}:{}",
        python.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg(&bin)
        .args([
            "--steps",
            "5",
            "--device",
            "1",
            "--warmup=2",
            "--large-rows",
            "64",
        ])
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "ours: bench-gpu --steps 5 --device 1 --warmup=2 --large-rows 64\ntorch: --steps 5 --warmup=2 --large-rows 64",
        "bench-gpu's output goes to the torch script, which gets the shared options"
    );
}
