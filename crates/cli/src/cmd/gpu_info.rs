//! `dualpipe gpu-info`: what the CUDA backend finds on this machine: each library it loads
//! with the file and where it came from (or every place looked), the driver's CUDA version
//! and the GPUs.

use std::fmt::Write as _;

use dualpipe_cuda::detect::LIBS_VAR;
use dualpipe_cuda::report;

use crate::cmd::bench_gpu::gpu_failure;
use crate::io::{Failure, write_stdout};

/// Show the CUDA libraries the backend loads (file and source, or every place looked), the
/// driver's CUDA version and the GPUs. Libraries are looked for in the directories of
/// DUALPIPE_CUDA_LIBS (colon-separated), then on the loader's search path, then in the
/// NVIDIA wheels under the site-packages of `python3`.
#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  dualpipe gpu-info
  DUALPIPE_CUDA_LIBS=/opt/cuda/lib64 dualpipe gpu-info

Exit codes: 0 a usable GPU, 1 a GPU the backend cannot use (a library missing, a driver
that fails), 2 usage error or no GPU (no driver, no device).")]
pub struct Args {}

pub fn run(_args: Args) -> Result<(), Failure> {
    let report = report();
    let mut out = String::new();
    let var = std::env::var(LIBS_VAR).unwrap_or_default();
    let _ = writeln!(
        out,
        "libraries ({LIBS_VAR}={}):",
        if var.is_empty() { "<unset>" } else { &var }
    );
    if report.libraries.is_empty() {
        let _ = writeln!(out, "  none looked for (built without CUDA support)");
    }
    for library in &report.libraries {
        let _ = writeln!(out, "  {library}");
    }
    if let Some((major, minor)) = report.driver_version {
        let _ = writeln!(out, "driver: supports CUDA {major}.{minor}");
    }
    match report.devices {
        Ok(devices) => {
            for device in devices {
                let _ = writeln!(out, "{device}");
            }
            write_stdout(&out)
        }
        Err(error) => {
            let _ = writeln!(
                out,
                "{}",
                if error.is_no_gpu() {
                    "no GPU"
                } else {
                    "a GPU, but unusable"
                }
            );
            write_stdout(&out)?;
            Err(gpu_failure(error))
        }
    }
}
