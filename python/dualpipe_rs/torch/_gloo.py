"""Scheduling of gloo's TCP event-loop threads on CPU (Linux).

Each gloo process group runs one TCP event-loop thread that reads incoming messages. When
that thread wakes up while the training thread holds the connection's lock (inside a
``send`` or ``recv`` call), the kernel lets it preempt the training thread; the loop then
finds the lock taken, returns to ``epoll_wait``, is woken again by the same unread event,
and spins until the scheduler tick takes the core back, 3 to 5 ms later, while the training
thread waits. On a core that a rank shares with its loop thread (a rank pinned to a core,
or more threads than cores) this costs a few milliseconds on several messages a step.

Under ``SCHED_BATCH`` a thread that wakes up never preempts the running thread: it runs
when the core is free or at the next tick, and keeps its full share of the core otherwise.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import List, Optional, Tuple

__all__ = [
    "set_gloo_loop_policy",
    "gloo_loop_threads",
    "loops_batched",
    "early_receives_pay",
    "leading_pays",
]

# Whether set_gloo_loop_policy last moved the loops to SCHED_BATCH (read by Pipeline: see
# early_receives_pay).
_BATCHED = False


def loops_batched() -> bool:
    """Whether :func:`set_gloo_loop_policy` last moved this process's gloo loops to
    ``SCHED_BATCH``."""
    return _BATCHED


def early_receives_pay() -> bool:
    """Whether a :class:`~dualpipe_rs.torch.Pipeline` on gloo should post each batch's
    receives at the commit before it, checked at every step. Early receives let the sender
    write its data at once; the receiver's loop then reads it while the training thread
    computes. That pays under the default policy, where the loop may preempt, and on a rank
    held to one core. With the loops in ``SCHED_BATCH`` and the rank free to run on several
    busy cores, the woken loop waits for a core, and early receives made steps 20 to 30%
    slower (docs/performance.md, "gloo's event-loop thread")."""
    if not _BATCHED:
        return True
    try:
        return len(os.sched_getaffinity(0)) <= 1
    except (AttributeError, OSError):
        return False


def leading_pays() -> bool:
    """Whether a :class:`~dualpipe_rs.torch.Pipeline` on gloo should order the exchanges of
    two ranks at one commit (one receives the other's messages before it sends; see
    ``_lead``), checked at every step. Under the default policy both ranks inside gloo's calls
    on their connection at once can stall each other until the scheduler tick; ordering them
    took about 40% off a 2-rank dualpipev step at h 64 (docs/performance.md). With the loops in
    ``SCHED_BATCH`` no loop preempts, and the wait only adds a message's latency."""
    return not _BATCHED


# gloo's loop waits in epoll_wait(fd, events, 64, 10 ms); a thread is taken for one when its
# current system call has that signature (x86-64: epoll_wait or epoll_pwait; arm64 has only
# epoll_pwait).
_EPOLL_CALLS = {"x86_64": (232, 281), "aarch64": (22,)}
_MAX_EVENTS, _TIMEOUT_MS = 0x40, 0xA


def _syscall(tid: int) -> Optional[Tuple[int, List[int]]]:
    """The system call thread ``tid`` of this process waits in, with its arguments; ``None``
    when it is running or gone."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            words = f.read().split()
    except OSError:
        return None
    if len(words) < 6 or not words[0].lstrip("-").isdigit():
        return None
    try:
        return int(words[0]), [int(w, 16) for w in words[1:6]]
    except ValueError:
        return None


def _name(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def gloo_loop_threads(samples: int = 20, interval: float = 0.001) -> List[int]:
    """The thread ids of this process's gloo TCP event-loop threads (one per gloo process
    group that has connected), found from the system call each thread waits in, looked at
    ``samples`` times ``interval`` seconds apart (a loop thread busy with a message at one
    look is found at another). Empty where there is none, or off Linux."""
    calls = _EPOLL_CALLS.get(platform.machine())
    if calls is None or not os.path.isdir("/proc/self/task"):
        return []
    me = threading.get_native_id()
    found = set()
    for i in range(max(1, samples)):
        if i:
            time.sleep(interval)
        for entry in os.listdir("/proc/self/task"):
            tid = int(entry)
            if tid == me or tid in found:
                continue
            call = _syscall(tid)
            if call is None:
                continue
            nr, args = call
            if nr in calls and args[2] == _MAX_EVENTS and args[3] == _TIMEOUT_MS:
                # torch's own threads (store, collective workers) carry a "pt_" name.
                if not _name(tid).startswith("pt_"):
                    found.add(tid)
    return sorted(found)


def set_gloo_loop_policy(batch: bool = True) -> List[int]:
    """Stop gloo's TCP event-loop threads from preempting the training thread on CPU.

    With ``batch`` (the default) every gloo event-loop thread of this process that exists
    now (one per gloo process group; call this after creating the groups and one collective
    or message on each, such as a ``barrier``) is moved to the ``SCHED_BATCH`` policy: it no
    longer preempts a running thread when a message arrives, which on a shared core avoids
    a spin of 3 to 5 ms each time the loop wakes while the training thread is inside a
    ``send`` or ``recv`` (see docs/torch.md, "gloo on CPU"). ``batch=False`` moves them back
    to the default policy. Linux only; affects the whole process (every gloo group's loop),
    not only pipelines; has no effect on NCCL. While the loops are in ``SCHED_BATCH``, a
    :class:`~dualpipe_rs.torch.Pipeline` on a rank free to run on several cores posts
    receives at their own commit (see :func:`early_receives_pay`).

    Returns the thread ids changed (empty where no loop thread was found or off Linux).
    Raises ``PermissionError`` where the system refuses the change.
    """
    global _BATCHED
    if not hasattr(os, "SCHED_BATCH"):
        return []
    policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
    changed = []
    for tid in gloo_loop_threads():
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:
            continue
        changed.append(tid)
    if changed or not batch:
        _BATCHED = batch
    return changed
