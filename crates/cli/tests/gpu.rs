//! The GPU subcommands without a GPU: a clear message and exit code 2, never a panic.

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
