"""The ordering of exchanges on gloo (``dualpipe_rs.torch._lead``): the waits it adds never
deadlock a schedule, checked by running the runtime's posting model over every family."""

from __future__ import annotations

import json
from typing import Dict, FrozenSet, List

import pytest

import dualpipe_rs
from dualpipe_rs.torch._lead import _leads, leader_waits

SIZES = [(2, 4), (2, 8), (3, 6), (4, 8), (4, 12), (8, 16)]


def _plans():
    for family in (f["name"] for f in dualpipe_rs.families()):
        v = 2 if family == "interleaved-1f1b" else None
        for n, c in SIZES:
            try:
                yield family, n, c, dualpipe_rs.plan(family, n, c, chunks_per_rank=v)
            except ValueError:
                continue


def _batches(schedule, rank):
    """Per batch of ``rank``: its sends and receives as lists of peers, and the instruction
    index of the commit that closes it."""
    out, sends, recvs = [], [], []
    ins = schedule.instructions(rank)
    for i, x in enumerate(ins):
        if x["op"] == "commit":
            out.append((sends, recvs, i))
            sends, recvs = [], []
        elif x["op"] == "send":
            sends.append(x["peer"])
        elif x["op"] == "recv":
            recvs.append(x["peer"])
    out.append((sends, recvs, len(ins)))
    return out


def _runs_to_the_end(schedule, waits: List[Dict[int, FrozenSet[int]]], early: bool) -> bool:
    """Run the runtime's model of a step: at each commit a rank posts its receives (this
    batch's, or with ``early`` the next batch's, those of the first batch at its first commit
    too), waits for the receives of this batch from the peers ``waits`` names, posts its
    sends, then waits for the whole batch. A message between two ranks is matched in order; a
    receive completes once its send is posted, a send once its receive is posted. True when
    every rank reaches the end."""
    n = schedule.num_ranks
    plan = [_batches(schedule, r) for r in range(n)]
    sent = {}  # (a, b): sends posted from a to b
    posted = {}  # (b, a): receives posted on b from a
    # Per rank: batch, phase (0 post receives, 1 wait for leaders, 2 post sends, 3 wait all).
    at = [[0, 0] for _ in range(n)]
    mark_s = [dict() for _ in range(n)]  # (rank, batch, peer) -> count of sends up to it
    mark_r = [dict() for _ in range(n)]
    for r in range(n):
        cs, cr = {}, {}
        for k, (sends, recvs, _) in enumerate(plan[r]):
            for p in sends:
                cs[p] = cs.get(p, 0) + 1
            for p in recvs:
                cr[p] = cr.get(p, 0) + 1
            mark_s[r][k] = dict(cs)
            mark_r[r][k] = dict(cr)

    def received(r, k, peers) -> bool:
        need = mark_r[r][k]
        return all(sent.get((p, r), 0) >= need.get(p, 0) for p in peers)

    def post_recvs(r, k) -> None:
        for p, c in mark_r[r][k].items():
            if posted.get((r, p), 0) < c:
                posted[(r, p)] = c

    progress = True
    while progress:
        progress = False
        for r in range(n):
            k, phase = at[r]
            if k >= len(plan[r]):
                continue
            sends, recvs, index = plan[r][k]
            if phase == 0:
                post_recvs(r, k)
                if early and k + 1 < len(plan[r]):
                    post_recvs(r, k + 1)
                at[r][1] = 1
            elif phase == 1:
                if not received(r, k, waits[r].get(index, ())):
                    continue
                at[r][1] = 2
            elif phase == 2:
                for p, c in mark_s[r][k].items():
                    sent[(r, p)] = c
                at[r][1] = 3
            else:
                done = received(r, k, set(recvs)) and all(
                    posted.get((p, r), 0) >= mark_s[r][k][p] for p in set(sends)
                )
                if not done:
                    continue
                at[r] = [k + 1, 0]
            progress = True
    return all(at[r][0] >= len(plan[r]) for r in range(n))


def _every_candidate(schedule) -> List[Dict[int, FrozenSet[int]]]:
    """Every exchange ordered, without the deadlock check: a follower waits for each leader
    it both receives from and sends to in a batch."""
    out = []
    for r in range(schedule.num_ranks):
        mine = {}
        for sends, recvs, index in _batches(schedule, r):
            peers = frozenset(p for p in set(recvs) & set(sends) if p != r and _leads(p, r))
            if peers:
                mine[index] = peers
        out.append(mine)
    return out


@pytest.mark.parametrize("early", [False, True], ids=["at-commit", "early"])
def test_ordered_exchanges_never_deadlock(early):
    checked = 0
    for family, n, c, schedule in _plans():
        waits = leader_waits(schedule)
        assert len(waits) == n
        assert _runs_to_the_end(schedule, [{} for _ in range(n)], early), (family, n, c)
        assert _runs_to_the_end(schedule, waits, early), f"{family} {n}x{c}: deadlock"
        checked += 1
    assert checked >= 20


def _doc(ranks) -> str:
    """A 2-stage, 2-micro-batch schedule document from each rank's instruction texts."""
    out = []
    for text in ranks:
        ins = []
        for t in text.split(";"):
            w = t.split()
            if w[0] in ("F", "B"):
                ins.append({"op": w[0], "stage": int(w[1][1:]), "mb": int(w[2][1:])})
            elif w[0] in ("send", "recv"):
                ins.append({"op": w[0], "kind": w[1], "stage": int(w[2][1:]),
                            "mb": int(w[3][1:]), "peer": int(w[4][1:])})
            else:
                ins.append({"op": "commit"})
        out.append(ins)
    return json.dumps({
        "format": "dualpipe-schedule/v1", "schedule": "custom", "num_ranks": 2,
        "num_stages": 2, "num_microbatches": 2, "forward_only": False,
        "pipelines": [{"route": [0, 1], "microbatches": [0, 1]}], "ranks": out,
    })


# Rank 1 sends m0's gradient and receives m1's activation in one batch, but rank 0 sends that
# activation only after it has received the gradient: rank 1 must not wait before sending.
LATE_LEADER = _doc([
    "F s0 m0; send act s0 m0 r1; commit; recv grad s0 m0 r1; commit; B s0 m0; F s0 m1;"
    " send act s0 m1 r1; commit; recv grad s0 m1 r1; commit; B s0 m1",
    "recv act s1 m0 r0; commit; F s1 m0; B s1 m0; send grad s1 m0 r0; recv act s1 m1 r0;"
    " commit; F s1 m1; B s1 m1; send grad s1 m1 r0; commit",
])


def test_the_deadlock_check_is_needed():
    """Ordering every exchange without the check deadlocks a valid schedule; the analysis
    leaves that exchange unordered."""
    schedule = dualpipe_rs.Schedule.from_json(LATE_LEADER)
    naive = _every_candidate(schedule)
    assert naive[1], "the exchange is a candidate"
    assert _runs_to_the_end(schedule, [{}, {}], False)
    assert not _runs_to_the_end(schedule, naive, False)
    waits = leader_waits(schedule)
    assert waits == [{}, {}]
    assert _runs_to_the_end(schedule, waits, False)


def test_every_exchange_of_the_families_is_ordered():
    """No family needs the check: every candidate wait of the planner's schedules is kept (a
    wait is left out only where it could close a cycle)."""
    kept = total = 0
    for family, n, c, schedule in _plans():
        naive = _every_candidate(schedule)
        waits = leader_waits(schedule)
        for r in range(n):
            for index, peers in waits[r].items():
                assert peers <= naive[r].get(index, frozenset()), (family, n, c, r, index)
        kept += sum(len(v) for w in waits for v in w.values())
        total += sum(len(v) for w in naive for v in w.values())
    assert total and kept == total, (kept, total)


def test_two_rank_dualpipev_orders_every_exchange():
    """On 2 ranks every steady-state commit of dualpipev is an exchange: rank 1 follows rank 0
    at each of them, rank 0 never waits."""
    schedule = dualpipe_rs.plan("dualpipev", 2, 8)
    waits = leader_waits(schedule)
    assert waits[0] == {}
    exchanges = [
        index
        for sends, recvs, index in _batches(schedule, 1)
        if 0 in sends and 0 in recvs
    ]
    assert exchanges and sorted(waits[1]) == exchanges
    assert all(peers == {0} for peers in waits[1].values())


def test_parity_decides_the_leader():
    assert _leads(0, 1) and not _leads(1, 0)
    assert _leads(2, 1) and not _leads(1, 2)  # the even rank leads, also when higher
    assert _leads(1, 3) and _leads(0, 2) and not _leads(3, 1)
