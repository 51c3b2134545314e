"""A small pool of processes joined by a gloo process group, reused across test cases.

``World(n).run(fn, *args)`` calls ``fn(rank, *args)`` on every process and returns the list of
results, raising with every rank's traceback if any rank failed. Each call has a hard
timeout; a world whose process group may be broken (after a failure) is restarted by the
fixture before the next case.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

CALL_TIMEOUT = float(os.environ.get("DUALPIPE_TEST_TIMEOUT", "120"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, size: int, port: int, conn) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(rank, *args)))
        except BaseException as exc:  # report everything to the parent
            conn.send(("err", (type(exc).__name__, str(exc), traceback.format_exc())))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class RankFailed(AssertionError):
    """One or more ranks raised; ``errors`` maps rank to (type name, message, traceback)."""

    def __init__(self, errors) -> None:
        self.errors = errors
        text = "\n".join(f"--- rank {r}: {e[0]}: {e[1]}\n{e[2]}" for r, e in sorted(errors.items()))
        super().__init__(text)


class World:
    """``size`` processes in one gloo group."""

    def __init__(self, size: int) -> None:
        self.size = size
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns = []
        self.procs = []
        for rank in range(size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(rank, size, port, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self.broken = False

    def run(self, fn: Callable[..., Any], *args, timeout: float = CALL_TIMEOUT) -> List[Any]:
        """``fn(rank, *args)`` on every rank; their results in rank order."""
        for c in self.conns:
            c.send((fn, args))
        results, errors = [None] * self.size, {}
        for rank, c in enumerate(self.conns):
            if not c.poll(timeout):
                self.close(force=True)
                raise TimeoutError(f"rank {rank} did not answer within {timeout} s")
            status, value = c.recv()
            if status == "ok":
                results[rank] = value
            else:
                errors[rank] = value
        if errors:
            self.broken = True
            raise RankFailed(errors)
        return results

    def errors(self, fn: Callable[..., Any], *args, timeout: float = CALL_TIMEOUT):
        """Run ``fn`` expecting failures: {rank: (type name, message)} of the ranks that raised."""
        try:
            self.run(fn, *args, timeout=timeout)
        except RankFailed as exc:
            return {r: (e[0], e[1]) for r, e in exc.errors.items()}
        return {}

    def close(self, force: bool = False) -> None:
        """Stop every process."""
        for c, p in zip(self.conns, self.procs):
            if not force:
                try:
                    c.send(None)
                except Exception:
                    pass
        for p in self.procs:
            p.join(timeout=0 if force else 5)
            if p.is_alive():
                p.kill()
                p.join()
        self.broken = True
