"""Hugging Face causal LMs and nn.Sequential cut by split_model and run by Pipeline on gloo."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="transformers is installed by scripts/test.sh")

import _models_cases  # noqa: E402

FAMILIES = ["dualpipev", "dualpipe", "1f1b", "zbv"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_causal_lm_pipelined_equals_full_model(world2, arch):
    done = world2.run(_models_cases.pipelined_equals_full, arch, FAMILIES)
    assert done == [len(FAMILIES)] * 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(world2, reentrant):
    """transformers' gradient checkpointing inside the stages: a non-reentrant checkpoint is
    split like any graph, a reentrant one runs its whole backward at the B."""
    families = ["zbv", "dualpipev"]
    done = world2.run(_models_cases.pipelined_equals_full, "llama", families, reentrant)
    assert done == [len(families)] * 2


def test_measured_costs_are_the_same_on_every_rank(world2):
    a, b = world2.run(_models_cases.measured_costs)
    assert a == b


def test_train_lm_example_matches_one_process(tmp_path):
    """examples/train_lm.py --check on 2 CPU processes: the pipelined losses of the first
    steps equal the single-process run's, and the trace and log are written."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = os.path.join(root, "examples", "train_lm.py")
    log = tmp_path / "loss.csv"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         example, "--steps", "4", "--check", "--hidden", "48", "--layers", "4",
         "--loss-csv", str(log), "--trace", str(tmp_path / "trace.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "check: largest relative difference" in run.stdout and ": ok" in run.stdout, run.stdout
    assert (tmp_path / "trace.json").exists()
    assert log.read_text().startswith("step,loss,tokens_per_s\n")
