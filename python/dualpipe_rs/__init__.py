"""dualpipe: plan, validate, simulate and render pipeline-parallel schedules.

Every operation runs in the Rust core (``dualpipe_rs._core``); this package only re-exports it::

    import dualpipe_rs
    schedule = dualpipe_rs.plan("dualpipev", 4, 10)
    schedule.stages_on(1)                  # [1, 6]
    schedule.instruction_text(0)[:3]       # ['F s0 m0', 'send act s0 m0 -> r1', 'commit']
    schedule.simulate(costs="f=1,b=2,w=1,fb=3")["makespan"]   # 66.0
    dualpipe_rs.load("schedules/dualpipe-8x20.json")
    dualpipe_rs.partition(layers, family="dualpipev", ranks=4, microbatches=16)["ranges"]
    dualpipe_rs.tune("costs.json", ranks=4, global_batch=64)["schedule"]   # the best, planned

A schedule that does not parse or breaks a rule raises :class:`ScheduleError` (a
``ValueError``) saying where (rank, instruction index, instruction) and which rule.

The torch runtime is the subpackage :mod:`dualpipe_rs.torch`; it is imported on first use, so
``import dualpipe_rs`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._core import Schedule, ScheduleError, __version__, families, load, partition, plan, tune

__all__ = ["Schedule", "ScheduleError", "__version__", "families", "load", "partition", "plan", "tune"]


def __getattr__(name: str) -> Any:
    # `dualpipe_rs.torch` without an explicit `import dualpipe_rs.torch`.
    if name == "torch":
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
