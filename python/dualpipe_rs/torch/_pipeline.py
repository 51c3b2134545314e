"""The torch runtime: one rank's instruction list run against real ``nn.Module`` stages."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable

from .. import Schedule, plan
from . import _comm, _gloo, _lead
from ._profile import Profile
from ._split import backward_input
from ._store import WeightGradStore, run_backward
from ._streams import FBStreams, cuda_stream_ops

__all__ = ["Pipeline", "PipelineError"]

_F, _B, _W, _FB, _SEND, _RECV, _COMMIT = range(7)
_HOOKS = ("overlapped_forward_backward", "overlaped_forward_backward")
_ids = itertools.count()
# Whether a node type saves its own output (then the output's storage must stay).
_SAVES_RESULT: Dict[type, bool] = {}


class PipelineError(RuntimeError):
    """A step failed. ``rank`` is the pipeline rank that raises; ``index`` and ``instruction``
    name the instruction where one applies (else ``None``)."""

    def __init__(
        self, message: str, rank: int, index: Optional[int] = None, instruction: Optional[str] = None
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.index = index
        self.instruction = instruction


def _hook_of(module0: nn.Module, module1: nn.Module) -> Optional[Callable]:
    """The reference's overlap hook, when both modules are of one class that defines it."""
    if type(module0) is not type(module1):
        return None
    for name in _HOOKS:
        hook = getattr(type(module0), name, None)
        if hook is not None:
            return hook
    return None


def _as_list(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def _leaf_grads(inputs: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The gradients a backward left in the stage's input buffers (leaves it created)."""
    return [t.grad if t.requires_grad and t.is_leaf else None for t in inputs]


def _loss_backward(loss: torch.Tensor) -> None:
    """``loss.backward()``; for a plain real one-element tensor, the engine call it makes
    without its Python-side checks (the same gradient of one, the same accumulation)."""
    if (
        type(loss) is torch.Tensor
        and loss.requires_grad
        and loss.is_floating_point()
        and loss.numel() == 1
    ):
        ones = torch.ones_like(loss, memory_format=torch.preserve_format)
        Variable._execution_engine.run_backward((loss,), (ones,), False, False, (), True, True)
    else:
        loss.backward()


def _grad_dtype(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _scatter(tensors: Sequence[Optional[torch.Tensor]], chunks: int, dim: int):
    """Split every tensor into ``chunks`` along ``dim`` with ``tensor_split``, as the reference."""
    parts = [
        [None] * chunks if t is None else list(t.tensor_split(chunks, dim=dim)) for t in tensors
    ]
    if not parts:
        return [() for _ in range(chunks)]
    return [tuple(p) for p in zip(*parts)]


# Messages fused into one (see _fused_groups) carry at most this many bytes: above it the copies
# in and out of the fused buffer cost more than the posts they save.
_FUSE_MAX_BYTES = 1 << 20


def _fused_groups(schedule: Schedule, rank: int) -> Dict[int, Tuple[int, ...]]:
    """Instruction index -> the indices of its group, for every message of ``rank`` that
    travels fused with others: consecutive messages between the same two ranks that the
    sender posts in one batch and the receiver receives in one batch. Both ends compute the
    same groups (from the whole schedule), and a group keeps its place in the stream of
    messages between the two, so every message is still matched with its own."""
    mine = _comm.message_streams(schedule, rank)
    out: Dict[int, Tuple[int, ...]] = {}
    for peer in set(mine[0]) | set(mine[1]):
        if peer == rank:
            continue
        theirs = _comm.message_streams(schedule, peer)
        for local, remote, local_sends in (
            (mine[0].get(peer, []), theirs[1].get(rank, []), True),
            (mine[1].get(peer, []), theirs[0].get(rank, []), False),
        ):
            if len(local) != len(remote):
                continue
            run: List[int] = []
            key = None
            for (lb, li), (rb, _) in zip(local, remote):
                k = (lb, rb) if local_sends else (rb, lb)
                if k != key and run:
                    if len(run) > 1:
                        for j in run:
                            out[j] = tuple(run)
                    run = []
                key = k
                run.append(li)
            if len(run) > 1:
                for j in run:
                    out[j] = tuple(run)
    return out


class _Fused:
    """A received fused message: its byte buffer and, per member, the (shape, dtype,
    requires_grad) of the tensors it carries. Every member's tensors are copied out into
    their own storage (so no member keeps the others' bytes alive)."""

    __slots__ = ("buf", "members", "taken")

    def __init__(self, buf: torch.Tensor, members) -> None:
        self.buf = buf
        self.members = members
        self.taken = 0

    def take(self, member: int) -> List[torch.Tensor]:
        offset = sum(_nbytes(meta) for m in self.members[:member] for meta in m)
        out = []
        for shape, dtype, grad in self.members[member]:
            t = torch.empty(shape, dtype=dtype, device=self.buf.device)
            n = t.numel() * t.element_size()
            if n:
                t.reshape(-1).view(torch.uint8).copy_(self.buf[offset : offset + n])
            offset += n
            if grad:
                t.requires_grad_()
            out.append(t)
        self.taken += 1
        if self.taken == len(self.members):
            self.buf = None
        return out


class _Part:
    """One member's share of a :class:`_Fused` message, taken once it has arrived."""

    __slots__ = ("fused", "member")

    def __init__(self, fused: _Fused, member: int) -> None:
        self.fused = fused
        self.member = member

    def take(self) -> List[torch.Tensor]:
        return self.fused.take(self.member)


def _nbytes(meta) -> int:
    shape, dtype = meta[0], meta[1]
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


class _Program:
    """One schedule compiled for one rank: decoded instructions and where data comes from."""

    def __init__(self, schedule: Schedule, rank: int, to_global: Callable[[int], int]) -> None:
        self.schedule = schedule
        self.rank = rank
        self.last = schedule.num_stages - 1
        self.stages = list(schedule.stages_on(rank))
        self.route: Dict[int, List[int]] = {}
        self.input_mbs: List[int] = []
        self.label_mbs: List[int] = []
        for pipe in schedule.pipelines:
            route, mbs = list(pipe["route"]), sorted(pipe["microbatches"])
            for m in mbs:
                self.route[m] = route
            if route[0] == rank:
                self.input_mbs += mbs
            if route[-1] == rank:
                self.label_mbs += mbs
        self.text = list(schedule.instruction_text(rank))
        self.ops: List[tuple] = []
        for i, ins in enumerate(schedule.instructions(rank)):
            op = ins["op"]
            if op == "F":
                self.ops.append((_F, i, ins["stage"], ins["mb"]))
            elif op == "B":
                self.ops.append((_B, i, ins["stage"], ins["mb"], bool(ins.get("defer_w", False))))
            elif op == "W":
                self.ops.append((_W, i, ins["stage"], ins["mb"]))
            elif op == "FB":
                f, b = ins["f"], ins["b"]
                self.ops.append((_FB, i, f["stage"], f["mb"], b["stage"], b["mb"]))
            elif op in ("send", "recv"):
                code = _SEND if op == "send" else _RECV
                self.ops.append(
                    (code, i, ins["kind"] == "act", ins["stage"], ins["mb"], ins["peer"],
                     to_global(ins["peer"]))
                )
            else:
                self.ops.append((_COMMIT, i))
        # The receives of the batch that follows each commit (keyed by the commit's index; the
        # step's closing commit has the index len(ops)), posted at that commit where possible.
        self.next_recvs: Dict[int, Tuple[tuple, ...]] = {}
        commits = [op[1] for op in self.ops if op[0] == _COMMIT] + [len(self.ops)]
        batches: List[List[tuple]] = [[] for _ in commits]
        j = 0
        for op in self.ops:
            if op[0] == _COMMIT:
                j += 1
            elif op[0] == _RECV:
                batches[j].append(op)
        for j in range(len(commits) - 1):
            if batches[j + 1]:
                self.next_recvs[commits[j]] = tuple(batches[j + 1])
        self.fused = _fused_groups(schedule, rank)
        # Commit index -> the global ranks whose messages of that batch this rank receives
        # before it sends (see _lead); set where the group posts messages one by one.
        self.leaders: Dict[int, Tuple[frozenset, str]] = {}

    def local_prev(self, stage: int, mb: int) -> bool:
        """Whether stage-1 of ``mb`` runs on this rank (a hand-off, no message)."""
        return stage > 0 and self.route[mb][stage - 1] == self.rank

    def local_next(self, stage: int, mb: int) -> bool:
        """Whether stage+1 of ``mb`` runs on this rank."""
        return stage < self.last and self.route[mb][stage + 1] == self.rank


class _Step:
    """The state of one step on one rank."""

    def __init__(self) -> None:
        self.inputs: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        self.outputs: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        self.out_meta: Dict[Tuple[int, int], List[Tuple[torch.Size, torch.dtype]]] = {}
        self.losses: Dict[int, torch.Tensor] = {}
        self.last_outputs: Dict[int, List[torch.Tensor]] = {}
        self.local_grads: Dict[Tuple[int, int], List[Optional[torch.Tensor]]] = {}
        self.send_grads: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        self.pending_w: Dict[Tuple[int, int], tuple] = {}
        self.params: Dict[int, List[torch.nn.Parameter]] = {}
        self.act_bufs: Dict[Tuple[int, int], tuple] = {}
        self.grad_bufs: Dict[Tuple[int, int], tuple] = {}
        self.batch: List[tuple] = []
        self.send_works: List[Any] = []
        # Receives posted at the commit before their own: (act, stage, mb) -> (tensors, works).
        self.preposted: Dict[Tuple[bool, int, int], tuple] = {}
        self.to_free: List[torch.Tensor] = []
        self.feed: Dict[int, tuple] = {}
        self.labels: Dict[int, tuple] = {}
        self.criterion: Optional[Callable] = None
        self.return_outputs = False
        self.training = True
        # Whether each batch's receives are posted at the commit before it (see _commit).
        self.early = False
        # Whether exchanges at one commit are ordered, a follower receiving before it sends
        # (see _lead and _post_leading).
        self.lead = False


class Pipeline(nn.Module):
    """Runs a dualpipe schedule with real ``nn.Module`` stages over ``torch.distributed``.

    Args:
        schedule: the :class:`dualpipe_rs.Schedule` (validated) that every rank runs.
        modules: this rank's stage modules, in ``schedule.stages_on(rank)`` order (a list,
            tuple, ``nn.ModuleList`` or ``nn.Sequential``; a single module for one stage).
        process_group: the pipeline group (default: the default group); its size must equal
            ``schedule.num_ranks``.
        rank_mapping: ``rank_mapping[group rank]`` = pipeline rank (default: the identity).
        batch_dim: the dimension along which ``step`` splits inputs and labels.
        execution: ``"blocking"`` waits for every batch at its commit (as the reference does);
            ``"async"`` waits for a received buffer right before its first use.
        p2p_shapes, p2p_dtype: the shapes and dtype of the tensors that cross every stage
            boundary, as the reference's setters take them; by default (and unless
            :func:`set_p2p_tensor_shapes` was called) learnt on the first step.
        inference_schedule: the forward-only schedule run under ``torch.no_grad()``; by
            default planned from the schedule's family when the schedule is a planned one.
        profile: record every instruction's start and end (see :attr:`profile`).
        fb_streams: on a CUDA device, run the two halves of an ``FB`` without the overlap
            hook on two streams, so the forward of one micro-batch overlaps the backward of
            another (docs/torch.md, "FB on two streams"). Off by default.
        timeout: seconds a rank waits for its peers before raising :class:`PipelineError`
            (on gloo; NCCL stalls end by the process group's own timeout).
    """

    def __init__(
        self,
        schedule: Schedule,
        modules: Union[nn.Module, Sequence[nn.Module]],
        process_group: Optional[dist.ProcessGroup] = None,
        rank_mapping: Optional[Sequence[int]] = None,
        batch_dim: int = 0,
        execution: str = "blocking",
        p2p_shapes: Optional[Sequence[Sequence[int]]] = None,
        p2p_dtype: Optional[torch.dtype] = None,
        inference_schedule: Optional[Schedule] = None,
        profile: bool = False,
        timeout: float = 600.0,
        fb_streams: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be a dualpipe_rs.Schedule (from dualpipe_rs.plan or "
                f"dualpipe_rs.load), not {type(schedule).__name__}"
            )
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        self.group = process_group if process_group is not None else dist.group.WORLD
        size = dist.get_world_size(self.group)
        group_rank = dist.get_rank(self.group)
        if rank_mapping is None:
            rank_mapping = list(range(size))
        rank_mapping = [int(r) for r in rank_mapping]
        if sorted(rank_mapping) != list(range(size)):
            raise ValueError(
                f"group rank {group_rank}: rank_mapping {rank_mapping} is not a permutation "
                f"of 0..{size - 1}"
            )
        self.rank = rank_mapping[group_rank]
        if size != schedule.num_ranks:
            raise ValueError(
                f"rank {self.rank}: the process group has {size} ranks but the schedule "
                f"'{schedule.name}' has {schedule.num_ranks}"
            )
        group_of = {pipe: g for g, pipe in enumerate(rank_mapping)}
        # A list, not a closure over self: a Pipeline must not sit in a reference cycle, or its
        # process group outlives destroy_process_group() until the interpreter shuts down.
        self._global_of = [dist.get_global_rank(self.group, group_of[p]) for p in range(size)]
        self._group_rank = {g: group_of[p] for p, g in enumerate(self._global_of)}
        if execution not in ("blocking", "async"):
            raise ValueError(
                f"rank {self.rank}: execution must be 'blocking' or 'async', not {execution!r}"
            )
        self.execution = execution
        self.batch_dim = batch_dim
        self.timeout = None if timeout is None else float(timeout)
        self.schedule = schedule
        if isinstance(modules, nn.Module) and not isinstance(modules, (nn.Sequential, nn.ModuleList)):
            modules = [modules]
        modules = list(modules)
        stages = list(schedule.stages_on(self.rank))
        if len(modules) != len(stages):
            raise ValueError(
                f"rank {self.rank}: got {len(modules)} modules but the schedule "
                f"'{schedule.name}' runs {len(stages)} stages here ({stages}); pass them in "
                f"schedule.stages_on({self.rank}) order"
            )
        self.module = nn.ModuleList(modules)
        self._stage_module = {s: m for s, m in zip(stages, modules)}
        self._programs: Dict[str, _Program] = {}
        self._meta: Dict[str, Dict[Tuple[int, int], List[Tuple[Tuple[int, ...], torch.dtype]]]] = {}
        shapes, dtype = _comm.p2p_defaults()
        if p2p_shapes is not None:
            shapes = [tuple(int(d) for d in s) for s in p2p_shapes]
        if p2p_dtype is not None:
            dtype = p2p_dtype
        self._fixed_shapes = shapes
        self._fixed_dtype = dtype
        self._inference = inference_schedule
        if inference_schedule is not None:
            self._check_inference(inference_schedule)
        self._device = self._pick_device()
        self._nccl = dist.get_backend(self.group) == "nccl"
        self._post_each = _comm.posts_each(self.group, self._device)
        # Post each batch's receives at the commit before it, where it pays (see _commit and
        # _gloo.early_receives_pay).
        self._prepost = self._post_each
        # At an exchange with a peer that leads, receive its messages before sending (see
        # _lead).
        self._lead = self._post_each
        if fb_streams and self._device.type != "cuda":
            raise ValueError(
                f"rank {self.rank}: fb_streams=True needs the stages on a CUDA device; they are "
                f"on {self._device}"
            )
        self._fb: Optional[FBStreams] = (
            FBStreams(cuda_stream_ops(self._device)) if fb_streams else None
        )
        self._fixed_meta = None
        if shapes is not None:
            if dtype is None:
                dtype = next((p.dtype for m in self.module for p in m.parameters()), torch.float32)
            self._fixed_meta = [(tuple(s), dtype) for s in shapes]
        self._id = next(_ids)
        # step() calls so far (every rank counts the same ones), and why a step failed after
        # it had begun to exchange messages (no step runs after that).
        self._calls = 0
        self._failed: Optional[str] = None
        self._tag = 0  # this call's message tag (see _comm.step_tag)
        self._shared = None
        self._microbatch_size: Optional[int] = None
        self.profile: Optional[Profile] = Profile(self) if profile else None

    # ----------------------------------------------------------------- setup helpers

    def _pick_device(self) -> torch.device:
        for m in self.module:
            for p in m.parameters():
                return p.device
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _check_inference(self, inf: Schedule) -> None:
        s = self.schedule
        if not inf.forward_only:
            raise ValueError(f"rank {self.rank}: inference_schedule must be forward-only")
        same = (
            inf.num_ranks == s.num_ranks
            and inf.num_stages == s.num_stages
            and inf.num_microbatches == s.num_microbatches
            and inf.pipelines == s.pipelines
            and list(inf.stages_on(self.rank)) == list(s.stages_on(self.rank))
        )
        if not same:
            raise ValueError(
                f"rank {self.rank}: inference_schedule must have the training schedule's "
                f"ranks, stages, micro-batches and pipelines"
            )

    def _planned_inference(self) -> Schedule:
        s = self.schedule
        chunks = s.num_stages // s.num_ranks if s.name == "interleaved-1f1b" else None
        try:
            planned = plan(s.name, s.num_ranks, s.num_microbatches, chunks_per_rank=chunks)
            same = planned == s
        except ValueError:
            same = False
        if not same:
            raise PipelineError(
                f"rank {self.rank}: a step under torch.no_grad() needs a forward-only "
                f"schedule: this schedule is not what dualpipe_rs.plan gives for "
                f"'{s.name}', so pass inference_schedule= to the Pipeline",
                self.rank,
            )
        return plan(s.name, s.num_ranks, s.num_microbatches, chunks_per_rank=chunks, forward_only=True)

    def _program(self, schedule: Schedule) -> _Program:
        key = "train" if schedule is self.schedule else "inference"
        prog = self._programs.get(key)
        if prog is None:
            prog = _Program(schedule, self.rank, self._global_of.__getitem__)
            if self._post_each:
                waits = _lead.leader_waits(schedule)[self.rank]
                prog.leaders = {
                    i: (
                        frozenset(self._global_of[p] for p in peers),
                        "rank " + ", ".join(str(p) for p in sorted(peers)),
                    )
                    for i, peers in waits.items()
                }
            self._programs[key] = prog
            self._meta[key] = {}
        prog.key = key  # type: ignore[attr-defined]
        return prog

    # ----------------------------------------------------------------- public API

    def stages(self) -> List[int]:
        """The stages this rank runs, in the order of ``self.module``."""
        return list(self._stage_module)

    def step(
        self,
        *inputs: Optional[torch.Tensor],
        num_chunks: Optional[int] = None,
        criterion: Optional[Callable[..., torch.Tensor]] = None,
        labels: Sequence[Optional[torch.Tensor]] = (),
        return_outputs: bool = False,
    ) -> Tuple[Optional[torch.Tensor], Any]:
        """Run one training step (or, under ``torch.no_grad()``, one inference step).

        ``inputs`` are needed on the ranks that run stage 0 of a pipeline, ``criterion`` and
        ``labels`` on the ranks that run its last stage; each is split along ``batch_dim``
        into that rank's micro-batches (pipelines in document order, then micro-batches in
        order). Returns ``(loss, outputs)``: the stacked per-micro-batch losses on the ranks
        that run a last stage (else ``None``), and the concatenated last-stage outputs when
        ``return_outputs`` (else ``None``).

        A step that fails after it began to exchange messages leaves this Pipeline unusable:
        every later ``step`` or ``sum_copy_gradients`` raises :class:`PipelineError` (make a
        new Pipeline; on NCCL also a new process group). Errors found before (a missing
        input, a wrong ``num_chunks``) leave it usable. Every rank must make the same calls.
        """
        self._calls += 1
        self._tag = _comm.step_tag(self._id, self._calls)
        try:
            prog, st, exchange = self._prepare(
                inputs, num_chunks, criterion, labels, return_outputs
            )
        except BaseException as exc:
            self._announce(exc)
            raise
        try:
            self._run(prog, st, exchange)
        except BaseException as exc:
            self._failed = f"step {self._calls} failed: {exc}"
            self._announce(exc)
            WeightGradStore.clear()
            raise
        return self._results(prog, st)

    def _prepare(self, inputs, num_chunks, criterion, labels, return_outputs):
        """Check the call and split its inputs and labels: what a step runs, before it sends
        anything."""
        self._check_usable()
        s = self.schedule
        if num_chunks is not None and num_chunks not in (0, s.num_microbatches):
            raise ValueError(
                f"rank {self.rank}: num_chunks={num_chunks} but the schedule has "
                f"{s.num_microbatches} micro-batches"
            )
        training = torch.is_grad_enabled()
        if training and s.forward_only:
            raise PipelineError(
                f"rank {self.rank}: the schedule is forward-only but gradients are enabled: "
                f"run the step under torch.no_grad(), or plan a training schedule",
                self.rank,
            )
        run = s
        if not training and not s.forward_only:
            if self._inference is None:
                self._inference = self._planned_inference()
            run = self._inference
        prog = self._program(run)
        st = _Step()
        st.training = training
        st.criterion = criterion
        st.return_outputs = return_outputs
        st.early = self._prepost and _gloo.early_receives_pay()
        st.lead = self._lead and _gloo.leading_pays()
        self._feed(prog, st, inputs, labels, criterion, training)
        exchange = self._fixed_shapes is None and not self._meta[prog.key]
        return prog, st, exchange

    def _check_usable(self) -> None:
        """Refuse to exchange messages on a group where a failed step may have left some."""
        if self._failed is not None:
            raise PipelineError(
                f"rank {self.rank}: {self._failed}; this Pipeline's state and messages of "
                f"that step may be left half done, so it runs nothing more: create a new "
                f"Pipeline on every rank (on NCCL, also a new process group)",
                self.rank,
            )

    def sum_copy_gradients(self) -> None:
        """Sum the gradients of parameters held by several ranks: DualPipe's two copies of
        each stage, and tied weights (marked by :func:`split_model`) whose units sit on
        different ranks.

        Every rank of the pipeline group must call it after a step (before any data-parallel
        all-reduce). A parameter that is both copied and tied is summed once. Contributions
        are added in rank order, so every holder ends with the same bits. A no-op where
        nothing is shared (the first call exchanges which tied weights each rank holds).
        """
        self._check_usable()
        shared = self._shared_parameters()
        peers = sorted({r for _, _, holders in shared for r in holders if r != self.rank})
        if not shared:
            return
        own = {}
        for key, params, _ in shared:
            total = None
            for p in params:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                total = g.clone() if total is None else total.add_(g)
            own[key] = total
        ops, incoming = [], {}
        tag = _comm.step_tag(self._id, self._calls, shared=True)
        for peer in peers:
            keys = [key for key, _, holders in shared if peer in holders]
            flat = torch.cat([own[k].reshape(-1) for k in keys])
            buf = torch.empty_like(flat)
            ops.append(dist.P2POp(dist.isend, flat, self._global_of[peer], self.group, tag))
            ops.append(dist.P2POp(dist.irecv, buf, self._global_of[peer], self.group, tag))
            incoming[peer] = (keys, buf)
        if ops:
            try:
                _comm.wait(_comm.post(ops), self.timeout)
            except RuntimeError as exc:
                self._failed = f"summing shared gradients failed: {exc}"
                raise PipelineError(
                    f"rank {self.rank}: summing shared gradients failed: {exc}", self.rank
                ) from exc
        parts = {}
        for peer, (keys, buf) in incoming.items():
            offset = 0
            for k in keys:
                n = own[k].numel()
                parts[(k, peer)] = buf[offset : offset + n].view_as(own[k])
                offset += n
        for key, params, holders in shared:
            total = None
            for r in holders:
                part = own[key] if r == self.rank else parts[(key, r)]
                total = part.clone() if total is None else total.add_(part)
            for p in params:
                p.grad = total.clone()

    def _shared_parameters(self):
        """``[(key, local parameters, holder ranks)]`` for every parameter held more than
        once, in one order on every rank (computed once)."""
        if self._shared is not None:
            return self._shared
        from ._models import TIE_ATTRIBUTE

        stage_holders: Dict[int, set] = {}
        for pipe in self.schedule.pipelines:
            for stage, r in enumerate(pipe["route"]):
                stage_holders.setdefault(stage, set()).add(r)
        local: Dict[tuple, List[torch.nn.Parameter]] = {}
        for stage, module in sorted(self._stage_module.items()):
            for idx, p in enumerate(module.parameters()):
                if not p.requires_grad:
                    continue
                tie = getattr(p, TIE_ATTRIBUTE, None)
                key = ("tie", str(tie)) if tie is not None else ("stage", str(stage), str(idx))
                found = local.setdefault(key, [])
                if not any(q is p for q in found):
                    found.append(p)
        ties = sorted(k[1] for k in local if k[0] == "tie")
        gathered: List = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, (self.rank, ties), group=self.group)
        tie_holders: Dict[str, set] = {}
        for r, names in gathered:
            for name in names:
                tie_holders.setdefault(name, set()).add(r)
        shared = []
        for key in sorted(local):
            if key[0] == "tie":
                holders = sorted(tie_holders[key[1]])
            else:
                holders = sorted(stage_holders.get(int(key[1]), {self.rank}))
            if len(holders) > 1 or len(local[key]) > 1:
                shared.append((key, local[key], holders))
        self._shared = shared
        return shared

    # ----------------------------------------------------------------- the step

    def _feed(self, prog, st, inputs, labels, criterion, training) -> None:
        r = self.rank
        if prog.input_mbs:
            if not inputs or all(t is None for t in inputs):
                raise PipelineError(
                    f"rank {r}: this rank runs stage 0 for micro-batches "
                    f"{_span(prog.input_mbs)}: pass their inputs to step()", r
                )
            parts = _scatter(inputs, len(prog.input_mbs), self.batch_dim)
            st.feed = dict(zip(prog.input_mbs, parts))
            first = next((t for t in parts[0] if t is not None), None) if parts else None
            if first is not None and first.dim() > self.batch_dim:
                self._microbatch_size = int(first.shape[self.batch_dim])
        if prog.label_mbs:
            if training and criterion is None:
                raise PipelineError(
                    f"rank {r}: this rank runs the last stage for micro-batches "
                    f"{_span(prog.label_mbs)}: pass criterion= (and labels=) to step()", r
                )
            if isinstance(labels, torch.Tensor):
                labels = (labels,)
            parts = _scatter(list(labels), len(prog.label_mbs), self.batch_dim)
            st.labels = dict(zip(prog.label_mbs, parts))

    def _run(self, prog: _Program, st: _Step, exchange: bool) -> None:
        prof = self.profile
        if prof is not None:
            prof._begin(prog)
        if self._fb is not None:
            self._fb.reset()
        for op in prog.ops:
            code = op[0]
            t0 = prof._now() if prof is not None else None
            try:
                self._dispatch(prog, st, op, code, exchange)
            except PipelineError:
                raise
            except Exception as exc:
                index = op[1]
                raise PipelineError(
                    f"rank {self.rank}: instruction {index} ({prog.text[index]}) failed: "
                    f"{type(exc).__name__}: {exc}", self.rank, index, prog.text[index]
                ) from exc
            if prof is not None:
                prof._record(op, t0)
        self._commit(prog, st, len(prog.ops), exchange)
        if st.send_works:
            self._wait(prog, len(prog.ops) - 1, st.send_works, "the sends of this step")
            st.send_works = []
        self._free(st)
        if prof is not None:
            prof._end()

    def _dispatch(self, prog, st, op, code, exchange) -> None:
        if code == _F:
            self._forward(prog, st, op[1], op[2], op[3])
        elif code == _B:
            self._backward(prog, st, op[1], op[2], op[3], op[4])
        elif code == _W:
            self._weight(st, op[2], op[3])
        elif code == _FB:
            self._forward_backward(prog, st, op)
        elif code == _SEND:
            self._queue_send(prog, st, op)
        elif code == _RECV:
            self._queue_recv(prog, st, op)
        else:
            self._commit(prog, st, op[1], exchange)

    # compute ---------------------------------------------------------------------

    def _stage_inputs(self, prog, st, index, stage, mb) -> List[torch.Tensor]:
        if stage == 0:
            feed = st.feed.get(mb)
            if feed is None:
                raise PipelineError(
                    f"rank {self.rank}: instruction {index} ({prog.text[index]}) has no "
                    f"input for micro-batch {mb}", self.rank, index, prog.text[index]
                )
            return list(feed)
        if prog.local_prev(stage, mb):
            prev = st.outputs[(stage - 1, mb)]
            if st.training:
                return [t.detach().requires_grad_(_grad_dtype(t)) for t in prev]
            del st.outputs[(stage - 1, mb)]
            return list(prev)
        tensors, works = st.act_bufs.pop((stage, mb))
        if works:
            self._wait(prog, index, works, f"recv act s{stage} m{mb}")
            works.clear()
        if type(tensors) is _Part:
            tensors = tensors.take()
        return tensors

    def _forward(self, prog, st, index, stage, mb) -> None:
        inputs = self._stage_inputs(prog, st, index, stage, mb)
        module = self._stage_module[stage]
        outs = _as_list(module(*inputs))
        self._after_forward(prog, st, stage, mb, inputs, outs, None)

    def _after_forward(self, prog, st, stage, mb, inputs, outs, loss) -> None:
        if st.training:
            st.inputs[(stage, mb)] = inputs
        if stage == prog.last:
            if loss is None and st.criterion is not None:
                loss = st.criterion(*outs, *st.labels.get(mb, ()))
            if loss is not None:
                st.losses[mb] = loss
            if st.return_outputs:
                st.last_outputs[mb] = outs
        else:
            st.outputs[(stage, mb)] = outs
            st.out_meta[(stage, mb)] = [(t.shape, t.dtype) for t in outs]

    def _grads_for(self, prog, st, index, stage, mb):
        """The stage outputs and the gradients that come back for them."""
        if stage == prog.last:
            return None, None
        outs = st.outputs.pop((stage, mb))
        if prog.local_next(stage, mb):
            grads = st.local_grads.pop((stage + 1, mb))
        else:
            grads, works = st.grad_bufs.pop((stage, mb))
            if works:
                self._wait(prog, index, works, f"recv grad s{stage} m{mb}")
                works.clear()
            if type(grads) is _Part:
                grads = grads.take()
            grads = iter(grads)
            grads = [next(grads) if _grad_dtype(o) else None for o in outs]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def _input_grads(self, prog, st, stage, mb, inputs, grads) -> None:
        if stage == 0:
            return
        full = []
        for t, g in zip(inputs, grads):
            if not _grad_dtype(t):
                continue
            full.append(g if g is not None else torch.zeros_like(t))
        if prog.local_prev(stage, mb):
            it = iter(full)
            st.local_grads[(stage, mb)] = [
                next(it) if _grad_dtype(t) else None for t in inputs
            ]
        else:
            st.send_grads[(stage, mb)] = full

    def _backward(self, prog, st, index, stage, mb, defer) -> None:
        if not st.training:
            return
        outs, grads = self._grads_for(prog, st, index, stage, mb)
        loss = st.losses.get(mb) if stage == prog.last else None
        if stage == prog.last and loss is None:
            raise PipelineError(
                f"rank {self.rank}: instruction {index} ({prog.text[index]}) has no loss: "
                f"the criterion returned nothing", self.rank, index, prog.text[index]
            )
        inputs = st.inputs.pop((stage, mb))
        if not defer:
            if loss is not None:
                _loss_backward(loss)
                loss.detach_()
            elif outs:
                run_backward(outs, grads)
            in_grads = _leaf_grads(inputs) if stage > 0 else []
        else:
            if loss is not None:
                outs, grads = [loss], [None]
            params = st.params.get(stage)
            if params is None:
                # Once a step: walking the module for its parameters costs per call.
                params = st.params[stage] = list(self._stage_module[stage].parameters())
            WeightGradStore.cache = []
            WeightGradStore.enabled = True
            try:
                in_grads, later = backward_input(outs or [], grads or [], inputs, params)
            finally:
                WeightGradStore.enabled = False
            st.pending_w[(stage, mb)] = (later, WeightGradStore.take(), loss)
        if self._fb is not None:
            self._fb.backward_done((stage, mb), in_grads)
        self._input_grads(prog, st, stage, mb, inputs, in_grads)

    def _weight(self, st, stage, mb) -> None:
        if not st.training:
            return
        later, group, loss = st.pending_w.pop((stage, mb))
        for func in group:
            func()
        later.run()
        if loss is not None:
            loss.detach_()

    def _forward_backward(self, prog, st, op) -> None:
        _, index, fs, fm, bs, bm = op
        if not st.training:
            self._forward(prog, st, index, fs, fm)
            return
        module0, module1 = self._stage_module[fs], self._stage_module[bs]
        hook = _hook_of(module0, module1)
        if hook is None:
            if self._fb is None:
                self._forward(prog, st, index, fs, fm)
                self._backward(prog, st, index, bs, bm, False)
                return

            def made():
                if fs != prog.last:
                    return st.outputs.get((fs, fm), ())
                return [st.losses.get(fm), *st.last_outputs.get(fm, ())]

            self._fb.run(
                lambda: self._forward(prog, st, index, fs, fm),
                lambda: self._backward(prog, st, index, bs, bm, False),
                (fs, fm),
                (bs, bm),
                lambda: st.inputs.get((fs, fm), ()),
                made,
            )
            return
        inputs0 = self._stage_inputs(prog, st, index, fs, fm)
        if fs == prog.last and st.criterion is not None:
            criterion0, labels0 = st.criterion, list(st.labels.get(fm, ()))
        else:
            criterion0, labels0 = None, []
        if bs == prog.last:
            loss1, outs1, grads1 = st.losses.get(bm), [], []
        else:
            loss1 = None
            outs1, grads1 = self._grads_for(prog, st, index, bs, bm)
            outs1, grads1 = tuple(outs1), tuple(grads1)
        inputs1 = st.inputs.pop((bs, bm))
        outs0, loss0 = hook(module0, inputs0, criterion0, labels0, module1, loss1, outs1, grads1)
        self._after_forward(prog, st, fs, fm, inputs0, _as_list(outs0), loss0)
        in_grads = _leaf_grads(inputs1) if bs > 0 else []
        self._input_grads(prog, st, bs, bm, inputs1, in_grads)

    # communication ----------------------------------------------------------------

    def _queue_send(self, prog, st, op) -> None:
        _, index, act, stage, mb, peer, gpeer = op
        if act:
            outs = st.outputs[(stage, mb)]
            fixed = self._expected(prog, stage + 1, mb)
            if fixed is not None:
                got = [(tuple(t.shape), t.dtype) for t in outs]
                if got != fixed:
                    raise PipelineError(
                        f"rank {self.rank}: instruction {index} ({prog.text[index]}): stage "
                        f"{stage} output {_fmt(got)} differs from what rank {peer} expects, "
                        f"{_fmt(fixed)}; every step must keep the shapes of the first (or of "
                        f"p2p_shapes)", self.rank, index, prog.text[index]
                    )
            tensors = [t if t.is_contiguous() else t.contiguous() for t in outs]
            st.batch.append((_SEND, index, act, stage, mb, gpeer, tensors, outs))
        else:
            if not st.training:
                return
            tensors = st.send_grads.pop((stage, mb))
            tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
            st.batch.append((_SEND, index, act, stage, mb, gpeer, tensors, None))

    def _expected(self, prog, stage, mb):
        """The (shape, dtype) list the receiver of (stage, mb)'s activations expects."""
        if self._fixed_meta is not None:
            return self._fixed_meta
        meta = self._meta[prog.key].get((stage, mb))
        return None if meta is None else list(meta)

    def _queue_recv(self, prog, st, op) -> None:
        _, index, act, stage, mb, peer, gpeer = op
        if not act and not st.training:
            return
        if st.preposted:
            pre = st.preposted.pop((act, stage, mb), None)
            if pre is not None:
                st.batch.append((_RECV, index, act, stage, mb, gpeer, pre[0], pre[1]))
                return
        st.batch.append((_RECV, index, act, stage, mb, gpeer, None, None))

    def _commit(self, prog, st, index, exchange) -> None:
        batch, st.batch = st.batch, []
        # On a group that posts messages one by one (gloo), once shapes are known: the next
        # batch's receives are posted now, and messages travel fused (see _fused_groups).
        early = st.early and not exchange
        fuse = self._post_each and not exchange
        ahead = None
        if early:
            nxt = prog.next_recvs.get(index)
            if nxt is not None:
                ahead = self._recv_units(prog, st, [op[1:] for op in nxt], fuse, False)
        if not batch and not ahead:
            return
        if exchange:
            self._commit_learning_shapes(prog, st, index, batch)
            return
        ops: List[tuple] = []
        recv_at = []
        recvs = []
        fused = prog.fused if fuse else None
        covered = None
        for code, idx, act, stage, mb, gpeer, tensors, extra in batch:
            if code == _RECV:
                if extra is not None:
                    # Posted at the previous commit: its works are known.
                    recv_at.append(((act, stage, mb), tensors, extra, gpeer))
                else:
                    recvs.append((idx, act, stage, mb, None, gpeer))
                continue
            if fused:
                if covered is not None and idx in covered:
                    continue
                members = fused.get(idx)
                if members is not None:
                    flat = self._fuse_sends(prog, idx, members, batch)
                    if flat is not None:
                        if flat.numel():
                            ops.append((True, flat, gpeer))
                        covered = set(members) if covered is None else covered | set(members)
                        continue
            ops.extend([(True, t, gpeer) for t in tensors])
        if recvs:
            for keys, gpeer, post, values in self._recv_units(prog, st, recvs, fuse, True):
                first = len(ops)
                ops.extend([(False, t, gpeer) for t in post])
                for key, value in zip(keys, values):
                    recv_at.append((key, value, (first, len(ops)), gpeer))
        own = len(ops)
        if ahead:
            # The next batch's receives, after this batch's messages (so every peer's
            # messages are still received in the order it sends them).
            for keys, gpeer, post, values in ahead:
                first = len(ops)
                ops.extend([(False, t, gpeer) for t in post])
                for key, value in zip(keys, values):
                    st.preposted[key] = (value, (first, len(ops)))
        prof = self.profile
        t0 = prof._now() if prof is not None else None
        waited: set = set()
        if self._post_each:
            works = self._post_leading(prog, st.lead, index, ops, recv_at, batch, waited)
        else:
            works = self._post(ops)
        per_op = len(works) == len(ops)
        # The members of a fused message share one list of works: a work is waited once (a
        # second wait would wait for a second message).
        shared: Dict[Tuple[int, int], List[Any]] = {}
        if ahead:
            for keys, _, _, _ in ahead:
                for key in keys:
                    value, span = st.preposted[key]
                    mine = shared.get(span)
                    if mine is None:
                        mine = shared[span] = works[span[0] : span[1]]
                    st.preposted[key] = (value, mine)
        settled = []
        for key, value, where, _ in recv_at:
            if type(where) is tuple:
                mine = shared.get(where)
                if mine is None:
                    mine = works[where[0] : where[1]] if per_op else list(works)
                    if waited:
                        mine = [w for w in mine if id(w) not in waited]
                    shared[where] = mine
            else:
                mine = where
            settled.append((key, value, mine))
        if self.execution == "blocking":
            # This batch: its own messages and its receives posted at the commit before.
            waits = works[:own] if per_op else list(works)
            if waited:
                waits = [w for w in waits if id(w) not in waited]
            seen = set()
            for _, _, where, _ in recv_at:
                if type(where) is not tuple and id(where) not in seen:
                    seen.add(id(where))
                    waits.extend(where)
            if waits:
                self._wait(prog, index, waits, "this commit's batch", batch)
            for (act, stage, mb), value, _ in settled:
                if type(value) is _Part:
                    value = value.take()
                (st.act_bufs if act else st.grad_bufs)[(stage, mb)] = (value, None)
            self._free(st, batch)
        else:
            for (act, stage, mb), value, mine in settled:
                (st.act_bufs if act else st.grad_bufs)[(stage, mb)] = (value, mine)
            if per_op:
                sent = [w for w, o in zip(works[:own], ops) if o[0]]
            else:
                sent = list(works)
            st.send_works.extend(sent)
            st.to_free.extend(t for e in batch if e[0] == _SEND and e[7] is not None for t in e[7])
        if prof is not None:
            prof._comm(index, t0)

    def _fuse_sends(self, prog, index, members, batch) -> Optional[torch.Tensor]:
        """The bytes of a fused group's tensors, in member order, sent at its first member;
        ``None`` where the group is too large to fuse (its members then go one by one)."""
        if members[0] != index:
            return None
        by_index = {e[1]: e for e in batch if e[0] == _SEND}
        if any(m not in by_index for m in members):
            raise PipelineError(
                f"rank {self.rank}: instruction {index} ({prog.text[index]}): the messages "
                f"fused with it are not sent in its batch", self.rank, index, prog.text[index],
            )
        parts = [t for m in members for t in by_index[m][6]]
        if sum(t.numel() * t.element_size() for t in parts) > _FUSE_MAX_BYTES:
            return None
        if not parts:
            return torch.empty(0, dtype=torch.uint8, device=self._device)
        return torch.cat([t.reshape(-1).view(torch.uint8) for t in parts])

    def _recv_units(self, prog, st, recvs, fuse, strict):
        """Receive buffers for ``recvs`` (``(index, act, stage, mb, peer, global peer)`` in
        order): ``[(keys, global peer, tensors to post, per-key values)]``, a value being the
        received tensors or a :class:`_Part` of a fused message. Where a shape is not known
        yet: ``None``, or with ``strict`` a :class:`PipelineError`."""
        specs = []
        for index, act, stage, mb, _, _ in recvs:
            if act:
                meta = self._expected(prog, stage, mb)
                if meta is None:
                    if not strict:
                        return None
                    raise PipelineError(
                        f"rank {self.rank}: instruction {index} ({prog.text[index]}): "
                        f"the shapes of this message are unknown", self.rank, index,
                        prog.text[index],
                    )
                training = st.training
                specs.append([
                    (shape, dtype, training and (dtype.is_floating_point or dtype.is_complex))
                    for shape, dtype in meta
                ])
            else:
                meta = st.out_meta.get((stage, mb))
                if meta is None:
                    if not strict:
                        return None
                    meta = st.out_meta[(stage, mb)]
                specs.append([
                    (shape, dtype, False)
                    for shape, dtype in meta
                    if dtype.is_floating_point or dtype.is_complex
                ])
        device = self._device
        units = []
        fused = prog.fused if fuse else None
        position = None
        covered: set = set()
        for i, (index, act, stage, mb, _, gpeer) in enumerate(recvs):
            if index in covered:
                continue
            members = fused.get(index) if fused else None
            if members is not None and members[0] == index:
                if position is None:
                    position = {r[0]: j for j, r in enumerate(recvs)}
                if any(m not in position for m in members):
                    raise PipelineError(
                        f"rank {self.rank}: instruction {index} ({prog.text[index]}): the "
                        f"messages fused with it are not received in its batch", self.rank,
                        index, prog.text[index],
                    )
                at = [position[m] for m in members]
                group = [specs[j] for j in at]
                total = sum(_nbytes(m) for spec in group for m in spec)
                if total <= _FUSE_MAX_BYTES:
                    buf = torch.empty(total, dtype=torch.uint8, device=device)
                    whole = _Fused(buf, group)
                    keys = [tuple(recvs[j][1:4]) for j in at]
                    post = [buf] if total else []
                    units.append((keys, gpeer, post, [_Part(whole, j) for j in range(len(at))]))
                    covered.update(members)
                    continue
            tensors = [
                torch.empty(shape, dtype=dtype, device=device, requires_grad=grad)
                for shape, dtype, grad in specs[i]
            ]
            units.append(([(act, stage, mb)], gpeer, tensors, [tensors]))
        return units

    def _post_leading(self, prog, lead, index, ops, recv_at, batch, waited) -> List[Any]:
        """Post a commit's messages on a group that posts them one by one (gloo), so that two
        ranks that exchange messages are not inside gloo's calls on their connection at once
        (see _lead). A rank that follows a peer at this commit posts its receives from that
        peer, waits for the messages the peer sends in this batch, then posts its sends and
        its other receives; any other rank posts its receives, then its sends. The works in
        the order of ``ops``; the ids of the works waited here are added to ``waited``."""
        works: List[Any] = [None] * len(ops)

        def post(ix) -> None:
            if ix:
                for i, w in zip(ix, self._post([ops[i] for i in ix])):
                    works[i] = w

        lead = prog.leaders.get(index) if lead else None
        if lead is not None and any(o[0] for o in ops):
            leaders, label = lead
            first: List[int] = []
            for _, _, where, gpeer in recv_at:
                if gpeer in leaders and type(where) is tuple:
                    first.extend(range(where[0], where[1]))
            first = sorted(set(first))
            post(first)
            # A fused message's members share its works: each work is waited once (a second
            # wait on gloo would wait for a second message).
            pending = []
            seen = set()
            for _, _, where, gpeer in recv_at:
                if gpeer in leaders:
                    for w in works[where[0] : where[1]] if type(where) is tuple else where:
                        if id(w) not in seen:
                            seen.add(id(w))
                            pending.append(w)
            if pending:
                self._wait(prog, index, pending, f"the messages of this batch from {label}", batch)
                waited.update(id(w) for w in pending)
                for _, _, where, gpeer in recv_at:
                    if gpeer in leaders and type(where) is not tuple:
                        where.clear()
            done = set(first)
            post([i for i, o in enumerate(ops) if o[0]])
            post([i for i, o in enumerate(ops) if not o[0] and i not in done])
        else:
            post([i for i, o in enumerate(ops) if not o[0]])
            post([i for i, o in enumerate(ops) if o[0]])
        return works

    def _post(self, ops) -> List[Any]:
        """Post ``(is_send, tensor, global peer)`` messages in order, tagged with this call's
        tag; the works to wait on (one per message on gloo)."""
        if not ops:
            return []
        if self._post_each:
            group_rank = self._group_rank
            return _comm.post_each(
                self.group, [(o, t, group_rank[p]) for o, t, p in ops], self._tag
            )
        tag = self._tag
        return _comm.post(
            [dist.P2POp(dist.isend if o else dist.irecv, t, p, self.group, tag) for o, t, p in ops]
        )

    def _commit_learning_shapes(self, prog, st, index, batch) -> None:
        """A commit of the step that learns the activation shapes. Each activation message
        is preceded by its description (count, dtypes, shapes) on the same stream, so a peer
        receives both in the order they were sent, on any backend. The batch's sends,
        descriptions and data, are posted at once; each received description is waited for
        before its buffers are posted. Those waits are the blocking model's at this commit,
        so a schedule free of deadlock stays so (a batch of descriptions waited for as a
        whole would also wait for descriptions the peer sends at a later commit, while that
        peer waits for this batch's data)."""
        prof = self.profile
        t0 = prof._now() if prof is not None else None
        known = self._meta[prog.key]
        device = self._device
        sends: List[tuple] = []
        for code, _, act, stage, mb, gpeer, tensors, _ in batch:
            if code != _SEND:
                continue
            if act:
                sends.append((True, _comm.encode_meta(tensors, device), gpeer))
                known[(stage + 1, mb)] = [(tuple(t.shape), t.dtype) for t in tensors]
            sends.extend([(True, t, gpeer) for t in tensors])
        sent = self._post(sends)
        received, settled = [], []
        for code, idx, act, stage, mb, gpeer, _, _ in batch:
            if code != _RECV:
                continue
            if act:
                buf = torch.empty(_comm.META_LEN, dtype=torch.int64, device=device)
                what = f"the shapes of {prog.text[idx]}"
                self._wait(prog, index, self._post([(False, buf, gpeer)]), what, batch)
                known[(stage, mb)] = _comm.decode_meta(buf.cpu())
            unit = (idx, act, stage, mb, None, gpeer)
            ((_, _, post, values),) = self._recv_units(prog, st, [unit], False, True)
            works = self._post([(False, t, gpeer) for t in post])
            received.extend(works)
            settled.append(((act, stage, mb), values[0], works))
        if self.execution == "blocking":
            if sent or received:
                self._wait(prog, index, sent + received, "this commit's batch", batch)
            for (act, stage, mb), value, _ in settled:
                (st.act_bufs if act else st.grad_bufs)[(stage, mb)] = (value, None)
            self._free(st, batch)
        else:
            for (act, stage, mb), value, works in settled:
                (st.act_bufs if act else st.grad_bufs)[(stage, mb)] = (value, works)
            st.send_works.extend(sent)
            st.to_free.extend(t for e in batch if e[0] == _SEND and e[7] is not None for t in e[7])
        if prof is not None:
            prof._comm(index, t0)

    def _free(self, st, batch=None) -> None:
        """Release the storage of sent activations (their graph stays for the backward)."""
        if batch is not None:
            tensors = [t for e in batch if e[0] == _SEND and e[7] is not None for t in e[7]]
        else:
            tensors, st.to_free = st.to_free, []
        for t in tensors:
            fn = t.grad_fn
            if fn is None or t._base is not None:
                continue
            # A node that saved its own output would lose it: keep those. Built-in nodes have
            # their attributes by type; a custom function's by instance.
            keeps = _SAVES_RESULT.get(type(fn))
            if keeps is None:
                keeps = hasattr(fn, "_saved_result")
                if not isinstance(fn, torch._C._FunctionBase):
                    _SAVES_RESULT[type(fn)] = keeps
            if not keeps:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def _wait(self, prog, index, works, what, batch=None) -> None:
        prof = self.profile
        t0 = prof._now() if prof is not None else None
        try:
            _comm.wait(works, None if self._nccl else self.timeout)
        except RuntimeError as exc:
            index = min(index, len(prog.ops) - 1)
            ops = ""
            if batch:
                ops = ": " + ", ".join(prog.text[e[1]] for e in batch)
            peer = self._peer_failure()
            err = PipelineError(
                f"rank {self.rank}: instruction {index} ({prog.text[index]}) of step "
                f"{self._calls} waited for {what}{ops} and failed after at most "
                f"{self.timeout} s: {exc}"
                + (f"; {peer}" if peer else ""),
                self.rank, index, prog.text[index],
            )
            # A wait that failed after a peer had failed is a consequence, not a cause: it is
            # not announced (see _announce), so every rank reports each cause once.
            err._after_peer = bool(peer)
            raise err from exc
        if prof is not None:
            prof._wait(t0)

    # failures ------------------------------------------------------------------------

    def _store_key(self) -> str:
        return f"dualpipe_rs/pipeline{self._id}/call{self._calls}/failed"

    def _announce(self, exc: BaseException) -> None:
        """Tell the other ranks why this rank stops (through the default store), unless it
        stops because a peer failed first (that peer has told them already)."""
        if getattr(exc, "_after_peer", False):
            return
        try:
            store = dist.distributed_c10d._get_default_store()
            key = self._store_key()
            store.set(f"{key}/{self.rank}", str(exc)[:2000])
        except Exception:
            pass

    def _peer_failure(self) -> str:
        try:
            store = dist.distributed_c10d._get_default_store()
            key = self._store_key()
            told = []
            for r in range(self.schedule.num_ranks):
                if r != self.rank and store.check([f"{key}/{r}"]):
                    told.append(f"rank {r} failed first: {store.get(f'{key}/{r}').decode()}")
            return "; ".join(told)
        except Exception:
            return ""

    # results -------------------------------------------------------------------------

    def _results(self, prog, st):
        loss = None
        if prog.label_mbs and st.losses:
            loss = torch.stack([st.losses[m] for m in prog.label_mbs])
        outputs = None
        if st.return_outputs and prog.label_mbs:
            per_mb = [st.last_outputs[m] for m in prog.label_mbs]
            outputs = tuple(torch.cat(list(parts), dim=self.batch_dim) for parts in zip(*per_mb))
            if len(outputs) == 1:
                outputs = outputs[0]
        return loss, outputs


def _span(mbs: Sequence[int]) -> str:
    if mbs and list(mbs) == list(range(mbs[0], mbs[0] + len(mbs))):
        return f"{mbs[0]}..{mbs[-1]}"
    return ", ".join(map(str, mbs))


def _fmt(meta) -> str:
    return "[" + ", ".join(f"{tuple(s)} {str(d).replace('torch.', '')}" for s, d in meta) + "]"
