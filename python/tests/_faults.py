"""Bad use and failures, run on every rank of a world: each must raise a clear error."""

from __future__ import annotations

import copy
import json

import torch

import dualpipe_rs
from dualpipe_rs.torch import Pipeline

from _cases import criterion, data, feeds, full_model


def _catch(fn):
    try:
        fn()
    except Exception as exc:  # the test asserts on the type and message
        return (type(exc).__name__, str(exc))
    return ("no error", "")


def construction(rank: int):
    """Errors raised while building a Pipeline, before any message is sent."""
    s = dualpipe_rs.plan("1f1b", 2, 4)
    model = full_model(2)
    one = [copy.deepcopy(model[rank])]
    found = {
        "module_count": _catch(lambda: Pipeline(s, one * 2)),
        "group_size": _catch(lambda: Pipeline(dualpipe_rs.plan("1f1b", 4, 4), one)),
        "execution": _catch(lambda: Pipeline(s, one, execution="eager")),
        "rank_mapping": _catch(lambda: Pipeline(s, one, rank_mapping=[0, 0])),
        "not_a_schedule": _catch(lambda: Pipeline(s.to_json(), one)),
        "inference_schedule": _catch(lambda: Pipeline(s, one, inference_schedule=s)),
    }
    for name, (kind, message) in found.items():
        assert kind != "no error", f"{name}: no error raised"
    assert "got 2 modules" in found["module_count"][1]
    assert "has 2 ranks but the schedule" in found["group_size"][1]
    return found


def step_errors(rank: int):
    """Errors every rank detects before it sends anything."""
    s = dualpipe_rs.plan("1f1b", 2, 4)
    model = full_model(2)
    x, y = data(8)
    inp, lab, _, _ = feeds(s, rank, x, y)
    pipe = Pipeline(s, [copy.deepcopy(model[rank])], timeout=5)
    found = {}
    found["num_chunks"] = _catch(
        lambda: pipe.step(inp, num_chunks=6, criterion=criterion, labels=(lab,))
    )
    # Rank 0 forgets its inputs, rank 1 its criterion.
    if rank == 0:
        found["missing"] = _catch(lambda: pipe.step(criterion=criterion, labels=(lab,)))
    else:
        found["missing"] = _catch(lambda: pipe.step(inp, labels=(lab,)))
    fwd = Pipeline(dualpipe_rs.plan("1f1b", 2, 4, forward_only=True), [copy.deepcopy(model[rank])])
    found["forward_only_with_grad"] = _catch(lambda: fwd.step(inp))
    doc = json.loads(s.to_json())
    doc["schedule"] = "my-own"
    custom = Pipeline(dualpipe_rs.Schedule.from_json(json.dumps(doc)), [copy.deepcopy(model[rank])])

    def no_grad_step():
        with torch.no_grad():
            custom.step(inp, criterion=criterion, labels=(lab,))

    found["no_inference_schedule"] = _catch(no_grad_step)
    for name, (kind, message) in found.items():
        assert kind != "no error", f"{name}: no error raised"
    assert "6" in found["num_chunks"][1] and "4 micro-batches" in found["num_chunks"][1]
    if rank == 0:
        assert "stage 0" in found["missing"][1] and "inputs" in found["missing"][1]
    else:
        assert "criterion" in found["missing"][1]
    assert "forward-only" in found["forward_only_with_grad"][1]
    assert "inference_schedule" in found["no_inference_schedule"][1]
    # Nothing was sent: the group still works.
    loss, _ = pipe.step(inp, criterion=criterion, labels=(lab,))
    assert (loss is None) == (rank == 0)
    return found


def shape_change(rank: int):
    """The second step's batch is larger: the sender names the shapes; the receiver, waiting,
    raises after the timeout and repeats what the sender said."""
    s = dualpipe_rs.plan("1f1b", 2, 4)
    model = full_model(2)
    pipe = Pipeline(s, [copy.deepcopy(model[rank])], timeout=3)
    x, y = data(8)
    inp, lab, _, _ = feeds(s, rank, x, y)
    pipe.step(inp, criterion=criterion, labels=(lab,))
    x, y = data(12)
    inp, lab, _, _ = feeds(s, rank, x, y)
    pipe.step(inp, criterion=criterion, labels=(lab,))


def dead_peer(rank: int):
    """Rank 1 never runs its step: rank 0 raises after the timeout, saying what it waits for."""
    s = dualpipe_rs.plan("1f1b", 2, 4)
    model = full_model(2)
    pipe = Pipeline(s, [copy.deepcopy(model[rank])], timeout=3)
    if rank == 1:
        return
    x, y = data(8)
    inp, lab, _, _ = feeds(s, rank, x, y)
    pipe.step(inp, criterion=criterion, labels=(lab,))


class Broken(torch.nn.Module):
    """A stage whose forward fails."""

    def forward(self, x):
        raise ValueError("this stage is broken")


def module_raises(rank: int):
    """Rank 1's module raises: it names the instruction; rank 0 repeats it after its timeout."""
    s = dualpipe_rs.plan("1f1b", 2, 4)
    model = full_model(2)
    module = copy.deepcopy(model[0]) if rank == 0 else Broken()
    pipe = Pipeline(s, [module], timeout=3)
    x, y = data(8)
    inp, lab, _, _ = feeds(s, rank, x, y)
    pipe.step(inp, criterion=criterion, labels=(lab,))


def root_cause_once(rank: int):
    """Rank 1's module raises on 4 ranks. Ranks 0 and 2 wait on rank 1 and fail after 3 s;
    rank 3, which waits on rank 2, after 6 s, when all three have failed. It reports the first
    failure, rank 1's, once: a rank whose wait failed because a peer had failed does not
    announce its own failure as a cause."""
    s = dualpipe_rs.plan("1f1b", 4, 4)
    model = full_model(4)
    module = Broken() if rank == 1 else copy.deepcopy(model[rank])
    pipe = Pipeline(s, [module], timeout=6 if rank == 3 else 3)
    x, y = data(8)
    inp, lab, _, _ = feeds(s, rank, x, y)
    pipe.step(inp, criterion=criterion, labels=(lab,))


def failed_step_refuses_the_next(rank: int):
    """Rank 0 forgets its inputs: it raises at once and goes on to its next step, whose
    messages rank 1's first step must not take (each call has its own tag): rank 1 raises
    after its timeout, repeating rank 0's error, and refuses its next step at once; rank 0's
    second step times out. Both outcomes are raised together, so the world is not reused."""
    s = dualpipe_rs.plan("1f1b", 2, 4)
    model = full_model(2)
    pipe = Pipeline(s, [copy.deepcopy(model[rank])], timeout=3)
    x, y = data(8)
    inp, lab, _, _ = feeds(s, rank, x, y)
    if rank == 0:
        first = _catch(lambda: pipe.step(criterion=criterion, labels=(lab,)))
    else:
        first = _catch(lambda: pipe.step(inp, criterion=criterion, labels=(lab,)))
    second = _catch(lambda: pipe.step(inp, criterion=criterion, labels=(lab,)))
    raise RuntimeError(json.dumps([first, second]))
