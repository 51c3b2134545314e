"""Which commits wait for a peer's messages before sending theirs (groups that post messages
one by one, as gloo).

Where two ranks exchange messages at the same commit, both threads would be inside gloo's
``send`` at the same moment, each holding its end of the connection. gloo's event loop only
*tries* that lock when a message arrives; on shared cores the woken loop thread of one rank can
preempt the other rank's sending thread and spin on a lock the preempted thread holds, and the
pair stalls until the scheduler's next tick (milliseconds). So at such an exchange one rank, the
follower, first waits for the messages its leader sends it in that batch (its receives are
already posted), then sends: the two sends no longer overlap.

A wait added to a commit must not deadlock. The commits of all ranks form a graph of events:
per rank and batch, *receives posted*, *sends posted*, *waits done*, in program order; a
receive is done once its matching send is posted, a send once its matching receive is posted
(receives modelled as posted at their own commit, the later of the runtime's two choices, so the
result holds with early receives too). A follower's wait adds an edge from its leader's *sends
posted* to its own. The events are put in one order that follows every edge of the graph
(Kahn's algorithm), a follower's event going after its leaders' where that is possible; a wait
is kept only where its edge goes forward in that order. So the graph with every kept wait has
no cycle, and a schedule free of deadlock stays so. (In the planner's families every wait is
kept.) The leader of two ranks is the even one where their parities differ (so along a
pipeline no wait waits for another wait), else the lower one.
"""

from __future__ import annotations

import collections
from typing import Dict, FrozenSet, List

from .. import Schedule
from ._comm import message_streams

__all__ = ["leader_waits"]

# Events of one batch.
_POSTED_RECVS, _POSTED_SENDS, _DONE = 0, 1, 2


def _leads(p: int, r: int) -> bool:
    """Whether rank ``p`` leads rank ``r`` (sends first where both exchange)."""
    if p % 2 != r % 2:
        return p % 2 == 0
    return p < r


def leader_waits(schedule: Schedule) -> List[Dict[int, FrozenSet[int]]]:
    """Per pipeline rank: commit instruction index (the number of instructions for the step's
    closing commit) -> the pipeline ranks whose messages of that batch the rank receives before
    it posts its sends."""
    n = schedule.num_ranks
    commits: List[List[int]] = []
    sends: List[Dict[int, List[int]]] = []
    recvs: List[Dict[int, List[int]]] = []
    for r in range(n):
        s, v, at = message_streams(schedule, r)
        sends.append({p: [b for b, _ in m] for p, m in s.items()})
        recvs.append({p: [b for b, _ in m] for p, m in v.items()})
        commits.append(at)

    base = [0] * n
    total = 0
    for r in range(n):
        base[r] = total
        total += 3 * len(commits[r])

    def node(r: int, k: int, event: int) -> int:
        return base[r] + 3 * k + event

    succ: List[List[int]] = [[] for _ in range(total)]
    for r in range(n):
        for k in range(len(commits[r])):
            succ[node(r, k, _POSTED_RECVS)].append(node(r, k, _POSTED_SENDS))
            succ[node(r, k, _POSTED_SENDS)].append(node(r, k, _DONE))
            if k + 1 < len(commits[r]):
                succ[node(r, k, _DONE)].append(node(r, k + 1, _POSTED_RECVS))
    # last_send[(r, k, p)]: the last batch of p whose sends r receives in its batch k.
    last_send: Dict[tuple, int] = {}
    for a in range(n):
        for b, batches in sends[a].items():
            if b == a or not 0 <= b < n:
                continue
            theirs = recvs[b].get(a, [])
            if len(theirs) != len(batches):
                return [{} for _ in range(n)]  # not a matched schedule: no waits
            for i, j in zip(batches, theirs):
                succ[node(a, i, _POSTED_SENDS)].append(node(b, j, _DONE))
                succ[node(b, j, _POSTED_RECVS)].append(node(a, i, _DONE))
                key = (b, j, a)
                if last_send.get(key, -1) < i:
                    last_send[key] = i

    # The candidate waits: a follower's sends-posted event -> (its rank, its batch, a leader,
    # the leader's sends-posted event whose messages it waits for).
    cands: Dict[int, List[tuple]] = {}
    for r in range(n):
        sent_in: Dict[int, set] = {}
        for p, batches in sends[r].items():
            for k in batches:
                sent_in.setdefault(k, set()).add(p)
        for p in sorted(recvs[r]):
            if p == r or not _leads(p, r):
                continue
            for k in sorted(set(recvs[r][p])):
                if p in sent_in.get(k, ()):
                    j = last_send[(r, k, p)]
                    cands.setdefault(node(r, k, _POSTED_SENDS), []).append(
                        (r, k, p, node(p, j, _POSTED_SENDS))
                    )
    waited_by: Dict[int, List[int]] = {}
    for mine, row in cands.items():
        for _, _, _, theirs in row:
            waited_by.setdefault(theirs, []).append(mine)

    # One order of all events (Kahn's algorithm) that follows every edge of the graph and,
    # where it can, puts a leader's sends before its follower's. A follower's event waits for
    # its leaders; when nothing else can go next, the event that has waited longest goes
    # without the leaders it still waits for. A base graph with a cycle gives no waits.
    base_in = [0] * total
    for row in succ:
        for v in row:
            base_in[v] += 1
    lead_in = [len(cands.get(v, ())) for v in range(total)]
    pos = [-1] * total
    ready = collections.deque(v for v in range(total) if base_in[v] == 0 and lead_in[v] == 0)
    stalled = collections.deque(v for v in range(total) if base_in[v] == 0 and lead_in[v] > 0)
    count = 0
    while count < total:
        if ready:
            u = ready.popleft()
        else:
            while stalled and pos[stalled[0]] >= 0:
                stalled.popleft()
            if not stalled:
                return [{} for _ in range(n)]
            u = stalled.popleft()
        pos[u] = count
        count += 1
        for v in succ[u]:
            base_in[v] -= 1
            if base_in[v] == 0:
                (ready if lead_in[v] == 0 else stalled).append(v)
        for v in waited_by.get(u, ()):
            if pos[v] < 0:
                lead_in[v] -= 1
                if lead_in[v] == 0 and base_in[v] == 0:
                    ready.append(v)

    out: List[Dict[int, FrozenSet[int]]] = [{} for _ in range(n)]
    for mine, row in cands.items():
        for r, k, p, theirs in row:
            if pos[theirs] < pos[mine]:
                at = commits[r][k]
                out[r][at] = out[r].get(at, frozenset()) | {p}
    return out
