//! The shared backend test bodies (`dualpipe_reference::suite`) on the CPU backend.

dualpipe_reference::backend_tests!(
    cpu => Some(dualpipe_reference::conformance::CpuReference);
    every_family_matches_the_single_process_run,
    forward_only_outputs_match_bitwise,
    a_larger_model_matches_too,
);
