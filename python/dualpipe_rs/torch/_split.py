"""Split backward for any module: input gradients now, weight gradients later.

The input pass runs ``torch.autograd.grad`` towards the stage inputs only, keeping the graph.
Before it runs, pre-hooks are placed on the nodes where the paths to the parameters leave the
paths to the inputs; they capture the gradients that flow into those nodes. The weight pass
later starts from those captured gradients (as gradient edges) and runs only the parameter
branches: no second forward and no second full backward. Outputs whose graph never reaches
an input are kept whole for the weight pass.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch.autograd import Variable
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["DeferredWeights", "backward_input"]


def _node(t: torch.Tensor) -> Optional[Node]:
    """The autograd node that receives ``t``'s gradient (its grad_fn or its accumulator)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        # A leaf's accumulator is created lazily; a view makes it exist.
        return t.view_as(t).grad_fn.next_functions[0][0]
    return None


def _consumers(roots: Sequence[Node]) -> Dict[Node, List[Node]]:
    """For every node reachable from ``roots``, the nodes that pass gradient into it."""
    seen: Set[Node] = set()
    queue = collections.deque()
    users: Dict[Node, List[Node]] = collections.defaultdict(list)
    for root in roots:
        if root not in seen:
            seen.add(root)
            queue.append(root)
    while queue:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            users[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return users


def _upstream(starts: Sequence[Node], users: Dict[Node, List[Node]], stop: Set[Node]):
    """Nodes from which ``starts`` are reached, walking towards the outputs; nodes in
    ``stop`` are recorded as met and not walked past."""
    closure: Set[Node] = set()
    met: Set[Node] = set()
    queue = collections.deque()
    for node in starts:
        if node is not None and node not in closure:
            closure.add(node)
            queue.append(node)
    while queue:
        node = queue.popleft()
        for user in users.get(node, ()):
            if user in stop:
                met.add(user)
            elif user not in closure:
                closure.add(user)
                queue.append(user)
    return closure, met


class DeferredWeights:
    """What a deferred backward leaves for its ``W``: captured gradients and graph edges."""

    __slots__ = ("_groups", "_kept", "_ready")

    def __init__(self, groups, kept, ready) -> None:
        # groups: [(node, params, captured slot)]; kept: (edges, grads, params);
        # ready: [(param, gradient)] computed during the input pass.
        self._groups = groups
        self._kept = kept
        self._ready = ready

    def run(self, skip_custom: bool = False) -> None:
        """Compute the parameters' gradients and accumulate them into ``.grad``.

        With ``skip_custom``, branches that start at a custom ``autograd.Function`` are left
        out: such a function put its weight gradient into the ``WeightGradStore`` already.
        """
        groups, self._groups = self._groups, []
        kept, self._kept = self._kept, None
        ready, self._ready = self._ready, []
        for p, g in ready:
            _accumulate(p, g)
        for node, params, slot in groups:
            if skip_custom and isinstance(node, BackwardCFunction):
                continue
            grads = slot.get("grads")
            if grads is None:
                continue
            edges = [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
            values = [g for g in grads if g is not None]
            if edges:
                _grad_into(edges, values, params)
        if kept is not None:
            edges, grads, params = kept
            if edges and params:
                _grad_into(edges, grads, params)


def _accumulate(p: torch.Tensor, g: Optional[torch.Tensor]) -> None:
    if g is None:
        return
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g


def _grad(outputs, grads, inputs, retain: bool):
    """``torch.autograd.grad`` without its Python-side checks (the caller's shapes hold):
    the gradients of ``inputs``, ``None`` where unreached."""
    return Variable._execution_engine.run_backward(
        tuple(outputs), tuple(grads), retain, False, tuple(inputs), True, False
    )


def _grad_into(edges, grads, params) -> None:
    dws = _grad(edges, grads, params, False)
    for p, dw in zip(params, dws):
        _accumulate(p, dw)


def backward_input(
    outputs: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.nn.Parameter],
) -> Tuple[List[Optional[torch.Tensor]], DeferredWeights]:
    """Gradients of ``inputs`` now; a :class:`DeferredWeights` for ``params`` later.

    ``grads`` may hold ``None`` for a scalar loss output (a gradient of one). Parameters
    whose gradient reaches the stage through several branch points of the input path (a
    weight used twice on the way to the input) get their gradient in this pass already:
    deferring them would count a path twice.
    """
    params = [p for p in params if p.requires_grad]
    want = [t for t in inputs if t.requires_grad]
    out_nodes = [_node(o) for o in outputs]
    users = _consumers([n for n in out_nodes if n is not None])
    input_side, _ = _upstream([_node(t) for t in want], users, set())
    kept_nodes = {n for n in out_nodes if n is not None and n not in input_side}

    # Where each parameter's branch joins the input path; parameters that share a branch
    # point form one group (union-find over branch points).
    parent: Dict[int, int] = {}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    meets: List[Set[Node]] = []
    owner: Dict[Node, int] = {}
    kept_params = []
    for i, p in enumerate(params):
        parent[i] = i
        n = _node(p)
        if n not in users and n not in out_nodes:
            meets.append(set())
            continue
        closure, met = _upstream([n], users, input_side)
        if closure & kept_nodes:
            kept_params.append(p)
        meets.append(met)
        for node in met:
            if node in owner:
                parent[find(i)] = find(owner[node])
            else:
                owner[node] = i
    members: Dict[int, List[int]] = collections.defaultdict(list)
    for i in range(len(params)):
        if meets[i]:
            members[find(i)].append(i)
    groups, entangled = [], []
    for root, idx in members.items():
        nodes = set().union(*(meets[i] for i in idx))
        if len(nodes) == 1:
            groups.append((next(iter(nodes)), [params[i] for i in idx], {}))
        else:
            entangled += [params[i] for i in idx]

    handles = []
    for node, _, slot in groups:

        def hook(grad_outputs, slot=slot):
            slot["grads"] = tuple(grad_outputs)

        handles.append(node.register_prehook(hook))

    # Edges, not tensors: a sent output may have had its storage released already.
    run_edges, run_grads, keep_edges, keep_grads = [], [], [], []
    for o, g, n in zip(outputs, grads, out_nodes):
        if n is None:
            continue
        if g is None:
            g = torch.ones_like(o)
        if n in input_side:
            run_edges.append(get_gradient_edge(o))
            run_grads.append(g)
        else:
            keep_edges.append(get_gradient_edge(o))
            keep_grads.append(g)

    targets = want + entangled
    try:
        if targets and run_edges:
            result = _grad(run_edges, run_grads, targets, True)
        else:
            result = [None] * len(targets)
    finally:
        for h in handles:
            h.remove()
    dinputs = result[: len(want)]
    ready = list(zip(entangled, result[len(want) :]))
    by_id = {id(t): d for t, d in zip(want, dinputs)}
    input_grads = [by_id.get(id(t)) if t.requires_grad else None for t in inputs]
    later = DeferredWeights(groups, (keep_edges, keep_grads, kept_params), ready)
    return input_grads, later
