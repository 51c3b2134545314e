"""Test bodies that run on every rank of a world (imported by the spawned processes)."""

from __future__ import annotations

import contextlib
import json
import copy
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

import dualpipe_rs
from dualpipe_rs.torch import Pipeline, PipelineError, WeightGradStore, run_backward

HIDDEN = 8


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    """A plain stage: Linear-GELU-Linear with biases."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class CheckpointBlock(nn.Module):
    """A stage with a reentrant activation checkpoint (``use_reentrant=True``), which cannot be
    split: Linear, then a checkpointed Linear-GELU-Linear as a residual."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.pre = nn.Linear(hidden, hidden)
        self.inner = Block(hidden)

    def forward(self, x):
        h = self.pre(x)  # needs a gradient on every stage, so the checkpoint gives one
        return h + torch.utils.checkpoint.checkpoint(self.inner, h, use_reentrant=True)


class LoraBlock(nn.Module):
    """A frozen linear layer (no gradient) with a trainable low-rank adapter beside it."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.base = nn.Linear(hidden, hidden)
        self.base.requires_grad_(False)
        self.a = nn.Linear(hidden, 2, bias=False)
        self.b = nn.Linear(2, hidden, bias=False)

    def forward(self, x):
        return F.gelu(self.base(x) + self.b(self.a(x)))


def _hook_stage_class(store, backward):
    """The reference example's stage, written against a given store and backward helper."""

    class Func(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            ctx.bias = bias is not None
            return F.linear(x, weight, bias)

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
            # The bias gradient goes back through autograd, as in a plain function.
            grad_bias = grad_output.flatten(0, -2).sum(0) if ctx.bias else None
            return grad_output @ weight, None, grad_bias

    class Lin(nn.Linear):
        def forward(self, x):
            return Func.apply(x, self.weight, self.bias)

    class Stage(nn.Module):
        calls = 0

        def __init__(self) -> None:
            super().__init__()
            self.linear1 = Lin(HIDDEN, HIDDEN * 4)
            self.linear2 = Lin(HIDDEN * 4, HIDDEN, bias=False)

        def forward(self, x):
            return self.linear2(F.gelu(self.linear1(x)))

        @classmethod
        def overlapped_forward_backward(
            cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1
        ):
            Stage.calls += 1
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

    return Stage


# The reference example's stage on this package's store: deferred-W linears and the overlap hook.
HookStage = _hook_stage_class(WeightGradStore, run_backward)


def criterion(output, target):
    return F.mse_loss(output, target).clone()


def cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


def full_model(stages: int, kind=Block, seed: int = 233) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[kind() for _ in range(stages)]).double()


def data(batch: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, HIDDEN, generator=g, dtype=torch.float64)
    y = torch.randn(batch, HIDDEN, generator=g, dtype=torch.float64)
    return x, y


def reference(model: nn.Sequential, x, y, chunks: int):
    """Single process: each micro-batch forward then backward; losses and outputs."""
    model.zero_grad(set_to_none=True)
    losses, outs = [], []
    for mx, my in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
        out = model(mx)
        loss = criterion(out, my)
        loss.backward()
        losses.append(loss.detach())
        outs.append(out.detach())
    return torch.stack(losses), torch.cat(outs)


def feeds(schedule, rank: int, x, y):
    """What a rank passes to step(): its inputs and labels, pipelines in document order."""
    s = schedule
    chunks = list(x.tensor_split(s.num_microbatches))
    lchunks = list(y.tensor_split(s.num_microbatches))
    xs, ys, in_mbs, out_mbs = [], [], [], []
    for pipe in s.pipelines:
        mbs = sorted(pipe["microbatches"])
        if pipe["route"][0] == rank:
            xs += [chunks[m] for m in mbs]
            in_mbs += mbs
        if pipe["route"][-1] == rank:
            ys += [lchunks[m] for m in mbs]
            out_mbs += mbs
    inp = torch.cat(xs) if xs else None
    lab = torch.cat(ys) if ys else None
    return inp, lab, in_mbs, out_mbs


# --------------------------------------------------------------------------- conformance


def conformance(rank: int, cases, steps: int = 2, kind: str = "block", rows: Optional[int] = None):
    """Every case: (family, ranks, microbatches, chunks_per_rank), or a schedule document (JSON
    text: its training steps only). For both execution models, training then forward-only:
    losses and outputs bitwise equal to the single-process run, gradients within
    cal_diff < 1e-13. Returns the number of checks made."""
    torch.set_num_threads(1)
    checks = 0
    for case in cases:
        if isinstance(case, str):
            schedule = dualpipe_rs.Schedule.from_json(case)
            family, n, c, v = schedule.name, schedule.num_ranks, schedule.num_microbatches, None
        else:
            family, n, c, v = case
            schedule = dualpipe_rs.plan(family, n, c, chunks_per_rank=v)
        stages = schedule.num_stages
        model_kind = {"hook": HookStage, "checkpoint": CheckpointBlock, "lora": LoraBlock}.get(
            kind, Block
        )
        model = full_model(stages, model_kind)
        per = 2 if stages <= 8 else 1
        x, y = data(rows or c * per)
        ref_loss, ref_out = reference(model, x, y, c)
        ref_grads = {
            s: [None if p.grad is None else p.grad.clone() for p in model[s].parameters()]
            for s in range(stages)
        }
        mine = schedule.stages_on(rank)
        inp, lab, in_mbs, out_mbs = feeds(schedule, rank, x, y)
        out_rows = torch.cat([ref_out.tensor_split(c)[m] for m in out_mbs]) if out_mbs else None
        calls = HookStage.calls
        for execution in ("blocking", "async"):
            modules = [copy.deepcopy(model[s]) for s in mine]
            pipe = Pipeline(schedule, modules, execution=execution, timeout=60)
            for step in range(steps):
                for m in modules:
                    m.zero_grad(set_to_none=True)
                loss, outs = pipe.step(
                    inp, num_chunks=c, criterion=criterion, labels=(lab,), return_outputs=True
                )
                where = f"{family} {n}x{c} {execution} step {step} rank {rank}"
                if out_mbs:
                    want = torch.stack([ref_loss[m] for m in out_mbs])
                    assert torch.equal(loss, want), f"{where}: losses differ {loss} {want}"
                    assert torch.equal(outs.detach(), out_rows), f"{where}: outputs differ"
                else:
                    assert loss is None and outs is None, where
                pipe.sum_copy_gradients()
                for s, m in zip(mine, modules):
                    for p, g in zip(m.parameters(), ref_grads[s]):
                        if not p.requires_grad:
                            assert p.grad is None, f"{where}: stage {s}: a frozen gradient"
                            continue
                        assert p.grad is not None, f"{where}: stage {s} has no gradient"
                        d = cal_diff(p.grad, g)
                        assert d < 1e-13, f"{where}: stage {s} cal_diff {d}"
                checks += 1
            if isinstance(case, str):
                continue
            with torch.no_grad():
                loss, outs = pipe.step(
                    inp, num_chunks=c, criterion=criterion, labels=(lab,), return_outputs=True
                )
            if out_mbs:
                want = torch.stack([ref_loss[m] for m in out_mbs])
                assert torch.equal(loss, want), f"{family} {execution} no_grad: losses differ"
                assert torch.equal(outs, out_rows), f"{family} {execution} no_grad: outputs differ"
            checks += 1
        if kind == "hook" and any(o["op"] == "FB" for o in schedule.instructions(rank)):
            assert HookStage.calls > calls, f"{family}: the overlap hook never ran"
        if isinstance(case, str):
            continue
        # A forward-only schedule run as it is.
        fwd = dualpipe_rs.plan(family, n, c, chunks_per_rank=v, forward_only=True)
        pipe = Pipeline(fwd, [copy.deepcopy(model[s]) for s in fwd.stages_on(rank)], timeout=60)
        with torch.no_grad():
            loss, outs = pipe.step(inp, criterion=criterion, labels=(lab,), return_outputs=True)
        if out_mbs:
            assert torch.equal(outs, out_rows), f"{family} forward-only: outputs differ"
        checks += 1
    return checks


# --------------------------------------------------------------------------- the reference


def against_reference(rank: int, n: int, c: int):
    """The reference DualPipe (PyPI 1.0.0, its two CUDA device uses patched to CPU at run
    time) and our Pipeline on the same program: losses, gradients and outputs bit for bit."""
    import dualpipe
    import dualpipe.comm as rcomm
    import dualpipe.utils as rutils

    import dualpipe_rs.torch as ours

    torch.set_num_threads(1)
    world = dist.get_world_size()
    assert world == n
    saved_device = torch.cuda.current_device
    saved_build = rcomm.build_from_tensor_shapes
    torch.cuda.current_device = lambda: "cpu"
    rcomm.build_from_tensor_shapes = lambda: [
        torch.empty(s, dtype=rcomm.TENSOR_DTYPE, requires_grad=True) for s in rcomm.TENSOR_SHAPES
    ]
    try:
        results = {}
        for name, store, backward, make in (
            ("reference", dualpipe.WeightGradStore, rutils.run_backward, None),
            ("ours", ours.WeightGradStore, ours.run_backward, None),
        ):
            Stage = _hook_stage_class(store, backward)
            torch.manual_seed(233)
            full = nn.Sequential(*[Stage() for _ in range(n)]).double()
            x, y = data(c * 2)
            local = [copy.deepcopy(full[rank]), copy.deepcopy(full[n - 1 - rank])]
            if rank == 0:
                xi, li = x.chunk(2)[0], y.chunk(2)[1]
            elif rank == n - 1:
                xi, li = x.chunk(2)[1], y.chunk(2)[0]
            else:
                xi, li = None, None
            if name == "reference":
                dualpipe.set_p2p_tensor_shapes([(2, HIDDEN)])
                dualpipe.set_p2p_tensor_dtype(torch.float64)
                model = dualpipe.DualPipe(local)
            else:
                ours.set_p2p_tensor_shapes([(2, HIDDEN)])
                ours.set_p2p_tensor_dtype(torch.float64)
                model = ours.Pipeline(dualpipe_rs.plan("dualpipe", n, c), local)
            loss, _ = model.step(xi, num_chunks=c, criterion=criterion, labels=(li,))
            grads = [p.grad.clone() for m in local for p in m.parameters()]
            with torch.no_grad():
                iloss, outs = model.step(
                    xi, num_chunks=c, criterion=criterion, labels=(li,), return_outputs=True
                )
            results[name] = (loss, grads, iloss, outs)
        ref, got = results["reference"], results["ours"]
        if rank in (0, n - 1):
            assert torch.equal(ref[0], got[0]), f"rank {rank}: losses differ"
            assert torch.equal(ref[2], got[2]), f"rank {rank}: inference losses differ"
            assert torch.equal(ref[3], got[3]), f"rank {rank}: outputs differ"
        else:
            assert got[0] is None and ref[0] is None
        for a, b in zip(ref[1], got[1]):
            assert torch.equal(a, b), f"rank {rank}: gradients differ, cal_diff {cal_diff(a, b)}"
        return True
    finally:
        torch.cuda.current_device = saved_device
        rcomm.build_from_tensor_shapes = saved_build
        ours_shapes_reset()


def ours_shapes_reset() -> None:
    from dualpipe_rs.torch import _comm

    _comm._P2P_SHAPES = None
    _comm._P2P_DTYPE = None


# --------------------------------------------------------------------------- deferral


def deferral(rank: int):
    """With a zero-bubble schedule, each deferring B leaves the stage's weight gradient
    absent and its W makes it present."""
    from dualpipe_rs.torch import _pipeline

    schedule = dualpipe_rs.plan("zbv", 1, 2)
    ops = schedule.instructions(0)
    assert any(o["op"] == "B" and o["defer_w"] for o in ops)
    model = full_model(schedule.num_stages)
    seen = []

    class Watch(Pipeline):
        def _backward(self, prog, st, index, stage, mb, defer):
            super()._backward(prog, st, index, stage, mb, defer)
            if defer and mb == 0:
                seen.append(("B", all(p.grad is None for p in self._stage_module[stage].parameters())))

        def _weight(self, st, stage, mb):
            super()._weight(st, stage, mb)
            if mb == 0:
                seen.append(("W", all(p.grad is not None for p in self._stage_module[stage].parameters())))

    x, y = data(4)
    pipe = Watch(schedule, [copy.deepcopy(model[s]) for s in schedule.stages_on(0)])
    pipe.step(x, criterion=criterion, labels=(y,))
    assert ("B", True) in seen and ("W", True) in seen, seen
    assert all(ok for _, ok in seen), seen
    return True


# --------------------------------------------------------------------------- DP x PP


def dp_pp(rank: int):
    """Four processes: two pipelines of two ranks (dualpipe), data parallel across them.
    Copies are summed first, then the data-parallel all-reduce."""
    torch.set_num_threads(1)
    pp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pp_index, pp_rank = divmod(rank, 2)
    c = 4
    schedule = dualpipe_rs.plan("dualpipe", 2, c)
    model = full_model(2)
    x, y = data(4 * c)
    ref_loss, _ = reference(model, x, y, 2 * c)
    xs, ys = x.chunk(2)[pp_index], y.chunk(2)[pp_index]
    inp, lab, _, out_mbs = feeds(schedule, pp_rank, xs, ys)
    mine = schedule.stages_on(pp_rank)
    modules = [copy.deepcopy(model[s]) for s in mine]
    pipe = Pipeline(schedule, modules, process_group=pp_groups[pp_index])
    loss, _ = pipe.step(inp, criterion=criterion, labels=(lab,))
    want = torch.stack([ref_loss[pp_index * c + m] for m in out_mbs])
    assert torch.equal(loss, want), f"rank {rank}: losses differ"
    pipe.sum_copy_gradients()
    for m in modules:
        for p in m.parameters():
            dist.all_reduce(p.grad, group=dp_groups[pp_rank])
    for s, m in zip(mine, modules):
        for p, q in zip(m.parameters(), model[s].parameters()):
            d = cal_diff(p.grad, q.grad)
            assert d < 1e-13, f"rank {rank}: stage {s} cal_diff {d}"
    for g in pp_groups + dp_groups:
        dist.destroy_process_group(g)
    return True


# --------------------------------------------------------------------------- profile


def profile_case(rank: int, trace_path: str, costs_path: str):
    import json
    import os

    schedule = dualpipe_rs.plan("dualpipev", 2, 4)
    model = full_model(schedule.num_stages)
    x, y = data(8)
    inp, lab, _, _ = feeds(schedule, rank, x, y)
    pipe = Pipeline(
        schedule, [copy.deepcopy(model[s]) for s in schedule.stages_on(rank)], profile=True
    )
    for _ in range(2):
        pipe.step(inp, criterion=criterion, labels=(lab,))
    summary = pipe.profile.summary()
    pipe.profile.chrome_trace(trace_path)
    costs = pipe.profile.costs(costs_path)
    assert {"f", "b", "stages"} <= set(costs) and costs["unit"] == "ms", costs
    assert costs["microbatch_size"] == 2, costs
    assert len(costs["stages"]) == schedule.num_stages, costs
    sim = schedule.simulate(costs=costs)
    assert sim["makespan"] > 0
    # measure -> tune: the profile's costs say their micro-batch size, so tune scales them.
    tuned = dualpipe_rs.tune(costs, ranks=2, global_batch=8)
    assert tuned["measured_microbatch_size"] == 2.0 and tuned["schedule"] is not None, tuned
    if rank == 0:
        trace = json.load(open(trace_path))
        pids = {e["pid"] for e in trace["traceEvents"]}
        assert pids == {0, 1}, pids
        names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
        assert any(n.startswith("FB") for n in names), names
        assert json.load(open(costs_path)) == costs
        os.remove(costs_path)
    assert len(summary["ranks"]) == 2
    for r in summary["ranks"]:
        assert r["busy"] > 0 and r["idle"] >= 0
    assert summary["simulated_bubble"] is not None, summary
    return summary


def freed_without_gc(rank: int):
    """A used Pipeline (profiled, blocking and async) is freed by reference counting alone.

    A reference cycle would keep its process group alive past ``destroy_process_group()``
    until interpreter shutdown, when gloo's threads may still release tensors and abort."""
    import gc
    import weakref

    freed = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for execution in ("blocking", "async"):
            schedule = dualpipe_rs.plan("dualpipev", dist.get_world_size(), 4)
            model = full_model(schedule.num_stages)
            x, y = data(8)
            inp, lab, _, _ = feeds(schedule, rank, x, y)
            pipe = Pipeline(
                schedule,
                [copy.deepcopy(model[s]) for s in schedule.stages_on(rank)],
                profile=True,
                execution=execution,
            )
            pipe.step(inp, criterion=criterion, labels=(lab,))
            pipe.sum_copy_gradients()
            pipe.profile.summary()
            ref = weakref.ref(pipe)
            del pipe
            freed.append(ref() is None)
    finally:
        if enabled:
            gc.enable()
    return freed


def fb_streams_case(rank: int, family: str, c: int, execution: str):
    """``FB`` on two streams, with stand-in streams on CPU: the forward half of every ``FB``
    goes to a different stream than the one its backward half runs on (where that
    micro-batch's forward ran), tensors crossing streams are recorded, and the losses and
    gradients stay those of one process."""
    from dualpipe_rs.torch._streams import FBStreams, StreamOps

    class Stream:
        def __init__(self, name):
            self.name = name

    main = Stream("main")
    current = [main]
    waits, records = [], []

    @contextlib.contextmanager
    def use(stream):
        current.append(stream)
        try:
            yield stream
        finally:
            current.pop()

    ops = StreamOps(
        current=lambda: current[-1],
        new_stream=lambda: Stream("side"),
        use=use,
        wait=lambda waiter, producer: waits.append((waiter.name, producer.name)),
        record=lambda tensor, stream: records.append((tensor.data_ptr(), stream.name)),
    )
    schedule = dualpipe_rs.plan(family, dist.get_world_size(), c)
    model = full_model(schedule.num_stages)
    x, y = data(2 * c)
    ref_loss, _ = reference(model, x, y, c)
    ref_grads = {s: [p.grad.clone() for p in model[s].parameters()] for s in range(schedule.num_stages)}
    mine = schedule.stages_on(rank)
    inp, lab, _, out_mbs = feeds(schedule, rank, x, y)
    modules = [copy.deepcopy(model[s]) for s in mine]
    pipe = Pipeline(schedule, modules, execution=execution, timeout=60)
    pipe._fb = FBStreams(ops)
    # Where each (stage, micro-batch)'s forward ran: its backward kernels run there too.
    ran_on = {}
    plain_forward = pipe._forward

    def forward(prog, st, index, stage, mb):
        ran_on[(stage, mb)] = current[-1].name
        plain_forward(prog, st, index, stage, mb)

    pipe._forward = forward
    loss, _ = pipe.step(inp, criterion=criterion, labels=(lab,))
    pipe.sum_copy_gradients()
    if out_mbs:
        assert torch.equal(loss, torch.stack([ref_loss[m] for m in out_mbs])), "losses differ"
    for s, m in zip(mine, modules):
        for p, g in zip(m.parameters(), ref_grads[s]):
            assert cal_diff(p.grad, g) < 1e-13, f"stage {s}"
    pairs = [o for o in schedule.instructions(rank) if o["op"] == "FB"]
    for o in pairs:
        f, b = (o["f"]["stage"], o["f"]["mb"]), (o["b"]["stage"], o["b"]["mb"])
        assert ran_on[f] != ran_on[b], (o, ran_on[f], ran_on[b])
    on_side = [k for k, v in ran_on.items() if v == "side"]
    assert bool(on_side) == bool(pairs), (on_side, pairs)
    assert not pipe._fb.on_side, "every backward of a side forward was seen"
    assert ("side", "main") in waits or not on_side
    assert ("main", "side") in waits or not pairs
    assert {name for _, name in records} == ({"main", "side"} if on_side else set()), records
    return len(pairs)


def fb_streams_refused(rank: int):
    schedule = dualpipe_rs.plan("dualpipev", 1, 2)
    try:
        Pipeline(schedule, [Block(), Block()], fb_streams=True)
    except ValueError as exc:
        assert "needs the stages on a CUDA device" in str(exc), exc
        return True
    return False


def posted_one_by_one(rank: int):
    """On gloo a pipeline posts its messages to the process group one by one."""
    pipe = Pipeline(dualpipe_rs.plan("dualpipev", 1, 2), [Block(), Block()])
    return pipe._post_each


def mapped(rank: int):
    """rank_mapping=[1, 0]: process 0 runs pipeline rank 1 and the other way round."""
    schedule = dualpipe_rs.plan("zb1p", 2, 4)
    model = full_model(2)
    x, y = data(8)
    ref_loss, _ = reference(model, x, y, 4)
    pipe_rank = 1 - rank
    inp, lab, _, out_mbs = feeds(schedule, pipe_rank, x, y)
    module = copy.deepcopy(model[pipe_rank])
    pipe = Pipeline(schedule, [module], rank_mapping=[1, 0])
    assert pipe.rank == pipe_rank
    loss, _ = pipe.step(inp, criterion=criterion, labels=(lab,))
    if out_mbs:
        assert torch.equal(loss, ref_loss)
    for p, q in zip(module.parameters(), model[pipe_rank].parameters()):
        assert cal_diff(p.grad, q.grad) < 1e-13
    return True


def mesh_groups(rank: int):
    """The pipeline group taken from a DeviceMesh (data parallel 2 x pipeline 2)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pp, dp = mesh.get_group("pp"), mesh.get_group("dp")
    pp_index = mesh.get_coordinate()[0]
    pp_rank = dist.get_rank(pp)
    schedule = dualpipe_rs.plan("dualpipev", 2, 4)
    model = full_model(4)
    x, y = data(16)
    ref_loss, _ = reference(model, x, y, 8)
    inp, lab, _, out_mbs = feeds(schedule, pp_rank, x.chunk(2)[pp_index], y.chunk(2)[pp_index])
    mine = schedule.stages_on(pp_rank)
    modules = [copy.deepcopy(model[s]) for s in mine]
    pipe = Pipeline(schedule, modules, process_group=pp)
    loss, _ = pipe.step(inp, criterion=criterion, labels=(lab,))
    if out_mbs:
        assert torch.equal(loss, ref_loss[pp_index * 4 : pp_index * 4 + 4])
    pipe.sum_copy_gradients()
    for m in modules:
        for p in m.parameters():
            dist.all_reduce(p.grad, group=dp)
    for s, m in zip(mine, modules):
        for p, q in zip(m.parameters(), model[s].parameters()):
            assert cal_diff(p.grad, q.grad) < 1e-13
    return True


def autocast_case(rank: int, family: str):
    """A training step under ``torch.autocast`` (bfloat16 on CPU, float32 parameters): the
    bfloat16 activations cross ranks, and the losses equal a single-process autocast run's
    bit for bit (gradients within cal_diff < 1e-6)."""
    torch.set_num_threads(1)
    s = dualpipe_rs.plan(family, 2, 4)
    model = full_model(s.num_stages).float()
    x, y = data(8)
    x, y = x.float(), y.float()
    ref = copy.deepcopy(model)
    losses = []
    for xm, ym in zip(x.tensor_split(4), y.tensor_split(4)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = criterion(ref(xm), ym)
        loss.backward()
        losses.append(loss.detach())
    mine = s.stages_on(rank)
    modules = [copy.deepcopy(model[i]) for i in mine]
    pipe = Pipeline(s, modules, timeout=60)
    inp, lab, _, out_mbs = feeds(s, rank, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = pipe.step(inp, num_chunks=4, criterion=criterion, labels=(lab,))
    pipe.sum_copy_gradients()
    if out_mbs:
        want = torch.stack([losses[m] for m in out_mbs])
        assert loss.dtype == want.dtype and torch.equal(loss, want), f"{family}: {loss} {want}"
    for i, m in zip(mine, modules):
        for p, q in zip(m.parameters(), ref[i].parameters()):
            d = cal_diff(p.grad, q.grad)
            assert d < 1e-6, f"{family} stage {i}: cal_diff {d}"
    return len(out_mbs)


# A forward-only schedule in which rank 0 sends micro-batch 0 down the V and receives it back
# in one batch, while rank 1 receives it in one batch and sends it back in a later one. On the
# step that learns the shapes, rank 0 must not wait for the returning message's description
# before it has sent the outgoing one's data (rank 1 needs that data to get there).
ONE_BATCH_TURN = json.dumps({
    "format": "dualpipe-schedule/v1", "schedule": "one-batch-turn", "num_ranks": 2,
    "num_stages": 4, "num_microbatches": 1, "forward_only": True,
    "pipelines": [{"route": [0, 1, 1, 0], "microbatches": [0]}],
    "ranks": [
        [
            {"op": "F", "stage": 0, "mb": 0},
            {"op": "send", "kind": "act", "stage": 0, "mb": 0, "peer": 1},
            {"op": "recv", "kind": "act", "stage": 3, "mb": 0, "peer": 1},
            {"op": "commit"},
            {"op": "F", "stage": 3, "mb": 0},
        ],
        [
            {"op": "recv", "kind": "act", "stage": 1, "mb": 0, "peer": 0},
            {"op": "commit"},
            {"op": "F", "stage": 1, "mb": 0},
            {"op": "F", "stage": 2, "mb": 0},
            {"op": "send", "kind": "act", "stage": 2, "mb": 0, "peer": 0},
            {"op": "commit"},
        ],
    ],
})


def forward_only_document(rank: int, text: str):
    """A forward-only schedule document, both execution models, two steps each (the first
    learns the shapes): outputs bitwise equal to the single-process forward."""
    torch.set_num_threads(1)
    schedule = dualpipe_rs.Schedule.from_json(text)
    c = schedule.num_microbatches
    model = full_model(schedule.num_stages)
    x, y = data(2 * c)
    with torch.no_grad():
        want = model(x)
    inp, lab, _, out_mbs = feeds(schedule, rank, x, y)
    checks = 0
    for execution in ("blocking", "async"):
        modules = [copy.deepcopy(model[s]) for s in schedule.stages_on(rank)]
        pipe = Pipeline(schedule, modules, execution=execution, timeout=20)
        for _ in range(2):
            with torch.no_grad():
                _, outs = pipe.step(inp, criterion=criterion, labels=(lab,), return_outputs=True)
            if out_mbs:
                rows = torch.cat([want.tensor_split(c)[m] for m in out_mbs])
                assert torch.equal(outs, rows), f"{execution}: outputs differ"
            checks += 1
    return checks


def mutants(seed: int, count: int, cases) -> List[str]:
    """``count`` valid schedule documents made from the planned ``cases`` ((family, ranks,
    microbatches)) by random edits the validator accepts: a commit removed (two batches
    merged), a send moved later, a receive moved earlier. Deterministic for a seed."""
    import random

    rng = random.Random(seed)
    found: List[str] = []
    for _ in range(200 * count):
        if len(found) == count:
            break
        family, n, c = rng.choice(cases)
        doc = json.loads(dualpipe_rs.plan(family, n, c).to_json())
        doc["schedule"] = f"mutant-{family}"
        for _ in range(rng.randint(1, 6)):
            ins = doc["ranks"][rng.randrange(n)]
            edit = rng.random()
            if edit < 0.4:
                commits = [i for i, x in enumerate(ins) if x["op"] == "commit"][:-1]
                if commits:
                    del ins[rng.choice(commits)]
            else:
                kind = "send" if edit < 0.7 else "recv"
                at = [i for i, x in enumerate(ins) if x["op"] == kind]
                if at:
                    i = rng.choice(at)
                    op = ins.pop(i)
                    step = rng.randint(1, 4)
                    ins.insert(min(len(ins), i + step) if kind == "send" else max(0, i - step), op)
            if ins and ins[-1]["op"] in ("send", "recv"):
                ins.append({"op": "commit"})
        text = json.dumps(doc)
        try:
            dualpipe_rs.Schedule.from_json(text)
        except dualpipe_rs.ScheduleError:
            continue
        found.append(text)
    assert len(found) == count, f"only {len(found)} valid mutants"
    return found


def gloo_loop_policy(rank: int):
    """set_gloo_loop_policy moves this process's gloo event-loop threads (and nothing else)
    to SCHED_BATCH and back; a pipeline step keeps its exact results in between."""
    import os
    import threading

    from dualpipe_rs.torch import gloo_loop_threads, set_gloo_loop_policy
    from dualpipe_rs.torch._gloo import early_receives_pay, leading_pays, loops_batched

    dist.barrier()
    found = gloo_loop_threads()
    assert found, f"rank {rank}: no gloo event-loop thread found"
    assert threading.get_native_id() not in found
    try:
        assert not loops_batched() and early_receives_pay() and leading_pays()
        changed = set_gloo_loop_policy()
        assert changed == found, (changed, found)
        assert loops_batched()
        # No exchange is ordered while no loop preempts.
        assert not leading_pays()
        # Early receives: only on a rank held to one core while the loops are batched.
        cores = os.sched_getaffinity(0)
        assert early_receives_pay() == (len(cores) == 1)
        for tid in changed:
            assert os.sched_getscheduler(tid) == os.SCHED_BATCH, tid
            with open(f"/proc/self/task/{tid}/comm") as f:
                assert not f.read().startswith("pt_"), tid
        # Every other thread keeps its policy.
        others = [int(t) for t in os.listdir("/proc/self/task") if int(t) not in changed]
        for tid in others:
            try:
                assert os.sched_getscheduler(tid) != os.SCHED_BATCH, tid
            except ProcessLookupError:
                pass
        # Receives posted at their own commit while the loops are batched: still exact.
        conformance(rank, [("dualpipev", 2, 4, None), ("zb1p", 2, 4, None)], steps=2)
        if len(cores) > 1:
            # Held to one core, early again: still exact.
            os.sched_setaffinity(0, {min(cores)})
            try:
                assert early_receives_pay()
                conformance(rank, [("dualpipev", 2, 4, None)], steps=2)
            finally:
                os.sched_setaffinity(0, cores)
    finally:
        back = set_gloo_loop_policy(batch=False)
    assert back == found, (back, found)
    assert not loops_batched() and leading_pays()
    for tid in back:
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER, tid
    return True


def ordered_exchanges(rank: int, late_leader: str):
    """On gloo, where two ranks exchange messages at one commit, the follower (rank 1 of 2)
    waits for its leader's messages of that batch before it posts its sends, at every commit
    the analysis picks, and the leader never waits first. The results are those of the same
    pipeline without the ordering, bit for bit; a schedule whose exchange cannot be ordered
    without deadlock (``late_leader``) still runs exactly."""
    torch.set_num_threads(1)
    schedule = dualpipe_rs.plan("dualpipev", 2, 4)
    model = full_model(schedule.num_stages)
    x, y = data(8)
    inp, lab, _, _ = feeds(schedule, rank, x, y)
    results = []
    for lead in (True, False):
        modules = [copy.deepcopy(model[s]) for s in schedule.stages_on(rank)]
        pipe = Pipeline(schedule, modules, timeout=60)
        pipe._lead = lead
        events = []
        post, wait = pipe._post, pipe._wait

        def spy_post(ops, post=post, events=events):
            events.append(("post", any(o[0] for o in ops)))
            return post(ops)

        def spy_wait(prog, index, works, what, batch=None, wait=wait, events=events):
            events.append(("wait", index, what))
            return wait(prog, index, works, what, batch)

        pipe._post, pipe._wait = spy_post, spy_wait
        for step in range(2):
            events.clear()
            for m in modules:
                m.zero_grad(set_to_none=True)
            loss, _ = pipe.step(inp, num_chunks=4, criterion=criterion, labels=(lab,))
        leaders = pipe._programs["train"].leaders
        ordered = [e for e in events if e[0] == "wait" and "this batch from rank" in e[2]]
        if not lead or rank == 0:
            assert not ordered, (rank, lead, ordered)
            if rank == 0:
                assert not leaders
        else:
            assert leaders and all(v[0] == {0} for v in leaders.values()), leaders
            assert sorted(e[1] for e in ordered) == sorted(leaders), (ordered, leaders)
            for e in ordered:
                assert e[2] == "the messages of this batch from rank 0", e
                # Between the commit's first post and this wait, nothing was sent; the next
                # post sends.
                at = events.index(e)
                assert events[at + 1] == ("post", True), events[at - 2 : at + 2]
                before = events[at - 1]
                assert before == ("post", False) or before[0] == "wait", before
        results.append((loss, [p.grad.clone() for m in modules for p in m.parameters()]))
    (l1, g1), (l2, g2) = results
    assert (l1 is None) == (l2 is None)
    if l1 is not None:
        assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    return conformance(rank, [late_leader], steps=2)
