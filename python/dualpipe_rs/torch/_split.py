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

A custom ``autograd.Function`` is not split: its backward is one Python call that computes
the input gradient and whatever it returns for its parameters together, so the input pass
takes those parameter gradients as it runs it (they are accumulated at the weight pass, like
every other). Running it again at the weight pass would double what such a function does
itself: put a weight gradient into the ``WeightGradStore`` (the reference's protocol, run at
the W) or write ``.grad`` directly.

Two cases skip work. A plain linear branch (``nn.Linear``'s ``mm``/``addmm`` of ``t()`` of
the weight) gets its weight gradient at the weight pass from the captured gradient and the
input the product saved, with the products its backward runs, in the same layout: the same
bits, without a second engine run. A stage with nothing to split (every parameter reached only
through custom functions) needs no graph walk: once an analysis has found that, the input pass
of a later call with the same parameters is one plain backward, as the reference runs it.

Gradients reach ``.grad`` as the engine's accumulation would put them there, and the
parameters' post-accumulate-grad hooks run after each accumulation.

A graph with a reentrant checkpoint (``torch.utils.checkpoint`` with ``use_reentrant=True``)
cannot be split: its backward runs a backward of its own, which refuses to stop at chosen
inputs. Its whole backward runs in the input pass (or, where no input needs a gradient, at the
weight pass). A non-reentrant checkpoint splits as any graph.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.utils.checkpoint
from torch.autograd import Variable
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["DeferredWeights", "backward_input"]


def _node_types():
    """The node types of a leaf's accumulator, ``mm``, ``addmm`` and ``t()``."""
    a = torch.empty(2, 2, requires_grad=True)
    b = torch.empty(2, requires_grad=True)
    acc = type(a.view(4).grad_fn.next_functions[0][0])
    return acc, type(a.mm(a).grad_fn), type(torch.addmm(b, a, a).grad_fn), type(a.t().grad_fn)


_ACCUMULATE, _MM, _ADDMM, _T = _node_types()

# A reentrant checkpoint's node: the engine cannot run towards chosen inputs through it.
_REENTRANT = torch.utils.checkpoint.CheckpointFunction._backward_cls

# Analyses by graph shape; a stage's graph has one shape per kind of step, so this stays small.
_PLANS: Dict[tuple, "_Plan"] = {}
_PLANS_MAX = 256

# Parameter lists (by the ids of their tensors) whose last analysis found nothing to split (no
# branch but custom functions), with the positions of the parameters that got a gradient in
# that input pass. A stale entry (ids reused by other tensors, a graph that changed) costs one
# input pass that does not defer; the results stay right.
_OPAQUE: Dict[tuple, frozenset] = {}

_set_grad_enabled = torch._C._set_grad_enabled


def _node(t: torch.Tensor) -> Optional[Node]:
    """The autograd node that receives ``t``'s gradient (its grad_fn or its accumulator)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        # A leaf's accumulator is created lazily; a view makes it exist.
        return t.view_as(t).grad_fn.next_functions[0][0]
    return None


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

    __slots__ = (
        "run_outputs", "groups", "at_input", "kept_params", "captures", "opaque", "whole"
    )

    def __init__(self, edges, types, out_idx, in_idx, param_idx) -> None:
        users: List[List[int]] = [[] for _ in edges]
        for i, row in enumerate(edges):
            for j in row:
                if j >= 0:
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
        # Parameters whose gradient the input pass takes: those reached through several branch
        # points (deferring them would count a path twice) and those whose branch point is a
        # custom function (whose backward runs whole in the input pass).
        groups, at_input = [], []
        for idx in members.values():
            nodes = set().union(*(meets[k] for k in idx))
            node = next(iter(nodes))
            if len(nodes) == 1 and not types[node][0]:
                groups.append((node, tuple(idx)))
            else:
                at_input += idx
        # groups: (branch node, parameter positions, first capture, capture count, how to
        # compute the weight gradient directly where the branch is a plain linear map).
        self.groups = []
        self.captures = []
        for node, idx in groups:
            first = len(self.captures)
            count = types[node][1]
            self.captures += [(node, slot) for slot in range(count)]
            direct = _linear_branch(node, idx, edges, users, types, param_idx)
            self.groups.append((node, idx, first, count, direct))
        self.at_input = tuple(at_input)
        self.kept_params = tuple(kept_params)
        # Nothing to defer: the input pass is then one plain backward.
        self.opaque = not self.groups and not kept_params and all(self.run_outputs)
        # A reentrant checkpoint: no split at all (see _whole_backward).
        self.whole = any(t[2] is _REENTRANT for t in types)


def _linear_branch(node, idx, edges, users, types, param_idx):
    """``(weight position, bias position or None)`` when the group is the weight (and bias)
    of a matrix product whose only way to them is ``t()`` then the weight's accumulator
    (``nn.Linear``'s ``mm`` or ``addmm``), else ``None``."""
    kind, row = types[node][2], edges[node]
    if kind is _MM and len(row) == 2 and len(idx) == 1:
        bias = None
    elif kind is _ADDMM and len(row) == 3 and len(idx) == 2:
        b = row[0]
        bias = next((k for k in idx if param_idx[k] == b), None)
        if bias is None or users[b] != [node]:
            return None
    else:
        return None
    t = row[-1]
    if t < 0 or types[t][2] is not _T or len(edges[t]) != 1 or users[t] != [node]:
        return None
    acc = edges[t][0]
    weight = next((k for k in idx if param_idx[k] == acc), None)
    if weight is None or acc < 0 or users[acc] != [t]:
        return None
    return weight, bias


def _linear_weight_grad(node, grad, bias: bool):
    """The weight (and bias) gradient of an ``mm``/``addmm`` node from the gradient that
    flowed into it and the input it saved: the products its backward would run, in the
    same layout, so the bits are those of the full backward. ``None`` where it does not
    apply (complex numbers, scaled products). Called with gradients disabled, on the
    calling thread's current stream."""
    if grad.is_complex():
        return None
    if bias:
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return None
        x = node._saved_mat1
    else:
        x = node._saved_self
    if not x.is_cpu:
        if not x.is_cuda:
            return None
        # The engine would read them on the forward's stream; here they are read on the
        # current one, which the allocator must know before it reuses their memory.
        stream = torch.cuda.current_stream(x.device)
        x.record_stream(stream)
        grad.record_stream(stream)
    sizes, strides = node._saved_mat2_sym_sizes, node._saved_mat2_sym_strides
    if strides[0] == 1 and strides[1] == sizes[0]:
        dw = grad.t().mm(x)
    else:
        dw = x.t().mm(grad).t()
    return dw, grad.sum(0, keepdim=True).view(-1) if bias else None


def _plan(out_nodes, want, params):
    """The graph's nodes in a fixed (breadth-first) order and its (cached) plan.

    The walk writes the graph's shape as one flat signature: each node's type, then the
    positions of its successors (-1 where an input needs no gradient). A leaf's accumulator
    has no successors; its tensor says whether it is an input or a parameter.
    """
    nodes: List[Node] = []
    where: Dict[Node, int] = {}
    for n in out_nodes:
        if n is not None and n not in where:
            where[n] = len(nodes)
            nodes.append(n)
    sig: list = []
    put, get, add = sig.append, where.get, nodes.append
    # Leaves by tensor id (the tensors asked about are alive, so their ids are theirs).
    leaves: Dict[int, int] = {}
    i = 0
    for node in nodes:  # grows while it is walked
        kind = type(node)
        put(kind)
        if kind is _ACCUMULATE:
            leaves[id(node.variable)] = i
        else:
            for nxt, _ in node.next_functions:
                if nxt is None:
                    put(-1)
                    continue
                j = get(nxt)
                if j is None:
                    j = where[nxt] = len(nodes)
                    add(nxt)
                put(j)
        i += 1
    out_idx = tuple([None if n is None else where[n] for n in out_nodes])
    in_idx = tuple([leaves.get(id(t)) if t.grad_fn is None else get(t.grad_fn) for t in want])
    param_idx = tuple([leaves.get(id(p)) for p in params])
    key = (tuple(sig), out_idx, in_idx, param_idx)
    plan = _PLANS.get(key)
    if plan is None:
        edges = tuple(
            tuple([-1 if n is None else where[n] for n, _ in node.next_functions])
            for node in nodes
        )
        info = [
            (isinstance(n, BackwardCFunction), len(n._input_metadata), type(n)) for n in nodes
        ]
        plan = _Plan(edges, info, out_idx, in_idx, param_idx)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return nodes, plan


class DeferredWeights:
    """What a deferred backward leaves for its ``W``: captured gradients and graph edges."""

    __slots__ = ("_groups", "_kept", "_ready", "_whole")

    def __init__(self, groups, kept, ready, whole=None) -> None:
        # groups: [(node, params, captured gradients, linear)] where linear is (weight, bias
        # or None) for a plain linear branch; kept: (edges, grads, params); ready:
        # [(param, gradient)] computed during the input pass; whole: (edges, grads) of a
        # whole backward that accumulates into every leaf.
        self._groups = groups
        self._kept = kept
        self._ready = ready
        self._whole = whole

    def run(self) -> None:
        """Compute the parameters' gradients and accumulate them into ``.grad``."""
        groups, self._groups = self._groups, []
        kept, self._kept = self._kept, None
        ready, self._ready = self._ready, []
        whole, self._whole = self._whole, None
        if whole is not None:
            _accumulating_backward(*whole)
        for p, g in ready:
            _accumulate(p, g)
        rest = []
        direct = []
        for group in groups:
            _, _, grads, linear = group
            if linear is not None and grads[0] is not None and _direct(linear):
                direct.append(group)
            else:
                rest.append(group)
        if direct:
            enabled = torch.is_grad_enabled()
            _set_grad_enabled(False)
            try:
                for group in direct:
                    node, _, grads, (weight, bias) = group
                    try:
                        got = _linear_weight_grad(node, grads[0], bias is not None)
                    except AttributeError:  # a torch whose nodes name their fields otherwise
                        got = None
                    if got is None:
                        rest.append(group)
                        continue
                    _accumulate(weight, got[0])
                    if bias is not None:
                        _accumulate(bias, got[1])
            finally:
                _set_grad_enabled(enabled)
        for node, params, grads, _ in rest:
            edges = [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
            if edges:
                _grad_into(edges, [g for g in grads if g is not None], params)
        if kept is not None:
            edges, grads, params = kept
            if edges and params:
                _grad_into(edges, grads, params)


def _direct(linear) -> bool:
    """Whether the linear branch's weight gradient may be computed directly: a dense weight,
    and no gradient hook on its parameters (the engine would run it; the direct computation
    does not)."""
    weight, bias = linear
    return (
        weight.layout is torch.strided
        and not weight._backward_hooks
        and (bias is None or not bias._backward_hooks)
    )


def _accumulate(p: torch.Tensor, g: Optional[torch.Tensor]) -> None:
    """Add ``g`` into ``p.grad`` and run ``p``'s post-accumulate-grad hooks, as the engine's
    accumulation does."""
    if g is None:
        return
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g
    hooks = p._post_accumulate_grad_hooks
    if hooks:
        for hook in tuple(hooks.values()):
            hook(p)


def _grad(outputs, grads, inputs, retain: bool):
    """``torch.autograd.grad`` without its Python-side checks (the caller's shapes hold):
    the gradients of ``inputs`` (tensors or gradient edges), ``None`` where unreached."""
    return Variable._execution_engine.run_backward(
        tuple(outputs), tuple(grads), retain, False, tuple(inputs), True, False
    )


def _accumulating_backward(edges, grads) -> None:
    """``torch.autograd.backward``: every leaf's gradient into its ``.grad``."""
    Variable._execution_engine.run_backward(
        tuple(edges), tuple(grads), False, False, (), True, True
    )


def _whole_backward(outputs, grads, inputs, want):
    """The backward of a graph with a reentrant checkpoint, which runs its own backward inside
    and so refuses an engine run towards chosen inputs: nothing is split. Where the inputs
    need a gradient, one whole backward runs now, its parameter gradients accumulating into
    ``.grad`` as in a full backward (the inputs' own ``.grad`` is left as it was); else it is
    kept for the weight pass."""
    edges, roots = [], []
    for o, g in zip(outputs, grads):
        if not o.requires_grad:
            continue
        edges.append(get_gradient_edge(o))
        roots.append(torch.ones_like(o) if g is None else g)
    if not want:
        return _by_input(inputs, want, []), DeferredWeights([], None, [], (edges, roots))
    before = [t.grad for t in want]
    for t in want:
        t.grad = None
    try:
        if edges:
            _accumulating_backward(edges, roots)
        got = [t.grad for t in want]
    finally:
        for t, g in zip(want, before):
            t.grad = g
    return _by_input(inputs, want, got), DeferredWeights([], None, [])


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

    ``grads`` may hold ``None`` for a scalar loss output (a gradient of one). Two kinds of
    parameters get their gradient computed in this pass (and accumulated at the weight pass):
    those whose gradient reaches the stage through several branch points of the input path (a
    weight used twice on the way to the input), where deferring would count a path twice, and
    those reached through a custom ``autograd.Function``, whose backward runs whole here.
    """
    params = [p for p in params if p.requires_grad]
    want = [t for t in inputs if t.requires_grad]
    if _OPAQUE:
        known = tuple(map(id, params))
        got = _OPAQUE.get(known)
        if got is not None:
            return _plain_input_pass(outputs, grads, inputs, want, params, known, got)
    out_nodes = [o.grad_fn or _node(o) for o in outputs]
    nodes, plan = _plan(out_nodes, want, params)
    if plan.whole:
        return _whole_backward(outputs, grads, inputs, want)

    # Edges, not tensors: a sent output may have had its storage released already.
    run_edges, run_grads, keep_edges, keep_grads = [], [], [], []
    for o, g, n, run in zip(outputs, grads, out_nodes, plan.run_outputs):
        if n is None:
            continue
        if g is None:
            g = torch.ones_like(o)
        if run:
            # Used at once, while ``o`` keeps its node alive.
            run_edges.append(GradientEdge(n, o.output_nr))
            run_grads.append(g)
        else:
            # Kept for the W: ``get_gradient_edge`` also keeps a custom function's node alive
            # (its Python object does not) once the stage drops ``o``.
            keep_edges.append(get_gradient_edge(o))
            keep_grads.append(g)

    now = [params[k] for k in plan.at_input]
    targets = want + now if now else list(want)
    for n, slot in plan.captures:
        targets.append(GradientEdge(nodes[n], slot))
    if targets and run_edges:
        # The graph is kept where the weight pass will run parts of it.
        result = _grad(run_edges, run_grads, targets, not plan.opaque)
    else:
        result = [None] * len(targets)
    nw, na = len(want), len(now)
    caps = result[nw + na :]
    groups = []
    for n, idx, first, count, linear in plan.groups:
        if linear is not None:
            linear = (params[linear[0]], None if linear[1] is None else params[linear[1]])
        groups.append((nodes[n], [params[k] for k in idx], caps[first : first + count], linear))
    ready = [(p, g) for p, g in zip(now, result[nw : nw + na]) if g is not None]
    input_grads = _by_input(inputs, want, result[:nw])
    kept_params = [params[k] for k in plan.kept_params]
    later = DeferredWeights(groups, (keep_edges, keep_grads, kept_params), ready)
    if plan.opaque:
        if len(_OPAQUE) >= _PLANS_MAX:
            _OPAQUE.clear()
        _OPAQUE[tuple(map(id, params))] = _got(params, ready)
    return input_grads, later


def _got(params, ready) -> frozenset:
    """The positions in ``params`` of the parameters that have a gradient in ``ready``."""
    where = {id(p): k for k, p in enumerate(params)}
    return frozenset(where[id(p)] for p, _ in ready)


def _by_input(inputs, want, grads) -> List[Optional[torch.Tensor]]:
    """The gradients of ``want`` (the inputs that require one) placed by input."""
    if len(want) == len(inputs):
        return list(grads)
    by_id = {id(t): d for t, d in zip(want, grads)}
    return [by_id.get(id(t)) if t.requires_grad else None for t in inputs]


def _plain_input_pass(outputs, grads, inputs, want, params, known, got):
    """The input pass of a stage with nothing to split: one plain backward towards the inputs
    and the parameters, without keeping the graph. Parameter gradients other than those the
    analysis saw (the stage is not what it was) are still right; the next call then analyses
    the graph again."""
    edges, roots = [], []
    for o, g in zip(outputs, grads):
        if o.grad_fn is not None:
            edges.append(GradientEdge(o.grad_fn, o.output_nr))
        elif o.requires_grad:
            edges.append(get_gradient_edge(o))
        else:
            continue
        roots.append(torch.ones_like(o) if g is None else g)
    targets = want + params
    if edges and targets:
        result = _grad(edges, roots, targets, False)
    else:
        result = [None] * len(targets)
    nw = len(want)
    ready = [(p, g) for p, g in zip(params, result[nw:]) if g is not None]
    if _got(params, ready) != got:
        _OPAQUE.pop(known, None)
    return _by_input(inputs, want, result[:nw]), DeferredWeights([], None, ready)
