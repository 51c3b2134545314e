//! The shared backend test bodies (`dualpipe_reference::suite`) on the CUDA backend (virtual
//! ranks on GPU 0).
//! Without a GPU the runner prints "skipped: no GPU" and counts nothing as passed
//! (docs/gpu.md).

mod runner;

use std::process::ExitCode;

use dualpipe_cuda::{CudaReference, GpuConfig};

fn backend() -> CudaReference {
    CudaReference::new(GpuConfig::default()).expect("the GPU backend starts")
}

fn main() -> ExitCode {
    let gpu = CudaReference::new(GpuConfig::default()).map(|_| ());
    let checks = dualpipe_reference::backend_checks!(
        backend();
        every_family_matches_the_single_process_run,
        forward_only_outputs_match_bitwise,
        a_larger_model_matches_too,
    );
    runner::run(
        checks
            .into_iter()
            .map(|(name, run)| runner::Check { name, run })
            .collect(),
        gpu,
    )
}
