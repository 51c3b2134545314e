"""FB on two CUDA streams: the forward half of an ``FB`` overlaps the backward half.

The autograd engine runs each backward kernel on the stream its forward kernel ran on, so
the backward half of an ``FB`` runs where its micro-batch's forward ran. To overlap the two
halves, the forward half is issued on the *other* stream of the pair (main, side): on side
when the backward's forward ran on main, on main when it ran on side (an earlier ``FB``'s
forward). The host issues the forward's kernels first, then the backward's; the device runs
them side by side.

Ordering and memory, beside what the engine already synchronises (initial gradients before
the backward, the calling stream after it):

- side waits for main before a forward issued on it (its inputs were received or made there);
- main waits for side after the pair, so sends and later computes see both halves' results;
- tensors that cross streams are recorded on the stream that uses them
  (``Tensor.record_stream``), so the caching allocator does not hand their memory out while
  the other stream may still read it: a side forward's inputs on side, its outputs on main,
  and the input gradients of a backward that ran on side (in an ``FB`` or a later plain
  ``B``) on main.

The stream operations are injected (:class:`StreamOps`), so the choice of streams is tested
on CPU with stand-ins; :func:`cuda_stream_ops` gives the real ones.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Set, Tuple

import torch


@dataclass(frozen=True)
class StreamOps:
    """What :class:`FBStreams` needs from a device: a current stream, a second stream, a
    context that makes a stream current, a device-side wait of one stream for another, and
    recording a tensor's use on a stream."""

    current: Callable[[], Any]
    new_stream: Callable[[], Any]
    use: Callable[[Any], ContextManager[Any]]
    wait: Callable[[Any, Any], None]
    record: Callable[[torch.Tensor, Any], None]


def cuda_stream_ops(device: torch.device) -> StreamOps:
    """The stream operations of a CUDA device."""
    return StreamOps(
        current=lambda: torch.cuda.current_stream(device),
        new_stream=lambda: torch.cuda.Stream(device=device),
        use=torch.cuda.stream,
        wait=lambda waiter, producer: waiter.wait_stream(producer),
        record=lambda tensor, stream: tensor.record_stream(stream),
    )


class FBStreams:
    """Where each ``FB`` half runs, and the waits and records around it (see the module)."""

    def __init__(self, ops: StreamOps) -> None:
        self.ops = ops
        self.side = ops.new_stream()
        # (stage, micro-batch) whose forward ran on side: its backward runs there too.
        self.on_side: Set[Tuple[int, int]] = set()

    def reset(self) -> None:
        """Forget the streams of the last step's forwards (every backward has run)."""
        self.on_side.clear()

    def run(
        self,
        forward: Callable[[], None],
        backward: Callable[[], None],
        f_key: Tuple[int, int],
        b_key: Tuple[int, int],
        inputs_of: Callable[[], Iterable[torch.Tensor]],
        outputs_of: Callable[[], Iterable[torch.Tensor]],
    ) -> str:
        """Issues ``forward`` (of ``f_key``) and ``backward`` (of ``b_key``) so that they
        overlap; returns the stream the forward went to, ``"main"`` or ``"side"``.

        ``inputs_of`` and ``outputs_of`` give the forward's inputs and outputs once it ran."""
        ops = self.ops
        main = ops.current()
        if b_key in self.on_side:
            # The backward's kernels go to side (see backward_done); the forward takes main.
            forward()
            backward()
            ops.wait(main, self.side)
            return "main"
        ops.wait(self.side, main)
        with ops.use(self.side):
            forward()
        for tensor in _tensors(inputs_of()):
            ops.record(tensor, self.side)
        for tensor in _tensors(outputs_of()):
            ops.record(tensor, main)
        self.on_side.add(f_key)
        backward()
        ops.wait(main, self.side)
        return "side"

    def backward_done(self, key: Tuple[int, int], input_grads: Iterable[Any]) -> None:
        """After any backward of ``key`` (in an ``FB`` or not): when its forward ran on side,
        its kernels ran there too, so the input gradients it made are recorded on main, which
        sends them or hands them to the previous stage."""
        if key in self.on_side:
            self.on_side.discard(key)
            main = self.ops.current()
            for tensor in _tensors(input_grads):
                self.ops.record(tensor, main)


def _tensors(items: Iterable[Any]) -> Iterable[torch.Tensor]:
    for item in items:
        if isinstance(item, torch.Tensor) and item.device.type != "meta":
            yield item


def no_streams() -> ContextManager[None]:
    """A context that changes nothing (the stand-in of ``torch.cuda.stream`` on CPU)."""
    return contextlib.nullcontext()
