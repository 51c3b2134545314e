"""The Rust core as Python sees it: planning, loading, validation errors, simulation, rendering.

The simulation is compared with the `dualpipe` command's own `--json` output when the binary has
been built (`cargo build -p dualpipe-cli`, or `DUALPIPE_BIN`), and with the DualPipe README's
figures always.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest

import dualpipe_rs
from dualpipe_rs import Schedule, ScheduleError

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEDULES = ROOT / "schedules"
FAMILIES = ["dualpipe", "dualpipev", "1f1b", "gpipe", "zb1p", "zbv", "interleaved-1f1b"]


def dualpipe_bin() -> str | None:
    """The `dualpipe` binary to compare with, if one is built."""
    if os.environ.get("DUALPIPE_BIN"):
        return os.environ["DUALPIPE_BIN"]
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "dualpipe"
        if path.exists():
            return str(path)
    return shutil.which("dualpipe")


def cli(*args: str) -> subprocess.CompletedProcess:
    binary = dualpipe_bin()
    if binary is None:
        pytest.skip("the dualpipe binary is not built (cargo build -p dualpipe-cli)")
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=ROOT)


def checked_in() -> list[tuple[str, pathlib.Path]]:
    return sorted((p.stem, p) for p in SCHEDULES.glob("*.json"))


def plan_of_file_name(stem: str) -> Schedule:
    """Plans the schedule a checked-in file is named after: `family-NxC[-vV]`."""
    parts = stem.split("-")
    v = None
    if parts[-1].startswith("v"):
        v = int(parts.pop()[1:])
    n, c = map(int, parts.pop().split("x"))
    return dualpipe_rs.plan("-".join(parts), n, c, chunks_per_rank=v)


def corrupt(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


# --- the package ---------------------------------------------------------------------------


def test_import_does_not_import_torch():
    code = "import sys, dualpipe_rs; dualpipe_rs.plan('1f1b', 2, 2); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version_and_exports():
    assert dualpipe_rs.__version__.count(".") == 2
    assert set(dualpipe_rs.__all__) == {"Schedule", "ScheduleError", "__version__", "families", "load", "partition", "plan", "tune"}
    assert issubclass(ScheduleError, ValueError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dualpipe_rs.nope  # noqa: B018


def test_families():
    families = dualpipe_rs.families()
    assert [f["name"] for f in families] == FAMILIES
    by_name = {f["name"]: f for f in families}
    assert by_name["dualpipev"] == {
        "name": "dualpipev",
        "constraint": "ranks N >= 1 and micro-batches C >= 2N",
        "stages": "2N",
    }
    assert by_name["interleaved-1f1b"]["stages"] == "N x V"
    assert by_name["dualpipe"]["stages"] == "N"


# --- plan, to_json, load, from_json --------------------------------------------------------


@pytest.mark.parametrize("stem,path", checked_in())
def test_plan_is_byte_identical_to_the_checked_in_schedules(stem, path):
    text = path.read_text()
    planned = plan_of_file_name(stem)
    assert planned.to_json() == text
    loaded = dualpipe_rs.load(path)
    assert loaded == planned
    assert dualpipe_rs.load(str(path)) == planned
    assert Schedule.from_json(text).to_json() == text


def test_properties():
    s = dualpipe_rs.plan("dualpipe", 4, 8)
    assert (s.name, s.num_ranks, s.num_stages, s.num_microbatches, s.forward_only) == ("dualpipe", 4, 4, 8, False)
    assert s.pipelines == [
        {"route": [0, 1, 2, 3], "microbatches": [0, 1, 2, 3]},
        {"route": [3, 2, 1, 0], "microbatches": [4, 5, 6, 7]},
    ]
    f = dualpipe_rs.plan("zb1p", 3, 5, forward_only=True)
    assert f.forward_only and f.num_stages == 3
    assert all(i["op"] in ("F", "send", "recv", "commit") for r in range(3) for i in f.instructions(r))
    v3 = dualpipe_rs.plan("interleaved-1f1b", 4, 8, chunks_per_rank=3)
    assert v3.num_stages == 12
    assert dualpipe_rs.plan("interleaved-1f1b", 4, 8).num_stages == 8  # V = 2 by default


def test_repr_eq_hash_pickle():
    s = dualpipe_rs.plan("dualpipev", 4, 10)
    assert repr(s) == "Schedule(name='dualpipev', num_ranks=4, num_stages=8, num_microbatches=10, forward_only=False)"
    same = dualpipe_rs.plan("dualpipev", 4, 10)
    assert s == same and s is not same and hash(s) == hash(same)
    assert s != dualpipe_rs.plan("dualpipev", 4, 12)
    assert s != dualpipe_rs.plan("dualpipev", 4, 10, forward_only=True)
    assert s != "dualpipev" and s != None  # noqa: E711
    assert len({s, same}) == 1
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(s, protocol))
        assert back == s and back.to_json() == s.to_json()
    assert "forward_only=True" in repr(dualpipe_rs.plan("1f1b", 2, 2, forward_only=True))
    label = Schedule.from_json(corrupt(s.to_json(), '"schedule": "dualpipev"', '"schedule": "it\'s mine"'))
    assert repr(label).startswith('Schedule(name="it\'s mine", ')


def test_schedules_are_immutable():
    s = dualpipe_rs.plan("1f1b", 2, 2)
    with pytest.raises(AttributeError):
        s.num_ranks = 3
    with pytest.raises(TypeError):
        Schedule()


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (("dualpipe", 3, 10), {}, "dualpipe needs an even number of ranks N >= 2 and an even number of micro-batches C >= 2N; got 3 ranks and 10 micro-batches"),
        (("dualpipev", 4, 7), {}, "dualpipev needs ranks N >= 1 and micro-batches C >= 2N; got 4 ranks and 7 micro-batches"),
        (("1f1b", 0, 4), {}, "1f1b needs ranks N >= 1 and micro-batches C >= 1; got 0 ranks and 4 micro-batches"),
        (("pipedream", 4, 8), {}, "unknown schedule `pipedream`; known schedules: dualpipe, dualpipev, 1f1b, gpipe, zb1p, zbv, interleaved-1f1b"),
        (("zbv", 4, 8), {"chunks_per_rank": 2}, "zbv has a fixed number of stages per rank; --chunks-per-rank applies to interleaved-1f1b only"),
        (("interleaved-1f1b", 4, 8), {"chunks_per_rank": 0}, "with 0 chunks per rank"),
        (("1f1b", -1, 4), {}, "ranks is -1; it must be an integer from 0 to 4294967295"),
        (("1f1b", 4, 2**32), {}, "microbatches is 4294967296"),
        (("interleaved-1f1b", 4, 8), {"chunks_per_rank": -2}, "chunks_per_rank is -2"),
    ],
)
def test_plan_errors_are_the_planners(args, kwargs, message):
    with pytest.raises(ValueError) as error:
        dualpipe_rs.plan(*args, **kwargs)
    assert message in str(error.value)
    assert not isinstance(error.value, ScheduleError)


def test_plan_errors_match_the_cli():
    out = cli("plan", "--schedule", "dualpipe", "--ranks", "3", "--microbatches", "10")
    assert out.returncode == 2
    with pytest.raises(ValueError) as error:
        dualpipe_rs.plan("dualpipe", 3, 10)
    assert out.stderr == f"error: {error.value}\n"


def test_plan_argument_types():
    with pytest.raises(TypeError, match="ranks must be an int, not str"):
        dualpipe_rs.plan("1f1b", "4", 8)
    with pytest.raises(TypeError, match="microbatches must be an int, not float"):
        dualpipe_rs.plan("1f1b", 4, 8.0)
    with pytest.raises(TypeError, match="chunks_per_rank must be an int, not bool"):
        dualpipe_rs.plan("interleaved-1f1b", 4, 8, chunks_per_rank=True)
    with pytest.raises(ValueError, match="ranks is 1180591620717411303424; it must be an integer"):
        dualpipe_rs.plan("1f1b", 2**70, 8)
    with pytest.raises(TypeError):
        dualpipe_rs.plan(1, 4, 8)


# --- stages_on, instructions, instruction_text ---------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 6])
@pytest.mark.parametrize("family", FAMILIES)
def test_stages_on_follows_each_family(family, n):
    if family == "dualpipe" and n % 2:
        return
    v = 3 if family == "interleaved-1f1b" else None
    s = dualpipe_rs.plan(family, n, 2 * n, chunks_per_rank=v)
    expected = {
        "dualpipe": lambda r: [r, n - 1 - r],
        "dualpipev": lambda r: [r, 2 * n - 1 - r],
        "zbv": lambda r: [r, 2 * n - 1 - r],
        "interleaved-1f1b": lambda r: [r, r + n, r + 2 * n],
    }.get(family, lambda r: [r])
    assert [s.stages_on(r) for r in range(n)] == [expected(r) for r in range(n)]
    # Every stage a rank computes is in its list, and nothing else.
    for r in range(n):
        computed = set()
        for i in s.instructions(r):
            if i["op"] == "FB":
                computed |= {i["f"]["stage"], i["b"]["stage"]}
            elif i["op"] in ("F", "B", "W"):
                computed.add(i["stage"])
        assert computed == set(s.stages_on(r))


def test_instructions_are_the_json_objects():
    for stem, path in checked_in():
        doc = json.loads(path.read_text())
        s = dualpipe_rs.load(path)
        for r, listed in enumerate(doc["ranks"]):
            got = s.instructions(r)
            expected = [dict(i, defer_w=i.get("defer_w", False)) if i["op"] == "B" else i for i in listed]
            assert got == expected, f"{stem} rank {r}"


def test_instruction_shapes_and_text():
    s = dualpipe_rs.plan("dualpipev", 2, 4)
    ops = {}
    for r in range(2):
        for obj, text in zip(s.instructions(r), s.instruction_text(r)):
            ops.setdefault(obj["op"], (obj, text))
    assert set(ops) == {"F", "B", "W", "FB", "send", "recv", "commit"}
    assert ops["F"] == ({"op": "F", "stage": 0, "mb": 0}, "F s0 m0")
    b, b_text = ops["B"]
    assert set(b) == {"op", "stage", "mb", "defer_w"} and isinstance(b["defer_w"], bool)
    assert b_text == f"B s{b['stage']} m{b['mb']}" + (" defer_w" if b["defer_w"] else "")
    fb, fb_text = ops["FB"]
    assert set(fb) == {"op", "f", "b"} and set(fb["f"]) == set(fb["b"]) == {"stage", "mb"}
    assert fb_text == f"FB F s{fb['f']['stage']} m{fb['f']['mb']} + B s{fb['b']['stage']} m{fb['b']['mb']}"
    send, send_text = ops["send"]
    assert send == {"op": "send", "kind": "act", "stage": 0, "mb": 0, "peer": 1}
    assert send_text == "send act s0 m0 -> r1"
    recv, recv_text = ops["recv"]
    assert recv_text == f"recv {recv['kind']} s{recv['stage']} m{recv['mb']} <- r{recv['peer']}"
    assert ops["commit"] == ({"op": "commit"}, "commit")
    zb = dualpipe_rs.plan("zb1p", 2, 2)
    deferred = [i for i in zb.instructions(0) if i["op"] == "B"]
    assert deferred and all(i["defer_w"] is True for i in deferred)
    assert any(t.endswith(" defer_w") for t in zb.instruction_text(0))


@pytest.mark.parametrize("method", ["stages_on", "instructions", "instruction_text"])
def test_rank_out_of_range(method):
    s = dualpipe_rs.plan("1f1b", 4, 8)
    for rank in (4, -1, 10**6):
        with pytest.raises(IndexError, match=f"rank {rank} is out of range: the schedule has 4 ranks"):
            getattr(s, method)(rank)
    with pytest.raises(IndexError, match="1 rank \\(0..0\\)"):
        getattr(dualpipe_rs.plan("1f1b", 1, 1), method)(1)


# --- ScheduleError -------------------------------------------------------------------------


def v4x10() -> str:
    return (SCHEDULES / "dualpipev-4x10.json").read_text()


def test_validation_error_names_rank_index_instruction_and_rule(tmp_path):
    s = dualpipe_rs.plan("1f1b", 2, 2)
    doc = json.loads(s.to_json())
    # Rank 1 computes s1 m0 before receiving its input.
    doc["ranks"][1] = [
        {"op": "F", "stage": 1, "mb": 0},
        {"op": "recv", "kind": "act", "stage": 1, "mb": 0, "peer": 0},
        {"op": "commit"},
    ] + [i for i in doc["ranks"][1] if not (i.get("stage") == 1 and i.get("mb") == 0 and i["op"] in ("F", "recv"))]
    text = json.dumps(doc)
    with pytest.raises(ScheduleError) as error:
        Schedule.from_json(text)
    e = error.value
    assert (e.rank, e.index, e.instruction, e.rule) == (1, 0, "F s1 m0", "data-dependency")
    assert str(e).startswith("invalid schedule: ")
    assert "rank 1, instruction 0 `F s1 m0`: rule 2 (data dependency)" in str(e)
    assert e.problems[0] == {
        "rank": 1,
        "index": 0,
        "instruction": "F s1 m0",
        "rule": "data-dependency",
        "message": e.problems[0]["message"],
    }
    assert all(p["message"] in str(e) for p in e.problems)
    # The message is what `dualpipe validate` prints.
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ScheduleError) as loaded:
        dualpipe_rs.load(path)
    assert str(loaded.value) == f"{path}: {e}"
    out = cli("validate", str(path))
    assert out.returncode == 1
    assert out.stderr == f"error: {loaded.value}\n"


def test_a_duplicated_forward_breaks_completeness():
    text = corrupt(v4x10(), '{"op": "F", "stage": 0, "mb": 1}', '{"op": "F", "stage": 0, "mb": 0}')
    with pytest.raises(ScheduleError) as error:
        Schedule.from_json(text)
    e = error.value
    assert (e.rank, e.index, e.instruction, e.rule) == (0, 3, "F s0 m0", "completeness")
    assert "second forward of s0 m0" in str(e)
    # A problem of a rank as a whole has no index.
    whole = [p for p in e.problems if p["index"] is None]
    assert whole and whole[0]["rank"] == 0 and whole[0]["rule"] == "completeness"
    assert whole[0]["instruction"] is None


def two_way(rank0: list, rank1: list) -> str:
    """A forward-only document: micro-batch 0 goes 0 -> 1, micro-batch 1 goes 1 -> 0."""
    return json.dumps(
        {
            "format": "dualpipe-schedule/v1",
            "schedule": "two-way",
            "num_ranks": 2,
            "num_stages": 2,
            "num_microbatches": 2,
            "forward_only": True,
            "pipelines": [{"route": [0, 1], "microbatches": [0]}, {"route": [1, 0], "microbatches": [1]}],
            "ranks": [rank0, rank1],
        }
    )


def program(rank: int) -> list:
    """Each rank receives in its own batch before it sends: both wait forever."""
    mine, theirs, peer = (0, 1, 1) if rank == 0 else (1, 0, 0)
    return [
        {"op": "F", "stage": 0, "mb": mine},
        {"op": "recv", "kind": "act", "stage": 1, "mb": theirs, "peer": peer},
        {"op": "commit"},
        {"op": "send", "kind": "act", "stage": 0, "mb": mine, "peer": peer},
        {"op": "commit"},
        {"op": "F", "stage": 1, "mb": theirs},
    ]


def test_a_deadlock_breaks_progress():
    with pytest.raises(ScheduleError) as error:
        Schedule.from_json(two_way(program(0), program(1)))
    e = error.value
    assert e.rule == "progress"
    assert {p["rule"] for p in e.problems} == {"progress"}
    assert "rule 4 (progress)" in str(e)
    assert e.rank in (0, 1)


def test_messages_out_of_order_break_communication():
    # Rank 0 sends two activations to rank 1, which receives them in the other order.
    doc = json.loads(dualpipe_rs.plan("1f1b", 2, 2, forward_only=True).to_json())
    doc["ranks"] = [
        [
            {"op": "F", "stage": 0, "mb": 0},
            {"op": "F", "stage": 0, "mb": 1},
            {"op": "send", "kind": "act", "stage": 0, "mb": 1, "peer": 1},
            {"op": "send", "kind": "act", "stage": 0, "mb": 0, "peer": 1},
            {"op": "commit"},
        ],
        [
            {"op": "recv", "kind": "act", "stage": 1, "mb": 0, "peer": 0},
            {"op": "recv", "kind": "act", "stage": 1, "mb": 1, "peer": 0},
            {"op": "commit"},
            {"op": "F", "stage": 1, "mb": 0},
            {"op": "F", "stage": 1, "mb": 1},
        ],
    ]
    with pytest.raises(ScheduleError) as error:
        Schedule.from_json(json.dumps(doc))
    e = error.value
    assert e.rule == "communication"
    assert e.rank is not None and e.index is not None
    assert e.instruction in {"send act s0 m1 -> r1", "recv act s1 m0 <- r0", "send act s0 m0 -> r1", "recv act s1 m1 <- r0"}


def test_header_problems_have_no_rank():
    text = corrupt(v4x10(), '"num_ranks": 4', '"num_ranks": 5')
    with pytest.raises(ScheduleError) as error:
        Schedule.from_json(text)
    e = error.value
    assert (e.rank, e.index, e.instruction, e.rule) == (None, None, None, "structure")
    assert "document: structure: num_ranks is 5 but `ranks` holds 4 lists" in str(e)


@pytest.mark.parametrize(
    "old,new,rank,index,fragment",
    [
        ('"format": "dualpipe-schedule/v1"', '"format": "dualpipe-schedule/v2"', None, None, "not a dualpipe-schedule/v1 document"),
        ('"num_ranks": 4', '"num_ranks": 4, "extra": 1', None, None, "unknown field `extra`"),
        ('{"op": "F", "stage": 0, "mb": 1}', '{"op": "X", "stage": 0, "mb": 1}', 0, 3, "rank 0, instruction 3: unknown variant `X`"),
        ('{"op": "F", "stage": 0, "mb": 1}', '{"op": "F", "stage": 0}', 0, 3, "missing field `mb`"),
    ],
)
def test_parse_errors(old, new, rank, index, fragment):
    with pytest.raises(ScheduleError) as error:
        Schedule.from_json(corrupt(v4x10(), old, new))
    e = error.value
    assert (e.rank, e.index, e.instruction, e.rule) == (rank, index, None, None)
    assert fragment in str(e)
    assert len(e.problems) == 1 and e.problems[0]["rule"] is None


def test_not_json_at_all(tmp_path):
    for text in ("", "not json", "[]", "{}"):
        with pytest.raises(ScheduleError, match="not a dualpipe-schedule/v1 document"):
            Schedule.from_json(text)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScheduleError, match="not UTF-8"):
        dualpipe_rs.load(binary)


def test_load_errors_are_os_errors(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as error:
        dualpipe_rs.load(missing)
    assert error.value.filename == str(missing)
    assert error.value.errno == 2
    with pytest.raises(IsADirectoryError):
        dualpipe_rs.load(tmp_path)
    with pytest.raises(TypeError):
        dualpipe_rs.load(42)


def test_a_bare_schedule_error_has_no_location():
    e = ScheduleError("mine")
    assert (e.rank, e.index, e.instruction, e.rule, tuple(e.problems)) == (None, None, None, None, ())


# --- simulate ------------------------------------------------------------------------------


def test_simulate_dualpipev_4x10_defaults():
    sim = dualpipe_rs.plan("dualpipev", 4, 10).simulate()
    assert sim["schedule"] == "dualpipev" and sim["model"] == "blocking"
    assert (sim["num_ranks"], sim["num_stages"], sim["num_microbatches"]) == (4, 8, 10)
    assert sim["costs"] == "f=1,b=2,w=1,fb=f+b,comm=0"
    assert sim["makespan"] == 66.0
    assert sim["bubble_share"] == 0.090909091
    assert sim["ranks"][0] == {"rank": 0, "busy": 60.0, "idle": 6.0, "end": 66.0, "peak_activations": 9, "peak_pending_w": 1}
    assert "instructions" not in sim


@pytest.mark.parametrize("family,n,c", [("dualpipe", 8, 20), ("dualpipe", 4, 16), ("dualpipev", 4, 10), ("dualpipev", 3, 9)])
def test_dualpipe_idles_the_readme_bubble(family, n, c):
    # (PP/2 - 1)(F&B + B - 3W) with F&B = 3, B = 2, W = 1.
    pp = n if family == "dualpipe" else 2 * n
    sim = dualpipe_rs.plan(family, n, c).simulate(costs="f=1,b=2,w=1,fb=3,comm=0")
    assert [r["idle"] for r in sim["ranks"]] == [(pp / 2 - 1) * 2] * n
    assert all(r["peak_activations"] == pp + 1 for r in sim["ranks"]) or family == "dualpipev"


def test_async_is_never_slower():
    for family in FAMILIES:
        s = dualpipe_rs.plan(family, 4, 8)
        blocking = s.simulate(costs="comm=0.3")
        asynchronous = s.simulate(costs="comm=0.3", model="async")
        assert asynchronous["model"] == "async"
        assert asynchronous["makespan"] <= blocking["makespan"]


def test_simulate_with_timeline():
    s = dualpipe_rs.plan("1f1b", 2, 2)
    sim = s.simulate(timeline=True)
    assert len(sim["instructions"]) == 2
    for r in range(2):
        timed = sim["instructions"][r]
        assert [t["index"] for t in timed] == list(range(len(s.instruction_text(r))))
        assert [t["instruction"] for t in timed] == s.instruction_text(r)
        assert all(0 <= t["start"] <= t["end"] <= sim["makespan"] for t in timed)


COST_FILE = {"f": 1.0, "b": 2.0, "w": 1.0, "fb": 2.6, "latency": 0.05, "stages": [{"stage": 0, "f": 1.4, "b": 2.5}, {"stage": 7, "b": 2.9, "w": 1.2, "fb": 3.5}]}


@pytest.mark.parametrize(
    "cli_args,costs,model",
    [
        ([], None, "blocking"),
        (["--model", "async"], None, "async"),
        (["--cost", "f=1,b=2,w=1,fb=3,comm=0.25"], "f=1,b=2,w=1,fb=3,comm=0.25", "blocking"),
        (["--costs", "COSTFILE", "--model", "async"], "COSTFILE", "async"),
        (["--costs", "COSTFILE"], COST_FILE, "blocking"),
        (["--costs", "COSTFILE"], "PATHLIKE", "blocking"),
        (["--timeline"], None, "blocking"),
    ],
)
def test_simulate_is_the_clis_json(tmp_path, cli_args, costs, model):
    cost_file = tmp_path / "costs.json"
    cost_file.write_text(json.dumps(COST_FILE))
    path = SCHEDULES / "dualpipev-4x10.json"
    args = [str(cost_file) if a == "COSTFILE" else a for a in cli_args]
    out = cli("simulate", str(path), *args, "--json")
    assert out.returncode == 0, out.stderr
    costs = {"COSTFILE": str(cost_file), "PATHLIKE": cost_file}.get(costs, costs) if not isinstance(costs, dict) else costs
    ours = dualpipe_rs.load(path).simulate(costs=costs, model=model, timeline="--timeline" in args)
    assert ours == json.loads(out.stdout)


@pytest.mark.parametrize(
    "costs,message",
    [
        ({"f": -1}, "costs: f is -1; costs must be finite and not negative"),
        ({"f": "1"}, "costs: `f` must be a number, got a str"),
        ({"f": True}, "costs: `f` must be a number, got a bool"),
        ({"f": float("nan")}, "costs: `f` is NaN; costs must be finite and not negative"),
        ({"stages": [{"stage": 0, "b": float("inf")}]}, "costs: `stages[0].b` is inf; costs must be finite"),
        ({"speed": 2}, "unknown field `speed`"),
        ({"w": 3}, "costs: w (3) exceeds b (2)"),
        ({"stages": [{"stage": 0, "w": None}]}, "costs: `stages[0].w` must be a number, got None"),
        ({"stages": [{"stage": 99, "f": 1}]}, "costs: the costs override stage 99, but the schedule has 4 stages"),
        ({"stages": [{"stage": 0, "f": 1}, {"stage": 0, "b": 3}]}, "stage 0"),
        ({"stages": 3}, "costs: `stages` must be a list of dicts, got a number"),
        ({"stages": [3]}, "costs: stages[0] must be a dict, got a number"),
        ({1: 2}, "costs: has the key 1; keys must be str"),
        ({"f": {1, 2}}, "costs: `f` is a set; expected a number"),
        ({"f": 10**30}, "costs: `f` is 1000000000000000000000000000000, too large"),
        ("f=x", "costs: `f=x`: `x` is not a number"),
        ("speed=2", "costs: unknown cost `speed`"),
        ("f=1,b=1,w=2", "costs: w (2) exceeds b (1)"),
        ("f=-1", "costs: f is -1"),
    ],
)
def test_bad_costs_raise_value_error_naming_the_field(costs, message):
    s = dualpipe_rs.plan("1f1b", 4, 8)
    with pytest.raises(ValueError) as error:
        s.simulate(costs=costs)
    assert message in str(error.value)
    with pytest.raises(ValueError):
        s.render("text", costs=costs)


def test_cost_files(tmp_path):
    s = dualpipe_rs.plan("1f1b", 4, 8)
    bad = tmp_path / "bad.json"
    bad.write_text('{"f": 1, "oops": 2}')
    with pytest.raises(ValueError, match=f"{bad}: .*unknown field `oops`"):
        s.simulate(costs=str(bad))
    with pytest.raises(ValueError, match="unknown field `oops`"):
        s.simulate(costs=bad)
    with pytest.raises(FileNotFoundError):
        s.simulate(costs=str(tmp_path / "none.json"))
    # A path with a separator is a path even when it holds '='.
    with pytest.raises(FileNotFoundError):
        s.simulate(costs=str(tmp_path / "f=1"))
    good = tmp_path / "good.json"
    good.write_text('{"f": 2}')
    assert s.simulate(costs=good)["costs"] == s.simulate(costs={"f": 2})["costs"] == s.simulate(costs="f=2")["costs"]
    with pytest.raises(TypeError, match="costs must be None, a dict"):
        s.simulate(costs=3)


def test_bad_model():
    s = dualpipe_rs.plan("1f1b", 2, 2)
    for method in (s.simulate, lambda **k: s.render("text", **k)):
        with pytest.raises(ValueError, match='unknown execution model "sync"; expected "blocking" or "async"'):
            method(model="sync")


# --- render, torch CSV ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "svg", "chrome"])
@pytest.mark.parametrize("model", ["blocking", "async"])
def test_render_is_the_clis(tmp_path, fmt, model):
    path = SCHEDULES / "zb1p-4x8.json"
    ours = dualpipe_rs.load(path).render(fmt, costs="comm=0.2", model=model)
    out = cli("render", str(path), "--format", fmt, "--cost", "comm=0.2", "--model", model)
    assert out.returncode == 0, out.stderr
    assert ours == out.stdout


def test_render_formats():
    s = dualpipe_rs.plan("dualpipev", 4, 10)
    text = s.render("text")
    assert text.startswith("dualpipev: 4 ranks, 8 stages, 10 micro-batches; blocking model; step time 66;")
    assert s.render("svg").lstrip().startswith("<svg")
    trace = json.loads(s.render("chrome"))
    assert trace
    with pytest.raises(ValueError, match='unknown render format "png"'):
        s.render("png")


def test_torch_csv():
    s = dualpipe_rs.load(SCHEDULES / "dualpipev-4x10.json")
    csv = s.to_torch_csv()
    assert len(csv.strip().splitlines()) == 4
    assert "SEND_F" not in csv and "SEND_F" in s.to_torch_csv(with_comms=True)
    out = cli("convert", str(SCHEDULES / "dualpipev-4x10.json"), "--to", "torch-csv", "--with-comms")
    assert out.returncode == 0 and out.stdout == s.to_torch_csv(with_comms=True)
    with pytest.raises(ValueError) as error:
        dualpipe_rs.load(SCHEDULES / "dualpipe-8x20.json").to_torch_csv()
    out = cli("convert", str(SCHEDULES / "dualpipe-8x20.json"), "--to", "torch-csv")
    assert out.returncode == 2
    assert out.stderr == f"error: {error.value}\n"
