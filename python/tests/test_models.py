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


def test_measured_costs_are_the_same_on_every_rank(world2):
    a, b = world2.run(_models_cases.measured_costs)
    assert a == b
