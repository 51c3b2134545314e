"""Split backward: input gradients now and weight gradients later equal one full backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualpipe_rs.torch import WeightGradStore, backward_input

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
    for _ in range(2):  # the second step reuses the analysis and accumulates
        dx_full, g_full = _full(module, x, g)
        dx, before, g_split = _split(twin, x, g)
        assert torch.equal(dx, dx_full)
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
    """A module that puts its weight gradients into the store: they run once, at the W."""
    torch.manual_seed(3)
    module = HookStage().double()
    twin = copy.deepcopy(module)
    x = torch.randn(4, 8, dtype=torch.float64)
    g = torch.randn(4, 8, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    torch.autograd.backward([module(xa)], [g])
    xb = x.clone().requires_grad_(True)
    out = twin(xb)
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        (dx,), later = backward_input([out], [g], [xb], list(twin.parameters()))
    finally:
        WeightGradStore.enabled = False
    group = WeightGradStore.take()
    assert len(group) == 2
    assert torch.equal(dx, xa.grad)
    for p in twin.parameters():
        assert p.grad is None or not p.grad.any()
    for fn in group:
        fn()
    later.run(skip_custom=True)
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
