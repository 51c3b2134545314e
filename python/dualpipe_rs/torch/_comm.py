"""Point-to-point messages between pipeline ranks: shapes, batches, bounded waits.

Every message carries the list of tensors that crosses a stage boundary. Activation shapes
are learnt on a pipeline's first step: on that step the sender precedes every activation
message with a small description of its tensors (shapes, dtypes), on the same stream. The
receiver waits for the description, allocates the message's buffers from it, and keeps it,
keyed by (stage, micro-batch), for the steps that follow. Gradient messages need no
description: their receiver produced the activation they belong to.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "TensorMeta",
    "encode_meta",
    "decode_meta",
    "META_LEN",
    "set_p2p_tensor_shapes",
    "set_p2p_tensor_dtype",
    "p2p_defaults",
    "step_tag",
    "message_streams",
]

META_LEN = 64

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}

TensorMeta = Tuple[Tuple[int, ...], torch.dtype]

_P2P_SHAPES: Optional[List[Tuple[int, ...]]] = None
_P2P_DTYPE: Optional[torch.dtype] = None


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Set the shapes of the tensors that cross every stage boundary (the reference's setter).

    A :class:`~dualpipe_rs.torch.Pipeline` built afterwards without ``p2p_shapes`` uses them.
    Without either, shapes are learnt on the first step.
    """
    global _P2P_SHAPES
    _P2P_SHAPES = [tuple(int(d) for d in s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Set the dtype of the tensors that cross every stage boundary (the reference's setter)."""
    global _P2P_DTYPE
    _P2P_DTYPE = dtype


def p2p_defaults() -> Tuple[Optional[List[Tuple[int, ...]]], Optional[torch.dtype]]:
    """The shapes and dtype given to the module-level setters, if any."""
    return _P2P_SHAPES, _P2P_DTYPE


def encode_meta(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """A fixed-size int64 tensor describing ``tensors`` (count, then dtype, rank, dims each)."""
    words = [len(tensors)]
    for t in tensors:
        code = _CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"tensors of dtype {t.dtype} cannot cross a stage boundary")
        words += [code, t.dim(), *t.shape]
    if len(words) > META_LEN:
        raise ValueError(
            f"a stage output of {len(tensors)} tensors with these shapes is too large to "
            f"describe in {META_LEN} words; pass p2p_shapes to the Pipeline instead"
        )
    words += [0] * (META_LEN - len(words))
    return torch.tensor(words, dtype=torch.int64, device=device)


def decode_meta(meta: torch.Tensor) -> List[TensorMeta]:
    """The inverse of :func:`encode_meta`."""
    words = meta.tolist()
    count, pos, out = words[0], 1, []
    for _ in range(count):
        code, ndim = words[pos], words[pos + 1]
        shape = tuple(words[pos + 2 : pos + 2 + ndim])
        out.append((shape, _DTYPES[code]))
        pos += 2 + ndim
    return out


# Wait limits by their seconds (a pipeline uses one; building it per wait costs).
_LIMITS: Dict[float, timedelta] = {}


def wait(works, timeout: Optional[float]) -> None:
    """Wait for ``works``; raises ``RuntimeError`` from torch on a timeout or a dead peer."""
    if timeout is None:
        for work in works:
            work.wait()
        return
    limit = _LIMITS.get(timeout)
    if limit is None:
        if len(_LIMITS) > 64:
            _LIMITS.clear()
        limit = _LIMITS[timeout] = timedelta(seconds=timeout)
    for work in works:
        work.wait(limit)


def post(ops: List[dist.P2POp]):
    """Post one batch; the list of works to wait on."""
    return dist.batch_isend_irecv(ops)


def message_streams(schedule, rank: int):
    """``(sends, recvs, commits)`` of ``rank`` in a schedule: per peer pipeline rank,
    ``[(batch, instruction index)]`` of its messages in program order (batch = the number of
    commits before it), then the instruction indices of its commits followed by the number of
    instructions (the index of the step's closing commit)."""
    sends: Dict[int, List[Tuple[int, int]]] = {}
    recvs: Dict[int, List[Tuple[int, int]]] = {}
    commits: List[int] = []
    ins = schedule.instructions(rank)
    for i, x in enumerate(ins):
        op = x["op"]
        if op == "commit":
            commits.append(i)
        elif op in ("send", "recv"):
            (sends if op == "send" else recvs).setdefault(x["peer"], []).append((len(commits), i))
    commits.append(len(ins))
    return sends, recvs, commits


def step_tag(pipeline: int, call: int, shared: bool = False) -> int:
    """The message tag of one ``step`` call (or, with ``shared``, one summing of shared
    gradients) of one pipeline: messages of a failed call, still posted, then never match
    those of another call or another pipeline on a group that matches messages by tag
    (gloo). Pipelines are told apart modulo 512, calls modulo 2**20."""
    return (int(shared) << 29) | ((pipeline & 0x1FF) << 20) | (call & 0xFFFFF)


def posts_each(group, device) -> bool:
    """Whether ``group`` posts point-to-point messages one by one on ``device`` (it cannot
    coalesce them, as gloo): then :func:`post_each` is the same as :func:`post`, cheaper."""
    try:
        return not (
            type(group) is dist.ProcessGroup and group._get_backend(device).supports_coalescing
        )
    except Exception:
        return False


def post_each(group, messages: Sequence[Tuple[bool, torch.Tensor, int]], tag: int = 0):
    """Post ``(is_send, tensor, peer's rank in group)`` messages in order, one call each, as
    ``batch_isend_irecv`` does for a group that cannot coalesce them (complex tensors as real
    views); the list of works to wait on."""
    send, recv = group.send, group.recv
    works = []
    for is_send, t, peer in messages:
        if t.is_complex():
            t = torch.view_as_real(t)
        works.append(send([t], peer, tag) if is_send else recv([t], peer, tag))
    return works
