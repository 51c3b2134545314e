"""Deferred weight gradients: the reference's ``WeightGradStore`` protocol.

A module that computes its own weight gradients (a custom ``autograd.Function``) may put a
closure into :class:`WeightGradStore` instead of running it, while the store is enabled. The
pipeline enables the store during a backward whose weight gradient is deferred (``B`` with
``defer_w``), groups what was put there, and runs the group at the matching ``W``.
"""

from __future__ import annotations

import collections
from typing import Callable, Deque, List

import torch
from torch.autograd import Variable

__all__ = ["WeightGradStore", "run_backward"]


class WeightGradStore:
    """A queue of deferred weight-gradient closures, compatible with the reference's class.

    ``enabled`` is set by the pipeline around a deferring backward; ``put`` keeps a closure;
    ``flush`` closes the current group; ``pop`` runs the oldest group; ``clear`` empties all.
    """

    enabled: bool = False
    cache: List[Callable[[], None]] = []
    funcs_queue: Deque[List[Callable[[], None]]] = collections.deque()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        """Keep ``func`` in the current group."""
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        """Close the current group (possibly empty) and queue it."""
        cls.funcs_queue.append(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest queued group."""
        if not cls.funcs_queue:
            raise RuntimeError("WeightGradStore.pop: the queue is empty")
        for func in cls.funcs_queue.popleft():
            func()

    @classmethod
    def take(cls) -> List[Callable[[], None]]:
        """Close the current group and return it instead of queueing it."""
        group, cls.cache = cls.cache, []
        return group

    @classmethod
    def clear(cls) -> None:
        """Forget every closure."""
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = collections.deque()


def run_backward(tensors, grad_tensors) -> None:
    """Backpropagate ``grad_tensors`` from ``tensors``, accumulating into leaves' ``.grad``.

    The same call as the reference's helper: no graph is kept, unreachable leaves are allowed.
    """
    Variable._execution_engine.run_backward(
        tuple(tensors),
        tuple(grad_tensors),
        keep_graph=False,
        create_graph=False,
        allow_unreachable=True,
        accumulate_grad=True,
    )
