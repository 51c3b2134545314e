//! The shared backend test bodies (`shared/mod.rs`) on the CPU backend.

#[macro_use]
mod shared;

backend_tests!(
    cpu => Some(dualpipe_executor::conformance::CpuReference);
    every_family_matches_the_single_process_run,
    forward_only_outputs_match_bitwise,
    a_larger_model_matches_too,
);
