"""The torch runtime on gloo: every family against a single-process run, the reference's
contract, errors, data parallel x pipeline parallel, and the profiler."""

from __future__ import annotations

import sys

import pytest

import _cases
import _faults


def test_every_family_two_ranks(world2):
    cases = [
        ("dualpipe", 2, 4, None),
        ("dualpipe", 2, 6, None),
        ("dualpipev", 2, 4, None),
        ("dualpipev", 2, 5, None),
        ("1f1b", 2, 3, None),
        ("gpipe", 2, 4, None),
        ("zb1p", 2, 4, None),
        ("zbv", 2, 4, None),
        ("interleaved-1f1b", 2, 4, 2),
    ]
    checks = world2.run(_cases.conformance, cases)
    assert checks[0] == checks[1] == 7 * len(cases)


def test_every_family_four_ranks(world4):
    cases = [
        ("dualpipe", 4, 8, None),
        ("dualpipev", 4, 8, None),
        ("1f1b", 4, 6, None),
        ("zb1p", 4, 8, None),
        ("zbv", 4, 8, None),
        ("interleaved-1f1b", 4, 8, 2),
    ]
    checks = world4.run(_cases.conformance, cases, 1)
    assert all(c == 5 * len(cases) for c in checks)


def test_uneven_micro_batches(world2):
    """9 rows in 4 micro-batches (3, 2, 2, 2): shapes are learnt per micro-batch."""
    checks = world2.run(_cases.conformance, [("1f1b", 2, 4, None), ("zbv", 2, 4, None)], 2, "block", 9)
    assert checks[0] == 14


def test_one_rank(world1):
    cases = [
        ("dualpipev", 1, 3, None),
        ("zbv", 1, 2, None),
        ("interleaved-1f1b", 1, 2, 3),
        ("1f1b", 1, 2, None),
    ]
    checks = world1.run(_cases.conformance, cases)
    assert checks[0] == 7 * len(cases)


def test_reference_stages_with_hook_and_store(world2):
    """The reference example's stages (deferred-W linears, the overlap hook)."""
    cases = [("dualpipe", 2, 4, None), ("dualpipev", 2, 6, None), ("zbv", 2, 4, None)]
    checks = world2.run(_cases.conformance, cases, 2, "hook")
    assert checks[0] == 7 * len(cases)


def test_reentrant_checkpoint_stages(world2):
    """Stages with a reentrant activation checkpoint (not split: whole backward at the B)
    under schedules that defer weight gradients."""
    cases = [("zbv", 2, 4, None), ("dualpipev", 2, 4, None)]
    checks = world2.run(_cases.conformance, cases, 1, "checkpoint")
    assert checks[0] == 5 * len(cases)


def test_frozen_parameters(world2):
    """Frozen layers beside trainable adapters (fine-tuning): the frozen get no gradient."""
    cases = [("zbv", 2, 4, None), ("dualpipev", 2, 4, None), ("dualpipe", 2, 4, None)]
    checks = world2.run(_cases.conformance, cases, 1, "lora")
    assert checks[0] == 5 * len(cases)


@pytest.mark.parametrize("family", ["dualpipev", "dualpipe"])
def test_autocast(world2, family):
    """Mixed precision: bfloat16 activations between ranks under torch.autocast."""
    assert sum(world2.run(_cases.autocast_case, family)) == 4


def _synthesized(tmp_path, n: int, c: int, seeds=(0,)):
    """Schedules the synthesiser writes for ``n`` ranks: under first and last layers twice as
    heavy (a cost file) and under uniform model costs with message latency, per seed."""
    import json
    import subprocess

    from test_core import dualpipe_bin

    binary = dualpipe_bin()
    if binary is None:
        pytest.skip("the dualpipe binary is not built (cargo build -p dualpipe-cli)")
    heavy = {"f": 1, "b": 2, "w": 1, "fb": 2.4, "activation_bytes": 1}
    light = {"f": 0.5, "b": 1, "w": 0.5, "fb": 1.2, "activation_bytes": 1}
    costs = tmp_path / f"uneven{n}.json"
    layers = [heavy] + [light] * (2 * n - 2) + [heavy]
    costs.write_text(
        json.dumps({"latency": 0.1, "stages": [dict(c, stage=i) for i, c in enumerate(layers)]})
    )
    docs = []
    for seed in seeds:
        for how in (["--costs", str(costs)], ["--model-cost", "f=4,b=8,w=4,fb=9.6,comm=0.1"]):
            run = subprocess.run(
                [binary, "synthesize", "-n", str(n), "-c", str(c), *how, "--seed", str(seed),
                 "--evaluations", "300", "-o", "-"],
                capture_output=True, text=True, timeout=120,
            )
            assert run.returncode == 0, run.stderr
            assert json.loads(run.stdout)["schedule"] == "synthesized"
            docs.append(run.stdout)
    return docs


def test_synthesized_schedules(world2, tmp_path):
    """Schedules the synthesiser writes (its own FB pairs and W placement, on 1F1B's layout
    and on DualPipeV's) run with the single-process run's losses, both execution models."""
    import json

    docs = _synthesized(tmp_path, 2, 6)
    stages = {json.loads(d)["num_stages"] for d in docs}
    assert stages == {2, 4}, stages
    checks = world2.run(_cases.conformance, docs, 1)
    assert checks[0] == 2 * len(docs)


def test_synthesized_schedules_on_four_ranks(world4, tmp_path):
    """More of the synthesiser's orders, on 4 ranks, two steps each (the first learns the
    shapes, the second runs with them known)."""
    docs = _synthesized(tmp_path, 4, 8, seeds=(4, 5))
    checks = world4.run(_cases.conformance, docs, 2)
    assert checks[0] == 4 * len(docs)


@pytest.mark.parametrize(
    "world_name, cases",
    [
        ("world2", [("dualpipev", 2, 4), ("dualpipe", 2, 4), ("zbv", 2, 4), ("zb1p", 2, 5)]),
        ("world4", [("dualpipe", 4, 8), ("dualpipev", 4, 8), ("1f1b", 4, 5)]),
    ],
)
def test_edited_schedules(request, world_name, cases):
    """Planned schedules with batches merged and messages moved (each edit kept only where
    the validator accepts it): the runtime runs any valid batch structure, two steps each."""
    world = request.getfixturevalue(world_name)
    docs = _cases.mutants(7, 6, cases)
    checks = world.run(_cases.conformance, docs, 2)
    assert checks[0] == 4 * len(docs)


def test_message_sent_and_returned_in_one_batch(world2):
    """The step that learns the shapes keeps a valid schedule free of deadlock where one
    batch sends a message and receives its return, which the peer sends a batch later."""
    assert world2.run(_cases.forward_only_document, _cases.ONE_BATCH_TURN) == [4, 4]


def test_reference_dualpipe_bitwise(world2):
    """A program written for the reference DualPipe, with only its imports and constructor
    changed, gets the reference's losses and gradients bit for bit."""
    pytest.importorskip("dualpipe", reason="the reference package (dualpipe==1.0.0) is needed")
    results = world2.run(_cases.against_reference, 2, 8)
    assert all(results)


def test_deferred_weight_gradient_is_really_deferred(world1):
    assert world1.run(_cases.deferral)[0]


def test_data_parallel_times_pipeline(world4):
    assert all(world4.run(_cases.dp_pp))


def test_profile(world2, tmp_path):
    summaries = world2.run(_cases.profile_case, str(tmp_path / "trace.json"), str(tmp_path / "costs.json"))
    assert summaries[0]["measured_bubble"] >= 0.0
    assert (tmp_path / "trace.json").exists()


def test_pipeline_is_freed_without_the_cycle_collector(world2):
    """No reference cycle: a finished Pipeline goes away with its last reference, so a
    program's process group is really released by destroy_process_group()."""
    assert world2.run(_cases.freed_without_gc) == [[True, True], [True, True]]


def test_fb_on_two_streams_one_rank(world1):
    """FB halves on different (stand-in) streams; results unchanged."""
    for family, c in (("dualpipev", 6), ("zbv", 4)):
        assert world1.run(_cases.fb_streams_case, family, c, "blocking")[0] >= 0


def test_fb_on_two_streams_two_ranks(world2):
    counts = world2.run(_cases.fb_streams_case, "dualpipev", 8, "async")
    assert sum(counts) > 0, "dualpipev on 2 ranks has FB pairs"
    counts = world2.run(_cases.fb_streams_case, "dualpipe", 4, "blocking")
    assert sum(counts) > 0, "dualpipe on 2 ranks has FB pairs"


def test_gloo_messages_are_posted_one_by_one(world1):
    assert world1.run(_cases.posted_one_by_one)[0]


def test_fb_streams_needs_cuda(world1):
    assert world1.run(_cases.fb_streams_refused)[0]


# ------------------------------------------------------------------- errors


def test_construction_errors(world2):
    errors = world2.run(_faults.construction)
    for rank, found in enumerate(errors):
        for name, (kind, message) in found.items():
            assert kind in ("ValueError", "TypeError", "PipelineError"), (name, kind, message)
            assert f"rank {rank}" in message or name == "not_a_schedule", (name, message)


def test_step_errors(world2):
    errors = world2.run(_faults.step_errors)
    for rank, found in enumerate(errors):
        for name, (kind, message) in found.items():
            assert f"rank {rank}" in message, (name, message)


def test_shape_change_fails_on_every_rank(world2):
    errors = world2.errors(_faults.shape_change)
    assert set(errors) == {0, 1}
    kinds = {r: e[0] for r, e in errors.items()}
    assert kinds == {0: "PipelineError", 1: "PipelineError"}
    assert "differs from what rank 1 expects" in errors[0][1]
    assert "rank 0 failed first" in errors[1][1]


def test_dead_peer_raises_within_timeout(world2):
    errors = world2.errors(_faults.dead_peer, timeout=60)
    assert 0 in errors and errors[0][0] == "PipelineError"
    assert "waited for" in errors[0][1]


def test_module_error_names_the_instruction(world2):
    errors = world2.errors(_faults.module_raises)
    assert set(errors) == {0, 1}
    assert "rank 1: instruction 2 (F s1 m0) failed: ValueError: this stage is broken" in errors[1][1]
    assert "rank 1 failed first" in errors[0][1]


def test_peers_report_the_root_cause_once(world4):
    errors = world4.errors(_faults.root_cause_once, timeout=60)
    assert set(errors) == {0, 1, 2, 3}
    cause = "rank 1: instruction 2 (F s1 m0) failed: ValueError: this stage is broken"
    assert cause in errors[1][1]
    for r in (0, 2, 3):
        message = errors[r][1]
        assert message.count("failed first") == 1, (r, message)
        assert message.count(cause) == 1 and "rank 1 failed first" in message, (r, message)


def test_failed_step_leaves_the_pipeline_unusable(world2):
    import json

    errors = world2.errors(_faults.failed_step_refuses_the_next, timeout=60)
    (first0, second0), (first1, second1) = (json.loads(errors[r][1]) for r in (0, 1))
    assert first0[0] == "PipelineError" and "pass their inputs" in first0[1]
    assert first1[0] == "PipelineError" and "of step 1 waited for" in first1[1]
    assert "rank 0 failed first" in first1[1] and "pass their inputs" in first1[1]
    # Rank 0's second call, whose messages rank 1's first call must not take, times out.
    assert second0[0] == "PipelineError" and "of step 2 waited for" in second0[1]
    assert second1[0] == "PipelineError"
    assert "step 1 failed" in second1[1] and "create a new Pipeline" in second1[1]


def test_example_runs_under_torchrun():
    """examples/torch_dualpipev.py, unchanged, on 4 CPU processes."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = os.path.join(root, "examples", "torch_dualpipev.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", example],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "losses equal bit for bit" in run.stdout, run.stdout


@pytest.mark.parametrize("extra", [[], ["--gloo-batch", "--runs", "2"]], ids=["one-run", "runs"])
def test_benchmark_script_runs(extra):
    """scripts/bench_torch.py, the benchmark docs/performance.md quotes, at a tiny size: every
    row of its table is there with a measured ratio (the timings themselves are not judged);
    with several runs, each run's ratio and their median."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "scripts", "bench_torch.py")
    run = subprocess.run(
        [sys.executable, script, "--steps", "1", "--hidden", "16", "--chunks", "4", *extra],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 5, run.stdout
    for row in rows:
        if extra:
            each = [float(r) for r in row[4].split(",")]
            assert len(each) == 2 and all(r > 0 for r in each), row
            assert row[2].strip().endswith(" ms") and row[3].strip().endswith(" ms"), row
            ratio = row[5].strip()
        else:
            ratio = row[4].strip()
        assert ratio.endswith("x") and float(ratio[:-1]) > 0, row
    if extra:
        assert "gloo loops SCHED_BATCH" in run.stdout, run.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="gloo loop policy: Linux only")
def test_gloo_loop_policy(world2):
    assert all(world2.run(_cases.gloo_loop_policy))


def test_ordered_exchanges(world2):
    from test_lead import LATE_LEADER

    assert all(world2.run(_cases.ordered_exchanges, LATE_LEADER))


def test_rank_mapping(world2):
    assert all(world2.run(_cases.mapped))


def test_device_mesh_groups(world4):
    assert all(world4.run(_cases.mesh_groups))
