#!/usr/bin/env python3
"""Load CSV schedules written by `dualpipe convert --to torch-csv` with torch's own runtime.

For every CSV given, this script uses torch.distributed.pipelining (checked with torch 2.11):

1. `_PipelineScheduleRuntime._load_csv(path, format)`: parses every action and runs
   `_validate_schedule` (per-stage F/B/I/W counts and order, one rank per stage); for the
   compute-only form it also runs torch's lowering (UNSHARD/RESHARD, REDUCE_GRAD, send/recv).
2. `_validate_schedule` once more, explicitly, on the rows as read.
3. `_simulate_comms_compute` on the program with communication (torch's lowering of a
   compute-only CSV, or the CSV itself with --with-comms). torch 2.11's simulator accepts
   neither the runtime bookkeeping actions (UNSHARD, RESHARD, REDUCE_GRAD) nor OVERLAP_F_B
   containers, so those are dropped and the containers replaced by their forward then their
   backward, the order in which torch's runtime runs them.

The shape (ranks = rows, stages, micro-batches, stages per rank) is read off the CSV; the form
(compute_only or compute_comms) too: a CSV with SEND_/RECV_ actions is compute_comms.
No process group and no GPU are needed. Exit status: 0 if every CSV passes, 1 if one fails,
2 if torch cannot be imported.

usage: python3 scripts/torch_csv_check.py FILE.csv [FILE.csv ...]
"""

import csv
import re
import sys

try:
    import torch
    import torch.distributed.pipelining.schedules as schedules
    from torch.distributed.pipelining.stage import _PipelineStageBase
except ImportError as error:  # pragma: no cover - depends on the machine
    print(f"torch is not importable here ({error}); install it with `pip install torch`")
    sys.exit(2)

BOOKKEEPING = {schedules.UNSHARD, schedules.RESHARD, schedules.REDUCE_GRAD}


class ShapeOnlyStage(_PipelineStageBase):
    """A stage that carries only what schedule loading reads: no module, no process group."""

    def __init__(self, num_stages, num_ranks):  # deliberately skips the base initializer
        self.submod = None
        self.stage_index = 0
        self.num_stages = num_stages
        self.group_size = num_ranks
        self.group_rank = 0
        self.group = None

    def _create_grad_recv_info(self, *args, **kwargs):
        return None

    def _prepare_forward_infra(self, *args, **kwargs):
        return ()

    def _prepare_backward_infra(self, *args, **kwargs):
        return None


def shape(path):
    """Ranks, stages, micro-batches and form of a CSV, read off its cells."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    stages, microbatches, comms = 0, 0, False
    for row in rows:
        for cell in row:
            for part in re.split(r"[();]", cell):
                part = part.strip()
                if not part or part == "OVERLAP_F_B":
                    continue
                comms |= "SEND_" in part or "RECV_" in part
                digits = re.match(r"(\d+)\D+(\d*)", part)
                if digits is None:
                    raise ValueError(f"cannot read cell `{cell}`")
                stages = max(stages, int(digits.group(1)) + 1)
                if digits.group(2):
                    microbatches = max(microbatches, int(digits.group(2)) + 1)
    return len(rows), stages, microbatches, "compute_comms" if comms else "compute_only"


def simulatable(order):
    """The program without bookkeeping actions, overlapped pairs run as forward then backward."""
    flat = {}
    for rank, actions in order.items():
        flat[rank] = []
        for action in actions:
            if action is None or action.computation_type in BOOKKEEPING:
                continue
            if action.sub_actions is not None:
                flat[rank].extend(action.sub_actions)
            else:
                flat[rank].append(action)
    return flat


def check(path):
    ranks, stages, microbatches, form = shape(path)
    if stages % ranks:
        return False, f"{stages} stages do not split evenly over {ranks} ranks"
    per_rank = stages // ranks
    runtime = schedules._PipelineScheduleRuntime(
        [ShapeOnlyStage(stages, ranks) for _ in range(per_rank)], microbatches
    )
    runtime._load_csv(path, format=form)
    rows = runtime.pipeline_order if form == "compute_only" else runtime.pipeline_order_with_comms
    placement = schedules._validate_schedule(rows, ranks, stages, microbatches)
    simulated = schedules._simulate_comms_compute(
        simulatable(runtime.pipeline_order_with_comms),
        lambda stage: placement[stage],
        stages,
    )
    steps = max(len(actions) for actions in simulated.values())
    return True, (
        f"{ranks} ranks, {stages} stages ({per_rank} per rank), {microbatches} micro-batches, "
        f"{form}: _load_csv and _validate_schedule pass, _simulate_comms_compute finishes in "
        f"{steps} steps"
    )


def main(paths):
    if not paths:
        print(__doc__)
        return 2
    print(f"torch {torch.__version__}")
    failed = 0
    for path in paths:
        try:
            ok, what = check(path)
        except Exception as error:  # torch raises AssertionError, ValueError, RuntimeError, KeyError
            ok, what = False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        failed += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {path}: {what}")
    print(f"{len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
