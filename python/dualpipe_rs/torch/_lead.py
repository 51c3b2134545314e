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
result holds with early receives too). Events get a key (longest path from the start, then the
rank's parity, then the rank); every edge of the graph goes from a smaller key to a larger one.
A follower's wait adds an edge from the leader's *sends posted* to its own, and is kept only
where that edge also goes forward: the graph with every kept wait has no cycle, so a schedule
free of deadlock stays so. The leader of two ranks is the even one where their parities differ
(so along a pipeline no wait waits for another wait), else the lower one.
"""

from __future__ import annotations

import collections
from typing import Dict, FrozenSet, List

from .. import Schedule

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
        batch = 0
        at: List[int] = []
        s: Dict[int, List[int]] = {}
        v: Dict[int, List[int]] = {}
        ins = schedule.instructions(r)
        for i, x in enumerate(ins):
            op = x["op"]
            if op == "commit":
                at.append(i)
                batch += 1
            elif op == "send":
                s.setdefault(x["peer"], []).append(batch)
            elif op == "recv":
                v.setdefault(x["peer"], []).append(batch)
        at.append(len(ins))
        commits.append(at)
        sends.append(s)
        recvs.append(v)

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
            a, s_, d = node(r, k, 0), node(r, k, 1), node(r, k, 2)
            succ[a].append(s_)
            succ[s_].append(d)
            if k + 1 < len(commits[r]):
                succ[d].append(node(r, k + 1, _POSTED_RECVS))
    # leader_of[(r, k, p)]: the last batch of p whose sends r receives in its batch k.
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

    # Longest path from the start (Kahn's order); a cycle means no waits at all.
    indeg = [0] * total
    for row in succ:
        for v in row:
            indeg[v] += 1
    level = [0] * total
    queue = collections.deque(i for i in range(total) if indeg[i] == 0)
    seen = 0
    while queue:
        u = queue.popleft()
        seen += 1
        lu = level[u] + 1
        for v in succ[u]:
            if level[v] < lu:
                level[v] = lu
            indeg[v] -= 1
            if indeg[v] == 0:
                queue.append(v)
    if seen != total:
        return [{} for _ in range(n)]

    out: List[Dict[int, FrozenSet[int]]] = [{} for _ in range(n)]
    for r in range(n):
        sent_in: Dict[int, set] = {}
        for p, batches in sends[r].items():
            for k in batches:
                sent_in.setdefault(k, set()).add(p)
        for p in recvs[r]:
            if p == r or not _leads(p, r):
                continue
            for k in set(recvs[r][p]):
                if p not in sent_in.get(k, ()):
                    continue
                j = last_send[(r, k, p)]
                mine, theirs = node(r, k, _POSTED_SENDS), node(p, j, _POSTED_SENDS)
                if (level[theirs], p % 2, p) < (level[mine], r % 2, r):
                    at = commits[r][k]
                    out[r][at] = out[r].get(at, frozenset()) | {p}
    return out
