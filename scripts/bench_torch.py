"""Step time of the torch runtime against the reference DualPipe and torch's ScheduleDualPipeV.

Usage::

    python scripts/bench_torch.py [--ranks 2] [--hidden 64 512] [--steps 9] [--chunks 8] [--pin]
        [--gloo-batch] [--runs 1]

Two processes (gloo on CPU; NCCL, one GPU each, with --cuda) run the reference example's model
(stages of Linear(h, 4h) - GELU - Linear(4h, h), micro-batches of 2 x 64 tokens):

- ``Pipeline`` running dualpipe against the reference ``DualPipe`` (the PyPI package
  ``dualpipe==1.0.0``, its two CUDA device uses patched at run time), on the reference
  example's stages (weight gradients deferred through the WeightGradStore, the overlap hook);
- ``Pipeline`` running dualpipev against torch's ``ScheduleDualPipeV``, both on plain
  ``nn.Linear`` stages (each runtime splits the backward its own way); on CPU, torch's messages
  from its last rank to itself (which gloo refuses) are delivered in process;
- in one process, a backward split into B (input gradient) then W (weight gradient) against
  one full backward of a stage.

The sides of each comparison take turns step by step (in reverse order every other step), so
load on the machine falls on all of them alike. Medians of ``--steps`` steps after two warm-up steps. Prints one Markdown table;
with ``--runs K``, K runs in fresh processes, then the median step times, every run's ratio and
the median ratio.
``--gloo-batch`` calls :func:`dualpipe_rs.torch.set_gloo_loop_policy` in every rank once its
group is up, which changes the process (gloo's event-loop thread), so all three runtimes alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

ROWS, SEQ = 2, 64
# Hidden sizes up to this one are "small" (runtime overhead shows): dualpipev's target there
# is 0.8x torch's step; above it, 1.0x.
SMALL_HIDDEN = 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store_stage(store, backward, hidden, dtype, device):
    """The reference example's stage, written against a given WeightGradStore."""

    class Func(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return F.linear(x, weight)

        @staticmethod
        def backward(ctx, grad_output):
            x, weight = ctx.saved_tensors
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)

            def grad_weight():
                weight.grad += grad_output.flatten(0, -2).T @ x.flatten(0, -2)

            if store.enabled:
                store.put(grad_weight)
            else:
                grad_weight()
            return grad_output @ weight, None

    class Lin(nn.Linear):
        def forward(self, x):
            return Func.apply(x, self.weight)

    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear1 = Lin(hidden, hidden * 4, bias=False)
            self.linear2 = Lin(hidden * 4, hidden, bias=False)

        def forward(self, x):
            return self.linear2(F.gelu(self.linear1(x)))

        @classmethod
        def overlapped_forward_backward(
            cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1
        ):
            outputs0 = module0(*inputs0)
            outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
            loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
            if loss1 is not None:
                loss1.backward()
                loss1.detach_()
            else:
                backward(outputs1, output_grads1)
            return outputs0, loss0

        overlaped_forward_backward = overlapped_forward_backward

    return Stage().to(device=device, dtype=dtype)


def _plain_stage(hidden, dtype, device):
    return nn.Sequential(
        nn.Linear(hidden, 4 * hidden, bias=False), nn.GELU(), nn.Linear(4 * hidden, hidden, bias=False)
    ).to(device=device, dtype=dtype)


def _criterion(output, target):
    return F.mse_loss(output, target).clone()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _alternate(device, steps, runners):
    """Median step time (ms) of each runner, running them in turn, step by step."""
    times = {name: [] for name in runners}
    order = list(runners.items())
    for i in range(steps + 2):
        # Every other step in reverse order, so neither side always runs right after the other.
        for name, run in order if i % 2 == 0 else order[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            if i >= 2:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _let_torch_send_to_itself(rank):
    """torch 2.11's ScheduleDualPipeV sends the turn of the V from the last rank to itself,
    which gloo cannot do ("Pair is not connected"). Deliver those messages in process, in
    order, so that torch's schedule runs on CPU at all; every other message goes as before."""
    import collections

    import torch.distributed.pipelining.schedules as schedules

    pending = collections.deque()
    original = schedules._batch_p2p

    def batch_p2p(ops, desc=None):
        rest = []
        for op in ops:
            if op.peer != rank:
                rest.append(op)
            elif op.op is dist.isend:
                pending.append(op.tensor.detach().clone())
        for op in ops:
            if op.peer == rank and op.op is dist.irecv:
                op.tensor.copy_(pending.popleft())
        return original(rest, desc) if rest else []

    schedules._batch_p2p = batch_p2p


def _worker(rank, ranks, port, args, queue):
    if args.pin:
        # One core per rank (as one GPU per rank): the rank's threads stay on it.
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if args.cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo", rank=rank, world_size=ranks)
    if args.gloo_batch and not args.cuda:
        from dualpipe_rs.torch import set_gloo_loop_policy

        dist.barrier()
        if not set_gloo_loop_policy():
            raise RuntimeError(f"rank {rank}: --gloo-batch found no gloo event-loop thread")

    import dualpipe
    import dualpipe.comm as rcomm
    import dualpipe.utils as rutils
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

    import dualpipe_rs
    import dualpipe_rs.torch as ours

    if not args.cuda:
        _let_torch_send_to_itself(rank)
        # The reference allocates receive buffers on "cuda" and asserts its modules are there.
        torch.cuda.current_device = lambda: "cpu"
        rcomm.build_from_tensor_shapes = lambda: [
            torch.empty(s, dtype=rcomm.TENSOR_DTYPE, requires_grad=True) for s in rcomm.TENSOR_SHAPES
        ]
    dtype = torch.float32
    c = args.chunks
    rows = []
    for hidden in args.hidden:
        torch.manual_seed(0)
        x = torch.randn(c * ROWS, SEQ, hidden, dtype=dtype, device=device)
        y = torch.randn(c * ROWS, SEQ, hidden, dtype=dtype, device=device)

        # dualpipe: ours against the reference, on the reference example's stages.
        shapes = [(ROWS, SEQ, hidden)]
        dualpipe.set_p2p_tensor_shapes(shapes)
        dualpipe.set_p2p_tensor_dtype(dtype)
        ref_mods = [_store_stage(dualpipe.WeightGradStore, rutils.run_backward, hidden, dtype, device) for _ in range(2)]
        our_mods = [_store_stage(ours.WeightGradStore, ours.run_backward, hidden, dtype, device) for _ in range(2)]
        for a, b in zip(our_mods, ref_mods):
            a.load_state_dict(b.state_dict())
        ref = dualpipe.DualPipe(ref_mods)
        pipe = ours.Pipeline(dualpipe_rs.plan("dualpipe", ranks, c), our_mods, p2p_shapes=shapes, p2p_dtype=dtype)
        if rank == 0:
            xi, li = x.chunk(2)[0], y.chunk(2)[1]
        elif rank == ranks - 1:
            xi, li = x.chunk(2)[1], y.chunk(2)[0]
        else:
            xi = li = None
        dp = _alternate(
            device,
            args.steps,
            {
                "reference": lambda: ref.step(xi, num_chunks=c, criterion=_criterion, labels=(li,)),
                "ours": lambda: pipe.step(xi, num_chunks=c, criterion=_criterion, labels=(li,)),
            },
        )

        # dualpipev: ours against torch's ScheduleDualPipeV, on plain stages.
        n_stages = 2 * ranks
        mods_t = [_plain_stage(hidden, dtype, device) for _ in range(2)]
        mods_o = [copy.deepcopy(m) for m in mods_t]
        idx = [rank, n_stages - 1 - rank]
        example = torch.empty(ROWS, SEQ, hidden, dtype=dtype, device=device)
        stages = [
            PipelineStage(m, i, n_stages, device, input_args=(example,), output_args=(example,))
            for m, i in zip(mods_t, idx)
        ]
        sched = ScheduleDualPipeV(stages, n_microbatches=c, loss_fn=F.mse_loss, scale_grads=False)
        vplan = dualpipe_rs.plan("dualpipev", ranks, c)
        vpipe = ours.Pipeline(vplan, mods_o, p2p_shapes=shapes, p2p_dtype=dtype)
        mods_a = [copy.deepcopy(m) for m in mods_t]
        apipe = ours.Pipeline(vplan, mods_a, p2p_shapes=shapes, p2p_dtype=dtype, execution="async")
        xv, yv = (x, y) if rank == 0 else (None, None)

        def torch_step():
            if rank == 0:
                sched.step(xv, target=yv)
            else:
                sched.step()
            for m in mods_t:
                m.zero_grad(set_to_none=True)

        def our_step():
            vpipe.step(xv, num_chunks=c, criterion=F.mse_loss, labels=(yv,))
            for m in mods_o:
                m.zero_grad(set_to_none=True)

        def our_async_step():
            apipe.step(xv, num_chunks=c, criterion=F.mse_loss, labels=(yv,))
            for m in mods_a:
                m.zero_grad(set_to_none=True)

        dv = _alternate(
            device, args.steps, {"torch": torch_step, "ours": our_step, "async": our_async_step}
        )
        rows.append((hidden, dp, dv))
        WeightGradStore = ours.WeightGradStore
        WeightGradStore.clear()
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _split_bench(hidden, steps, device):
    """Median ms of a full backward and of B (input gradient) + W (weight gradient), for a
    plain stage (the generic split) and for the reference example's stage (weight gradients
    deferred through the WeightGradStore)."""
    import dualpipe_rs.torch as ours
    from dualpipe_rs.torch import WeightGradStore, backward_input

    torch.manual_seed(0)
    x = torch.randn(ROWS, SEQ, hidden, device=device).requires_grad_()
    g = torch.randn(ROWS, SEQ, hidden, device=device)
    out = {}
    for kind in ("plain", "store"):
        if kind == "plain":
            stage = _plain_stage(hidden, torch.float32, device)
        else:
            stage = _store_stage(WeightGradStore, ours.run_backward, hidden, torch.float32, device)
        params = list(stage.parameters())

        def full():
            y = stage(x)
            t0 = time.perf_counter()
            torch.autograd.backward([y], [g])
            x.grad = None
            return time.perf_counter() - t0

        def split():
            y = stage(x)
            t0 = time.perf_counter()
            WeightGradStore.enabled = True
            try:
                _, later = backward_input([y], [g], [x], params)
            finally:
                WeightGradStore.enabled = False
            group = WeightGradStore.take()
            for fn in group:
                fn()
            later.run()
            return time.perf_counter() - t0

        times = {"full": [], "split": []}
        pair = (("full", full), ("split", split))
        for i in range(steps + 3):
            # In reverse order every other time, as the steps above.
            for name, fn in pair if i % 2 == 0 else pair[::-1]:
                stage.zero_grad(set_to_none=True)
                t = fn()
                if i >= 3:
                    times[name].append(t * 1e3)
        out[kind] = {k: statistics.median(v) for k, v in times.items()}
    return out


def _run_once(args):
    """One run in fresh processes: the rows of the table, as (hidden, measurement, ours ms,
    compared with, its ms, target)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        _worker, args=(args.ranks, _free_port(), args, queue), nprocs=args.ranks, start_method="spawn"
    )
    results = queue.get()
    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if args.cuda else torch.device("cpu")
    rows = []
    for hidden, dp, dv in results:
        step_target = 0.8 if hidden <= SMALL_HIDDEN else 1.0
        rows.append((hidden, "dualpipe step", dp["ours"], "reference DualPipe", dp["reference"], 1.0))
        rows.append((hidden, "dualpipev step", dv["ours"], "torch ScheduleDualPipeV", dv["torch"], step_target))
        rows.append((hidden, 'dualpipev step, execution="async"', dv["async"], "torch ScheduleDualPipeV", dv["torch"], step_target))
        sp = _split_bench(hidden, 3 * args.steps, device)
        for kind, label in (("plain", "plain stage"), ("store", "WeightGradStore stage")):
            t = sp[kind]
            rows.append((hidden, f"B (input grad) + W (weight grad), {label}", t["split"], "full B", t["full"], 1.1))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    parser.add_argument(
        "--pin", action="store_true", help="pin rank r's process to CPU core r (mod the cores)"
    )
    parser.add_argument(
        "--gloo-batch",
        action="store_true",
        help="move gloo's event-loop threads to SCHED_BATCH in every rank (set_gloo_loop_policy)",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs in fresh processes")
    args = parser.parse_args()
    if args.chunks < 2 * args.ranks or args.chunks % 2:
        parser.error("--chunks must be even and at least 2 x --ranks")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    runs = [_run_once(args) for _ in range(args.runs)]
    where = (
        f"{'cuda' if args.cuda else 'cpu, gloo'}, {args.ranks} ranks"
        f"{' pinned one per core' if args.pin else ''}"
        f"{', gloo loops SCHED_BATCH' if args.gloo_batch and not args.cuda else ''}, "
        f"{args.chunks} micro-batches of {ROWS}x{SEQ}"
    )
    print(f"torch {torch.__version__}; {where}; {time.strftime('%Y-%m-%d')}; medians of {args.steps} steps")
    if args.runs == 1:
        print("| hidden | measurement | dualpipe_rs | compared with | ratio | target |")
        print("|---|---|---|---|---|---|")
        for hidden, what, ours, other, theirs, target in runs[0]:
            digits = 3 if what.startswith("B ") else 2
            print(
                f"| {hidden} | {what} | {ours:.{digits}f} ms | {other} {theirs:.{digits}f} ms "
                f"| {ours / theirs:.2f}x | <= {target}x |"
            )
        return 0
    print(
        f"| hidden | measurement | dualpipe_rs, median of runs | compared with, median of runs "
        f"| ratio in each of {args.runs} runs | median ratio | target |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, (hidden, what, _, other, _, target) in enumerate(runs[0]):
        digits = 3 if what.startswith("B ") else 2
        ours = statistics.median(run[i][2] for run in runs)
        theirs = statistics.median(run[i][4] for run in runs)
        ratios = [run[i][2] / run[i][4] for run in runs]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        print(
            f"| {hidden} | {what} | {ours:.{digits}f} ms | {other} {theirs:.{digits}f} ms | {each} "
            f"| {statistics.median(ratios):.2f}x | <= {target}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
