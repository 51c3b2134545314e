//! The executor's shared backend test bodies on the CUDA backend (virtual ranks on GPU 0).
//! Without a GPU each test writes "skipped: no GPU" to the terminal and returns: read its
//! `ok` as "did not run", never as "passed" (docs/gpu.md).

#[macro_use]
#[path = "../../executor/tests/shared/mod.rs"]
mod shared;

/// The backend, or `None` after saying on the terminal (past the test harness's capture) why
/// the test does not run here.
fn cuda_or_skip() -> Option<dualpipe_cuda::CudaReference> {
    match dualpipe_cuda::CudaReference::new(dualpipe_cuda::GpuConfig::default()) {
        Ok(backend) => Some(backend),
        Err(error) if error.is_no_gpu() => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no GPU ({error})");
            None
        }
        Err(error) => panic!("the GPU is there but unusable: {error}"),
    }
}

backend_tests!(
    cuda_skipped_without_gpu => super::cuda_or_skip();
    every_family_matches_the_single_process_run,
    forward_only_outputs_match_bitwise,
    a_larger_model_matches_too,
);
