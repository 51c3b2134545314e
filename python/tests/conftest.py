"""Shared fixtures: process worlds reused across cases, one torch thread per process."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

_worlds = {}


def world_of(size: int):
    """A live world of ``size`` processes (restarted when a case left it broken). torch is
    imported here, not at collection, so the core's tests run without it."""
    from _world import World

    w = _worlds.get(size)
    if w is None or w.broken:
        if w is not None:
            w.close(force=True)
        w = World(size)
        _worlds[size] = w
    return w


@pytest.fixture
def world2():
    return world_of(2)


@pytest.fixture
def world4():
    return world_of(4)


@pytest.fixture
def world1():
    return world_of(1)


def pytest_sessionfinish(session, exitstatus):
    for w in _worlds.values():
        w.close()
