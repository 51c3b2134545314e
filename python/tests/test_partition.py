"""`dualpipe_rs.partition`: the same document as `dualpipe partition --json`, from lists of
dicts or a layers file, with the errors named."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import subprocess

import pytest

import dualpipe_rs

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "partition" / "layers.json"


def dualpipe_bin() -> str | None:
    if os.environ.get("DUALPIPE_BIN"):
        return os.environ["DUALPIPE_BIN"]
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "dualpipe"
        if path.exists():
            return str(path)
    return shutil.which("dualpipe")


def layers(count: int, heavy: tuple[int, ...] = ()) -> list[dict]:
    out = []
    for i in range(count):
        scale = 6.0 if i in heavy else 1.0
        out.append({"name": f"l{i}", "f": scale, "b": 2 * scale, "w": scale,
                    "param_bytes": 100, "activation_bytes": 10})
    return out


def test_heavy_ends_move_layers_off_rank_0_of_a_v():
    result = dualpipe_rs.partition(layers(32, heavy=(0, 31)), family="dualpipev", ranks=4, microbatches=8)
    assert result["objective"] == "step"
    ranges = result["ranges"]
    assert len(ranges) == 8 and ranges[0][0] == 0 and ranges[-1][1] == 32
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(7))
    # Rank 0 holds stages 0 and 7; the equal cut gives it 8 layers, two of them heavy.
    assert (ranges[0][1] - ranges[0][0]) + (ranges[7][1] - ranges[7][0]) < 8
    assert result["predicted_step"] < result["equal_cut_step"]
    assert result["predicted_step"] <= result["bottleneck_optimum"]["step"]
    assert result["bottleneck_optimum"]["exact"] is True
    assert result["stages"][0]["ranks"] == [0] and result["stages"][7]["ranks"] == [0]
    assert max(result["rank_load"]) == pytest.approx(result["bottleneck"])


def test_bottleneck_matches_brute_force():
    items = [{"f": f, "b": 2 * f} for f in (5, 1, 1, 3, 1, 2, 1, 4)]
    schedule = dualpipe_rs.plan("dualpipe", 4, 8)
    result = dualpipe_rs.partition(items, schedule, max_evaluations=0)
    assert result["objective"] == "bottleneck"
    cost = [3 * item["f"] for item in items]
    best = float("inf")
    for cut in itertools.combinations(range(1, 8), 3):
        bounds = (0, *cut, 8)
        stage = [sum(cost[bounds[s]:bounds[s + 1]]) for s in range(4)]
        # DualPipe: ranks r and 3-r hold stages r and 3-r, 4 micro-batches of each.
        load = max(4 * (stage[r] + stage[3 - r]) for r in range(4))
        best = min(best, load)
    assert result["bottleneck"] == pytest.approx(best)


def test_same_document_as_the_cli():
    binary = dualpipe_bin()
    if binary is None:
        pytest.skip("the dualpipe binary is not built (cargo build -p dualpipe-cli)")
    args = ["partition", "--layers", str(EXAMPLE), "-s", "zbv", "-n", "4", "-c", "8", "--json"]
    cli = subprocess.run([binary, *args], capture_output=True, text=True, check=True)
    from_path = dualpipe_rs.partition(EXAMPLE, family="zbv", ranks=4, microbatches=8)
    assert from_path == json.loads(cli.stdout)
    from_str = dualpipe_rs.partition(str(EXAMPLE), dualpipe_rs.plan("zbv", 4, 8))
    assert from_str == from_path


def test_memory_cap():
    items = layers(16)
    free = dualpipe_rs.partition(items, family="1f1b", ranks=4, microbatches=8)
    cap = max(free["peak_memory"])
    capped = dualpipe_rs.partition(items, family="1f1b", ranks=4, microbatches=8, memory_cap=cap)
    assert capped["memory_cap"] == cap
    assert max(capped["peak_memory"]) <= cap
    with pytest.raises(ValueError, match="no cut keeps every rank within the memory cap of 10 bytes"):
        dualpipe_rs.partition(items, family="1f1b", ranks=4, microbatches=8, memory_cap=10)


@pytest.mark.parametrize(
    "items, kwargs, error, match",
    [
        (layers(3), {"family": "dualpipev", "ranks": 2, "microbatches": 4}, ValueError,
         "3 layers cannot fill 4 stages"),
        ([{"f": 1, "b": -2}] * 4, {"family": "1f1b", "ranks": 1, "microbatches": 1}, ValueError,
         "layer 0: `b` is -2"),
        ([{"f": 1, "b": 2}, {"f": float("nan"), "b": 2}], {"family": "1f1b", "ranks": 1, "microbatches": 1},
         ValueError, "layer 1: `f` is NaN"),
        ([{"f": 1, "b": 2, "w": 3}], {"family": "1f1b", "ranks": 1, "microbatches": 1}, ValueError,
         r"layer 0: `w` \(3\) exceeds `b` \(2\)"),
        ([{"f": 1, "b": 2, "flops": 3}], {"family": "1f1b", "ranks": 1, "microbatches": 1}, ValueError,
         "layer 0: unknown field `flops`"),
        ([1.0], {"family": "1f1b", "ranks": 1, "microbatches": 1}, TypeError, "layer 0 is a float"),
        (3, {"family": "1f1b", "ranks": 1, "microbatches": 1}, TypeError, "list of dicts or the path"),
        (layers(4), {}, ValueError, "give a schedule"),
        (layers(4), {"family": "1f1b"}, ValueError, "needs family, ranks and microbatches"),
        (layers(4), {"family": "dualpipe", "ranks": 3, "microbatches": 8}, ValueError, "dualpipe needs"),
    ],
)
def test_errors(items, kwargs, error, match):
    with pytest.raises(error, match=match):
        dualpipe_rs.partition(items, **kwargs)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        dualpipe_rs.partition(tmp_path / "missing.json", family="1f1b", ranks=1, microbatches=1)
