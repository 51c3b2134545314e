//! The GPU subcommands without a GPU: a clear message and exit code 2, never a panic; what
//! `gpu-info` reports of the libraries it looked for.

use std::io::Write;
use std::process::Command;

#[test]
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
