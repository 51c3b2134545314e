"""Split backward: input gradients now and weight gradients later equal one full backward."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualpipe_rs.torch import WeightGradStore, backward_input
from dualpipe_rs.torch import _split as _split_module

from _cases import Block, HookStage


class Shared(nn.Module):
    """One weight used twice, and an output that does not depend on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6, dtype=torch.float64))
        self.bias_only = nn.Parameter(torch.randn(6, dtype=torch.float64))

    def forward(self, x):
        h = torch.tanh(x @ self.w)
        return h @ self.w + x, self.bias_only * 2.0


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6).double()
        self.norm = nn.LayerNorm(6).double()

    def forward(self, x):
        return self.norm(self.lin(x)).relu()


def _outputs(module, x):
    out = module(x)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _full(module, x, grads):
    x = x.clone().requires_grad_(True)
    outs = _outputs(module, x)
    torch.autograd.backward(outs, grads)
    return x.grad, [p.grad.clone() for p in module.parameters()]


def _split(module, x, grads):
    x = x.clone().requires_grad_(True)
    outs = _outputs(module, x)
    (dx,), later = backward_input(outs, grads, [x], list(module.parameters()))
    before = [p.grad for p in module.parameters()]
    later.run()
    return dx, before, [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("make", [lambda: Block().double(), Shared, Norm])
def test_split_equals_full_backward(make):
    torch.manual_seed(0)
    module = make()
    twin = copy.deepcopy(module)
    x = torch.randn(5, 8 if isinstance(module, Block) else 6, dtype=torch.float64)
    outs = _outputs(module, x)
    grads = [torch.randn_like(o) for o in outs]
    dx_full, g_full = _full(module, x, grads)
    dx, before, g_split = _split(twin, x, grads)
    assert torch.equal(dx, dx_full)
    # The weight gradient is really deferred: nothing before the W, everything after.
    assert all(g is None for g in before)
    for a, b in zip(g_split, g_full):
        assert torch.equal(a, b)


class Linears(nn.Module):
    """Linear layers in the shapes whose weight gradient the split computes directly (with and
    without bias, a transposed weight, 3-d input) and one weight also used on a side path."""

    def __init__(self, bias: bool, transposed: bool, side: bool) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10, bias=bias).double()
        self.b = nn.Linear(10, 6, bias=bias).double()
        if transposed:
            self.b.weight = nn.Parameter(torch.randn(10, 6, dtype=torch.float64).t())
        self.side = side

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        if self.side:
            h = h + self.a.weight.sum()
        return h


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("side", [False, True])
@pytest.mark.parametrize("rows", [(5,), (3, 4)])
def test_split_of_linear_layers_equals_full_backward(bias, transposed, side, rows):
    torch.manual_seed(4)
    module = Linears(bias, transposed, side)
    twin = copy.deepcopy(module)
    x = torch.randn(*rows, 6, dtype=torch.float64)
    g = [torch.randn(*rows, 6, dtype=torch.float64)]
    for step in range(2):  # the second step reuses the analysis and accumulates
        dx_full, g_full = _full(module, x, g)
        dx, before, g_split = _split(twin, x, g)
        assert torch.equal(dx, dx_full)
        if step == 0 and not side:
            assert all(b is None for b in before)
        for a, b in zip(g_split, g_full):
            assert torch.equal(a, b)


def test_split_without_input_gradient_defers_everything():
    torch.manual_seed(1)
    module = Block().double()
    twin = copy.deepcopy(module)
    x = torch.randn(4, 8, dtype=torch.float64)  # a first stage: the input needs no gradient
    g = torch.randn(4, 8, dtype=torch.float64)
    torch.autograd.backward([module(x)], [g])
    out = twin(x)
    (dx,), later = backward_input([out], [g], [x], list(twin.parameters()))
    assert dx is None
    assert all(p.grad is None for p in twin.parameters())
    later.run()
    for a, b in zip(twin.parameters(), module.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_split_of_a_scalar_loss():
    torch.manual_seed(2)
    module = Block().double()
    twin = copy.deepcopy(module)
    x = torch.randn(4, 8, dtype=torch.float64)
    y = torch.randn(4, 8, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    F.mse_loss(module(xa), y).backward()
    xb = x.clone().requires_grad_(True)
    loss = F.mse_loss(twin(xb), y)
    (dx,), later = backward_input([loss], [None], [xb], list(twin.parameters()))
    assert torch.equal(dx, xa.grad)
    later.run()
    for a, b in zip(twin.parameters(), module.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_store_protocol_with_split():
    """A module that puts its weight gradients into the store: they run once, at the W. Its
    first linear's bias gradient, returned through autograd by the same function, comes from
    the input pass and is also accumulated at the W."""
    torch.manual_seed(3)
    module = HookStage().double()
    assert module.linear1.bias is not None
    twin = copy.deepcopy(module)
    x = torch.randn(4, 8, dtype=torch.float64)
    g = torch.randn(4, 8, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    torch.autograd.backward([module(xa)], [g])
    dx, group, before = _split_through_store(twin, x, g)
    assert len(group) == 2
    assert torch.equal(dx, xa.grad)
    # Nothing of the weight gradients before the W.
    assert all(b is None or not b.any() for b in before)
    assert before[1] is None  # linear1's bias
    for a, b in zip(twin.parameters(), module.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_weight_grad_store_queue():
    WeightGradStore.clear()
    seen = []
    WeightGradStore.put(lambda: seen.append(1))
    WeightGradStore.flush()
    WeightGradStore.flush()
    WeightGradStore.pop()
    assert seen == [1]
    WeightGradStore.pop()
    assert seen == [1]
    with pytest.raises(RuntimeError, match="empty"):
        WeightGradStore.pop()


def _engine_runs_at_w(monkeypatch):
    """Count the engine runs of the weight passes."""
    calls = []
    original = _split_module._grad_into

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(_split_module, "_grad_into", counted)
    return calls


def test_linear_weight_gradient_needs_no_engine_run(monkeypatch):
    torch.manual_seed(5)
    module = Linears(True, False, False)
    twin = copy.deepcopy(module)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    g = [torch.randn(3, 4, 6, dtype=torch.float64)]
    calls = _engine_runs_at_w(monkeypatch)
    dx_full, g_full = _full(module, x, g)
    dx, before, g_split = _split(twin, x, g)
    assert calls == []
    assert all(b is None for b in before)
    assert torch.equal(dx, dx_full)
    for a, b in zip(g_split, g_full):
        assert torch.equal(a, b)


def test_linear_weight_with_a_hook_goes_through_the_engine(monkeypatch):
    """A gradient hook on a weight runs at the W, as in a full backward."""
    torch.manual_seed(6)
    module = Linears(False, False, False)
    twin = copy.deepcopy(module)
    for m in (module, twin):
        m.b.weight.register_hook(lambda grad: grad * 3.0)
    x = torch.randn(5, 6, dtype=torch.float64)
    g = [torch.randn(5, 6, dtype=torch.float64)]
    calls = _engine_runs_at_w(monkeypatch)
    dx_full, g_full = _full(module, x, g)
    dx, _, g_split = _split(twin, x, g)
    assert len(calls) == 1
    for a, b in zip(g_split, g_full):
        assert torch.equal(a, b)


class _Returning(torch.autograd.Function):
    """A custom linear that returns its weight gradient (no store)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.flatten(0, -2).T @ x.flatten(0, -2)


class CustomLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(8, 16, dtype=torch.float64))

    def forward(self, x):
        return _Returning.apply(torch.tanh(_Returning.apply(x, self.w1)), self.w2)


def test_custom_function_branches_outlive_the_outputs():
    """The stage drops its outputs before the W (a pipeline sends and frees them): the
    custom functions' nodes, which their Python objects do not keep alive, still run."""
    torch.manual_seed(7)
    module = CustomLinears()
    twin = copy.deepcopy(module)
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    g = torch.randn(4, 3, 8, dtype=torch.float64)
    dx_full, g_full = _full(module, x, [g])
    xb = x.clone().requires_grad_(True)
    out = twin(xb)
    (dx,), later = backward_input([out], [g], [xb], list(twin.parameters()))
    del out
    gc.collect()
    assert all(p.grad is None for p in twin.parameters())
    later.run()
    assert torch.equal(dx, dx_full)
    for a, b in zip(twin.parameters(), g_full):
        assert torch.equal(a.grad, b)


class Switch(nn.Module):
    """The reference example's stage whose second linear can turn into a plain one."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = HookStage().double()
        self.plain = False

    def forward(self, x):
        h = self.inner.linear1(x)
        h = torch.nn.functional.gelu(h)
        if self.plain:
            return F.linear(h, self.inner.linear2.weight)
        return self.inner.linear2(h)


def _split_through_store(module, x, g):
    xb = x.clone().requires_grad_(True)
    out = module(xb)
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        (dx,), later = backward_input([out], [g], [xb], list(module.parameters()))
    finally:
        WeightGradStore.enabled = False
    group = WeightGradStore.take()
    before = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    for fn in group:
        fn()
    later.run()
    return dx, group, before


def _switch_twins(seed: int):
    """A :class:`Switch` stage and its copy, an input and an output gradient, and the key of
    the copy's hint (cleared)."""
    torch.manual_seed(seed)
    module = Switch()
    twin = copy.deepcopy(module)
    x = torch.randn(4, 8, dtype=torch.float64)
    g = torch.randn(4, 8, dtype=torch.float64)
    key = tuple(id(p) for p in twin.parameters())
    _split_module._OPAQUE.pop(key, None)
    return module, twin, x, g, key


def test_store_only_stage_runs_a_plain_backward(monkeypatch):
    """Once an analysis found nothing to split (every weight gradient through the store), the
    next input pass is one plain backward: no graph walk, the same bits, the W still
    deferred."""
    module, twin, x, g, key = _switch_twins(8)
    walks = []
    original = _split_module._plan
    monkeypatch.setattr(_split_module, "_plan", lambda *a: walks.append(1) or original(*a))
    for step in range(3):
        dx_full, g_full = _full(module, x, [g])
        dx, group, before = _split_through_store(twin, x, g)
        assert _split_module._OPAQUE.get(key) is not None
        assert len(walks) == 1  # the first call only
        assert len(group) == 2
        if step == 0:
            assert all(b is None or not b.any() for b in before)
        assert torch.equal(dx, dx_full)
        for a, b in zip(twin.parameters(), g_full):
            assert torch.equal(a.grad, b)


def test_store_only_hint_that_no_longer_holds():
    """A stage hinted as store-only whose graph changed: its gradients are still right, and
    the next call analyses the graph again."""
    module, twin, x, g, key = _switch_twins(9)
    for plain in (False, True, True):
        module.plain = twin.plain = plain
        dx_full, g_full = _full(module, x, [g])
        dx, group, _ = _split_through_store(twin, x, g)
        assert torch.equal(dx, dx_full)
        for a, b in zip(twin.parameters(), g_full):
            assert torch.equal(a.grad, b)
        assert (_split_module._OPAQUE.get(key) is not None) == (not plain)


class _WritesItsGrad(torch.autograd.Function):
    """A custom linear that writes its weight gradient into ``.grad`` itself (no store) and
    returns the bias gradient; counts its backward calls."""

    calls = 0

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        _WritesItsGrad.calls += 1
        x, weight = ctx.saved_tensors
        dw = grad.flatten(0, -2).T @ x.flatten(0, -2)
        if weight.grad is None:
            weight.grad = dw
        else:
            weight.grad += dw
        return grad @ weight, None, grad.flatten(0, -2).sum(0)


class WritingLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16).double()
        self.b = nn.Linear(16, 8).double()

    def forward(self, x):
        h = torch.tanh(_WritesItsGrad.apply(x, self.a.weight, self.a.bias))
        return _WritesItsGrad.apply(h, self.b.weight, self.b.bias)


def test_custom_function_that_writes_its_own_gradient_runs_once():
    """A function that writes ``weight.grad`` itself, store or not, is run once per backward:
    its weight gradient is not counted twice, and the bias it returns is not lost."""
    torch.manual_seed(10)
    module = WritingLinears()
    twin = copy.deepcopy(module)
    x = torch.randn(4, 8, dtype=torch.float64)
    g = torch.randn(4, 8, dtype=torch.float64)
    _WritesItsGrad.calls = 0
    dx_full, g_full = _full(module, x, [g])
    assert _WritesItsGrad.calls == 2
    for through_store in (False, True):
        for p in twin.parameters():
            p.grad = None
        _WritesItsGrad.calls = 0
        if through_store:
            dx, group, _ = _split_through_store(twin, x, g)
            assert group == []
        else:
            dx, _, _ = _split(twin, x, [g])
        assert _WritesItsGrad.calls == 2
        assert torch.equal(dx, dx_full)
        for a, b in zip(twin.parameters(), g_full):
            assert torch.equal(a.grad, b)


@pytest.mark.parametrize(
    "make, width", [(lambda: Linears(True, False, False), 6), (Norm, 6), (CustomLinears, 8)]
)
def test_post_accumulate_grad_hooks_run_at_the_w(make, width):
    """Each parameter's post-accumulate-grad hooks run once per W, after its gradient is in
    ``.grad``, as in a full backward."""
    torch.manual_seed(12)
    module = make()
    twin = copy.deepcopy(module)
    x = torch.randn(5, width, dtype=torch.float64)
    out_shape = _outputs(module, x)[0].shape
    g = [torch.randn(out_shape, dtype=torch.float64)]
    seen = {"full": [], "split": []}
    for key, m in (("full", module), ("split", twin)):
        for name, p in m.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name, key=key: seen[key].append((name, p.grad.clone()))
            )
    _full(module, x, g)
    xb = x.clone().requires_grad_(True)
    (dx,), later = backward_input(_outputs(twin, xb), g, [xb], list(twin.parameters()))
    assert seen["split"] == []
    later.run()
    full = dict(seen["full"])
    assert sorted(full) == sorted(name for name, _ in seen["split"])
    for name, grad in seen["split"]:
        assert torch.equal(grad, full[name])


class Checkpointed(nn.Module):
    """Two linear layers under an activation checkpoint, then a norm and a residual."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.a = nn.Linear(8, 16).double()
        self.b = nn.Linear(16, 8).double()
        self.norm = nn.LayerNorm(8).double()

    def inner(self, x):
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)
        return self.norm(h) + x


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
def test_split_of_a_checkpointed_stage(reentrant, input_grad):
    """Gradients equal a full backward's, bit for bit. A non-reentrant checkpoint splits (no
    weight gradient before the W); a reentrant one runs whole: at the B where the input needs
    a gradient (the input's own .grad untouched), else at the W."""
    torch.manual_seed(13)
    module = Checkpointed(reentrant)
    twin = copy.deepcopy(module)
    x = torch.randn(4, 8, dtype=torch.float64)
    g = torch.randn(4, 8, dtype=torch.float64)
    xa = x.clone().requires_grad_(input_grad)
    module(xa).backward(g)
    xb = x.clone().requires_grad_(input_grad)
    out = twin(xb)
    (dx,), later = backward_input([out], [g], [xb], list(twin.parameters()))
    del out
    assert xb.grad is None
    ran_at_b = reentrant and input_grad
    assert all((p.grad is not None) == ran_at_b for p in twin.parameters())
    assert any(p.grad is not None for p in module.parameters())
    later.run()
    assert (dx is None) == (not input_grad)
    if input_grad:
        assert torch.equal(dx, xa.grad)
    for a, b in zip(twin.parameters(), module.parameters()):
        # A reentrant checkpoint whose input needs no gradient gives its own parameters none
        # (torch warns), in a full backward as here.
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)


def test_split_of_a_compiled_stage():
    """A ``torch.compile``d stage: its backward is one compiled function, run once in the
    input pass; the gradients equal a full backward's and reach ``.grad`` at the W."""
    torch.manual_seed(14)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).double()
    twin = copy.deepcopy(module)
    compiled = torch.compile(twin, backend="aot_eager")
    x = torch.randn(4, 8, dtype=torch.float64)
    g = torch.randn(4, 8, dtype=torch.float64)
    dx_full, g_full = _full(module, x, [g])
    for _ in range(2):
        for p in twin.parameters():
            p.grad = None
        xb = x.clone().requires_grad_(True)
        (dx,), later = backward_input([compiled(xb)], [g], [xb], list(twin.parameters()))
        assert all(p.grad is None for p in twin.parameters())
        later.run()
        assert torch.equal(dx, dx_full)
        for a, b in zip(twin.parameters(), g_full):
            assert torch.equal(a.grad, b)
