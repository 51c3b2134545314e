"""`dualpipe_rs.tune`: the document `dualpipe tune --json` prints, plus the best schedule
planned, from measured costs in any form the other calls take."""

from __future__ import annotations

import json
import subprocess

import pytest

import dualpipe_rs
from test_partition import dualpipe_bin

COSTS = {
    "unit": "ms",
    "microbatch_size": 2,
    "f": 1.0,
    "b": 2.0,
    "w": 1.0,
    "fb": 2.6,
    "latency": 0.05,
    "param_bytes": 4e6,
    "activation_bytes": 1e5,
}


def test_ranks_every_family_and_size():
    report = dualpipe_rs.tune(COSTS, ranks=4, global_batch=32)
    assert report["microbatch_sizes"] == [1, 2, 4, 8, 16, 32]
    assert report["measured_microbatch_size"] == 2.0 and report["unit"] == "ms"
    ranked = report["ranked"]
    times = [row["step_time"] for row in ranked]
    assert times == sorted(times) and times, ranked
    assert report["best"] == ranked[0]
    assert {row["family"] for row in ranked} >= {"dualpipe", "dualpipev", "1f1b", "zbv"}
    for row in ranked:
        assert row["microbatch_size"] * row["microbatches"] == 32, row
    best = report["schedule"]
    assert isinstance(best, dualpipe_rs.Schedule)
    assert best.num_ranks == 4 and best.num_microbatches == ranked[0]["microbatches"]
    assert best.name == ranked[0]["family"], (best.name, ranked[0])


def test_same_document_as_the_cli(tmp_path):
    binary = dualpipe_bin()
    if binary is None:
        pytest.skip("the dualpipe binary is not built (cargo build -p dualpipe-cli)")
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(COSTS))
    args = ["tune", "-n", "4", "-g", "16", "--costs", str(path), "--memory-cap", "2e7", "--json"]
    cli = subprocess.run([binary, *args], capture_output=True, text=True, check=True)
    ours = dualpipe_rs.tune(path, 4, 16, memory_cap=2e7)
    schedule = ours.pop("schedule")
    assert ours == json.loads(cli.stdout)
    assert schedule.to_json() == dualpipe_rs.tune(COSTS, 4, 16, memory_cap=2e7)["schedule"].to_json()


def test_memory_cap_and_model():
    tight = dualpipe_rs.tune(COSTS, 4, 16, memory_cap=1.0)
    assert tight["ranked"] == [] and tight["best"] is None and tight["schedule"] is None
    assert tight["over_cap"], tight
    blocking = dualpipe_rs.tune(COSTS, 4, 16, microbatch_sizes=[2, 4, 3])
    assert blocking["microbatch_sizes"] == [2, 4] and blocking["skipped_sizes"] == [3]
    asynchronous = dualpipe_rs.tune(COSTS, 4, 16, microbatch_sizes=[2, 4], model="async")
    assert asynchronous["model"] == "async" and blocking["model"] == "blocking"
    assert asynchronous["best"]["step_time"] <= blocking["best"]["step_time"] + 1e-9


def test_errors():
    unsized = {k: v for k, v in COSTS.items() if k != "microbatch_size"}
    with pytest.raises(ValueError, match="measured_at"):
        dualpipe_rs.tune(unsized, 4, 16)
    assert dualpipe_rs.tune(unsized, 4, 16, measured_at=2)["measured_microbatch_size"] == 2.0
    with pytest.raises(ValueError, match="measured at micro-batches of 2"):
        dualpipe_rs.tune(COSTS, 4, 16, measured_at=4)
    with pytest.raises(ValueError, match="global"):
        dualpipe_rs.tune(COSTS, 4, 0)
    with pytest.raises(ValueError, match="model"):
        dualpipe_rs.tune(COSTS, 4, 16, model="eager")
    with pytest.raises(TypeError, match="ranks must be an int"):
        dualpipe_rs.tune(COSTS, "4", 16)
    with pytest.raises(ValueError, match="costs"):
        dualpipe_rs.tune({"f": -1, "b": 1, "microbatch_size": 1}, 4, 16)


def test_synthesizer_rows():
    report = dualpipe_rs.tune(COSTS, 2, 8, microbatch_sizes=[2], synthesize=2.0)
    rows = [r for r in report["ranked"] + report["over_cap"] if r["family"] == "synthesized"]
    assert len(rows) == 1 and rows[0]["microbatch_size"] == 2, report["ranked"]
    families = [r for r in report["ranked"] if r["family"] != "synthesized" and r["parameter_copies"] == 1]
    # Never slower than the one-copy families it starts from.
    assert rows[0]["step_time"] <= min(r["step_time"] for r in families) + 1e-9
    assert isinstance(report["schedule"], dualpipe_rs.Schedule)
    with pytest.raises(ValueError, match="synthesize=-1"):
        dualpipe_rs.tune(COSTS, 2, 8, synthesize=-1.0)
