"""Split backward for any module: input gradients now, weight gradients later.

The input pass runs the autograd engine towards the stage inputs only, keeping the graph. It
also captures the gradients that flow into the nodes where the paths to the parameters leave
the paths to the inputs (as gradient edges the engine records on its way). The weight pass
later starts from those captured gradients and runs only the parameter branches: no second
forward and no second full backward. Outputs whose graph never reaches an input are kept whole
for the weight pass.

Where the branches lie depends only on the shape of the graph. The analysis is done once per
shape (the nodes' types and edges, and which nodes are the outputs, inputs and parameters) and
reused: a step then only walks the graph once to index it.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch.autograd import Variable
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["DeferredWeights", "backward_input"]


_ACCUMULATE = type(torch.empty(1, requires_grad=True).view(1).grad_fn.next_functions[0][0])

# Analyses by graph shape; a stage's graph has one shape per kind of step, so this stays small.
_PLANS: Dict[tuple, "_Plan"] = {}
_PLANS_MAX = 256


def _node(t: torch.Tensor) -> Optional[Node]:
    """The autograd node that receives ``t``'s gradient (its grad_fn or its accumulator)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        # A leaf's accumulator is created lazily; a view makes it exist.
        return t.view_as(t).grad_fn.next_functions[0][0]
    return None


def _index(roots: Sequence[Node]):
    """Every node reachable from ``roots`` in a fixed (breadth-first) order, each node's
    successors as indices, and the node of every leaf tensor met (by ``id``)."""
    nodes: List[Node] = []
    where: Dict[Node, int] = {}
    for root in roots:
        if root not in where:
            where[root] = len(nodes)
            nodes.append(root)
    edges: List[Tuple[int, ...]] = []
    leaves: Dict[int, int] = {}
    i = 0
    while i < len(nodes):
        node = nodes[i]
        row = []
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            j = where.get(nxt)
            if j is None:
                j = where[nxt] = len(nodes)
                nodes.append(nxt)
                if type(nxt) is _ACCUMULATE:
                    leaves[id(nxt.variable)] = j
            row.append(j)
        edges.append(tuple(row))
        i += 1
    for j, node in enumerate(nodes[: len(roots)]):
        if type(node) is _ACCUMULATE:
            leaves[id(node.variable)] = j
    return nodes, where, edges, leaves


def _upstream(starts, users, stop):
    """Node indices from which ``starts`` are reached, walking towards the outputs; nodes in
    ``stop`` are recorded as met and not walked past."""
    closure: Set[int] = set(starts)
    met: Set[int] = set()
    queue = collections.deque(closure)
    while queue:
        for user in users[queue.popleft()]:
            if user in stop:
                met.add(user)
            elif user not in closure:
                closure.add(user)
                queue.append(user)
    return closure, met


class _Plan:
    """Where the parameters' branches leave the input path, for one graph shape (indices
    into the indexed graph)."""

    __slots__ = ("run_outputs", "groups", "entangled", "kept_params", "captures")

    def __init__(self, edges, types, out_idx, in_idx, param_idx) -> None:
        users: List[List[int]] = [[] for _ in edges]
        for i, row in enumerate(edges):
            for j in row:
                users[j].append(i)
        input_side, _ = _upstream([i for i in in_idx if i is not None], users, set())
        kept_nodes = {i for i in out_idx if i is not None and i not in input_side}
        # Outputs whose graph reaches an input run in the input pass; the others are kept.
        self.run_outputs = tuple(i is not None and i in input_side for i in out_idx)

        # Where each parameter's branch joins the input path; parameters that share a branch
        # point form one group (union-find over branch points).
        parent = list(range(len(param_idx)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        meets: List[Set[int]] = []
        owner: Dict[int, int] = {}
        kept_params = []
        for k, n in enumerate(param_idx):
            if n is None:
                meets.append(set())
                continue
            closure, met = _upstream([n], users, input_side)
            if closure & kept_nodes:
                kept_params.append(k)
            meets.append(met)
            for node in met:
                if node in owner:
                    parent[find(k)] = find(owner[node])
                else:
                    owner[node] = k
        members: Dict[int, List[int]] = collections.defaultdict(list)
        for k in range(len(param_idx)):
            if meets[k]:
                members[find(k)].append(k)
        groups, entangled = [], []
        for idx in members.values():
            nodes = set().union(*(meets[k] for k in idx))
            if len(nodes) == 1:
                groups.append((next(iter(nodes)), tuple(idx)))
            else:
                entangled += idx
        # groups: (branch node, parameter positions, first capture, capture count, custom).
        self.groups = []
        self.captures = []
        for node, idx in groups:
            first = len(self.captures)
            count = types[node][1]
            self.captures += [(node, slot) for slot in range(count)]
            self.groups.append((node, idx, first, count, types[node][0]))
        self.entangled = tuple(entangled)
        self.kept_params = tuple(kept_params)


def _plan(outputs, out_nodes, want, params):
    """The indexed graph and its (cached) plan."""
    nodes, where, edges, leaves = _index([n for n in out_nodes if n is not None])
    out_idx = tuple(None if n is None else where[n] for n in out_nodes)
    in_idx = tuple(
        leaves.get(id(t)) if t.grad_fn is None else where.get(t.grad_fn) for t in want
    )
    param_idx = tuple(leaves.get(id(p)) for p in params)
    types = tuple(type(n) for n in nodes)
    key = (tuple(edges), types, out_idx, in_idx, param_idx)
    plan = _PLANS.get(key)
    if plan is None:
        info = [
            (issubclass(t, BackwardCFunction), len(n._input_metadata)) for t, n in zip(types, nodes)
        ]
        plan = _Plan(edges, info, out_idx, in_idx, param_idx)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return nodes, plan


class DeferredWeights:
    """What a deferred backward leaves for its ``W``: captured gradients and graph edges."""

    __slots__ = ("_groups", "_kept", "_ready")

    def __init__(self, groups, kept, ready) -> None:
        # groups: [(node, params, captured gradients, custom)]; kept: (edges, grads, params);
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
        for node, params, grads, custom in groups:
            if skip_custom and custom:
                continue
            edges = [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
            if edges:
                _grad_into(edges, [g for g in grads if g is not None], params)
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
    the gradients of ``inputs`` (tensors or gradient edges), ``None`` where unreached."""
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
    nodes, plan = _plan(outputs, out_nodes, want, params)

    # Edges, not tensors: a sent output may have had its storage released already.
    run_edges, run_grads, keep_edges, keep_grads = [], [], [], []
    for o, g, n, run in zip(outputs, grads, out_nodes, plan.run_outputs):
        if n is None:
            continue
        if g is None:
            g = torch.ones_like(o)
        if run:
            run_edges.append(get_gradient_edge(o))
            run_grads.append(g)
        else:
            keep_edges.append(get_gradient_edge(o))
            keep_grads.append(g)

    entangled = [params[k] for k in plan.entangled]
    targets = want + entangled
    targets += [GradientEdge(nodes[n], slot) for n, slot in plan.captures]
    if targets and run_edges:
        result = _grad(run_edges, run_grads, targets, True)
    else:
        result = [None] * len(targets)
    nw, ne = len(want), len(entangled)
    caps = result[nw + ne :]
    groups = [
        (nodes[n], [params[k] for k in idx], caps[first : first + count], custom)
        for n, idx, first, count, custom in plan.groups
    ]
    ready = list(zip(entangled, result[nw : nw + ne]))
    by_id = {id(t): d for t, d in zip(want, result[:nw])}
    input_grads = [by_id.get(id(t)) if t.requires_grad else None for t in inputs]
    kept_params = [params[k] for k in plan.kept_params]
    later = DeferredWeights(groups, (keep_edges, keep_grads, kept_params), ready)
    return input_grads, later
