"""Measured timelines of pipeline steps: Chrome traces, busy/wait/idle, and cost files."""

from __future__ import annotations

import json
import os
import time
import weakref
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ["Profile"]

_NAMES = {0: "F", 1: "B", 2: "W", 3: "FB"}


class Profile:
    """What ``Pipeline(..., profile=True)`` records: each instruction's start and end.

    Times come from ``time.perf_counter`` on CPU and from CUDA events on a GPU (resolved when
    read). :meth:`chrome_trace`, :meth:`summary` and :meth:`costs` are collective over the
    pipeline group: every rank calls them; they describe the last step.
    """

    def __init__(self, pipe) -> None:
        # A weak reference: the pipeline owns its profile, not the other way round.
        self._pipe = weakref.proxy(pipe)
        self._cuda = pipe._device.type == "cuda"
        self._steps: List[Dict[str, Any]] = []
        self._current: Optional[Dict[str, Any]] = None

    # recording ------------------------------------------------------------------------

    def _now(self):
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _span(self, t0, t1) -> tuple:
        return (t0, t1)

    def _begin(self, prog) -> None:
        self._current = {"start": self._now(), "prog": prog, "compute": [], "comm": []}

    def _record(self, op, t0) -> None:
        code = op[0]
        if code in _NAMES and self._current is not None:
            self._current["compute"].append((op[1], code, op, t0, self._now()))

    def _comm(self, index, t0) -> None:
        if self._current is not None:
            self._current["comm"].append((index, "post", t0, self._now()))

    def _wait(self, t0) -> None:
        if self._current is not None:
            self._current["comm"].append((None, "wait", t0, self._now()))

    def _end(self) -> None:
        if self._current is None:
            return
        self._current["end"] = self._now()
        self._steps.append(self._current)
        self._steps = self._steps[-8:]
        self._current = None

    # reading --------------------------------------------------------------------------

    def _ms(self, base, t) -> float:
        if self._cuda:
            t.synchronize()
            return base.elapsed_time(t)
        return (t - base) * 1e3

    def local(self) -> Dict[str, Any]:
        """This rank's last step: spans in milliseconds from its start, and its totals."""
        if not self._steps:
            raise RuntimeError("no profiled step yet: run pipe.step() first")
        step = self._steps[-1]
        base = step["start"]
        prog = step["prog"]
        compute = []
        for index, code, op, t0, t1 in step["compute"]:
            compute.append(
                {
                    "index": index,
                    "name": prog.text[index],
                    "kind": _NAMES[code] + ("w" if code == 1 and op[4] else ""),
                    "stages": [op[2]] if code != 3 else [op[2], op[4]],
                    "start": self._ms(base, t0),
                    "end": self._ms(base, t1),
                }
            )
        comm = [
            {"what": what, "index": index, "start": self._ms(base, t0), "end": self._ms(base, t1)}
            for index, what, t0, t1 in step["comm"]
        ]
        total = self._ms(base, step["end"])
        busy = sum(c["end"] - c["start"] for c in compute)
        wait = sum(c["end"] - c["start"] for c in comm if c["what"] == "wait")
        return {
            "rank": self._pipe.rank,
            "microbatch_size": self._pipe._microbatch_size,
            "step": total,
            "busy": busy,
            "comm_wait": wait,
            "compute": compute,
            "comm": comm,
        }

    def _gather(self) -> List[Dict[str, Any]]:
        mine = self.local()
        out: List[Any] = [None] * dist.get_world_size(self._pipe.group)
        dist.all_gather_object(out, mine, group=self._pipe.group)
        return sorted(out, key=lambda d: d["rank"])

    def costs(self, path: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
        """Mean measured costs per stage (milliseconds), as a cost file for
        ``dualpipe simulate --costs``, ``dualpipe tune --costs`` and ``Schedule.simulate(costs=...)``,
        with the micro-batch size (along ``batch_dim``) the step ran at.

        Collective. With ``path``, rank 0 writes the file (refusing to replace an existing
        one unless ``overwrite``).
        """
        ranks = self._gather()
        sums: Dict[int, Dict[str, List[float]]] = {}
        for r in ranks:
            for c in r["compute"]:
                stage = c["stages"][0]
                sums.setdefault(stage, {}).setdefault(c["kind"], []).append(c["end"] - c["start"])

        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        stages = []
        for stage in sorted(sums):
            k = sums[stage]
            entry: Dict[str, Any] = {"stage": stage}
            f = mean(k.get("F", []))
            b = mean(k.get("B", []))
            w = mean(k.get("W", []))
            bw = mean(k.get("Bw", []))
            fb = mean(k.get("FB", []))
            if b is None and bw is not None and w is not None:
                b = bw + w
            if f is not None:
                entry["f"] = f
            if b is not None:
                entry["b"] = b
                if w is not None:
                    entry["w"] = min(w, b)
            if fb is not None:
                entry["fb"] = fb
            stages.append(entry)
        doc = _uniform(stages)
        sizes = [r["microbatch_size"] for r in ranks if r.get("microbatch_size")]
        if sizes:
            # The micro-batch size the times were measured at: `dualpipe tune` rescales by it.
            doc["microbatch_size"] = sizes[0]
        if path is not None and self._pipe.rank == 0:
            _write(path, json.dumps(doc, indent=2) + "\n", overwrite)
        return doc

    def summary(self) -> Dict[str, Any]:
        """Per rank busy, communication wait and idle time (ms) of the last step, the measured
        bubble, and the bubble the simulator predicts from the measured costs. Collective."""
        ranks = self._gather()
        step = max(r["step"] for r in ranks)
        rows = [
            {
                "rank": r["rank"],
                "busy": r["busy"],
                "comm_wait": r["comm_wait"],
                "idle": step - r["busy"],
            }
            for r in ranks
        ]
        measured = 1.0 - sum(r["busy"] for r in ranks) / (step * len(ranks)) if step > 0 else 0.0
        out: Dict[str, Any] = {"step": step, "ranks": rows, "measured_bubble": measured}
        try:
            costs = self.costs()
            sim = self._pipe.schedule.simulate(costs=costs)
            out["simulated_bubble"] = sim.get("bubble_share")
            out["simulated_step"] = sim.get("makespan")
        except Exception as exc:  # a schedule whose costs could not be measured completely
            out["simulated_bubble"] = None
            out["simulation_error"] = str(exc)
        return out

    def chrome_trace(self, path: str, overwrite: bool = False) -> None:
        """Write the last step as a Chrome trace (pid = rank; compute and communication
        lanes). Collective; rank 0 writes ``path``, refusing to replace an existing file
        unless ``overwrite``."""
        ranks = self._gather()
        if self._pipe.rank != 0:
            return
        events = []
        for r in ranks:
            pid = r["rank"]
            events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"rank {pid}"}})
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 0, "args": {"name": "compute"}})
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "communication"}})
            for c in r["compute"]:
                events.append(
                    {"ph": "X", "pid": pid, "tid": 0, "name": c["name"], "cat": c["kind"],
                     "ts": c["start"] * 1e3, "dur": max(c["end"] - c["start"], 0.0) * 1e3}
                )
            for c in r["comm"]:
                events.append(
                    {"ph": "X", "pid": pid, "tid": 1, "name": c["what"], "cat": "comm",
                     "ts": c["start"] * 1e3, "dur": max(c["end"] - c["start"], 0.0) * 1e3}
                )
        _write(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}), overwrite)


def _uniform(stages: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A cost file: uniform values from the first stage's, per-stage entries for all."""
    doc: Dict[str, Any] = {"unit": "ms"}
    if stages:
        first = stages[0]
        for key in ("f", "b", "w", "fb"):
            if key in first:
                doc[key] = first[key]
    doc["stages"] = stages
    return doc


def _write(path: str, text: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    with open(path, "w") as fh:
        fh.write(text)
