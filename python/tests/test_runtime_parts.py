"""Parts of the torch runtime that need no process group: releasing sent activations and the
backward of a scalar loss."""

from __future__ import annotations

import torch
import torch.nn as nn

from dualpipe_rs.torch import _pipeline


def _sent(tensors):
    """A commit batch entry that sent ``tensors`` (the fields _free reads)."""
    return (_pipeline._SEND, 0, True, 0, 0, 1, tensors, tensors)


def test_free_releases_sent_outputs_but_keeps_what_the_backward_needs():
    x = torch.randn(4, 3, requires_grad=True)
    lin = nn.Linear(3, 3)
    for _ in range(2):  # the second time from the per-type cache
        plain = lin(x)
        kept = torch.sigmoid(lin(x))  # its backward reads its own output
        view = lin(x)[1:]
        _pipeline.Pipeline._free(None, None, [_sent([plain, kept, view])])
        assert plain.numel() == 0 and plain.grad_fn is not None
        assert kept.shape == (4, 3)
        assert view.shape == (3, 3)
        kept.sum().backward()  # still possible


class _Sub(torch.Tensor):
    pass


def test_loss_backward_equals_tensor_backward():
    torch.manual_seed(0)
    lin = nn.Linear(5, 2).double()
    twin = nn.Linear(5, 2).double()
    twin.load_state_dict(lin.state_dict())
    x = torch.randn(7, 5, dtype=torch.float64)
    lin(x).pow(2).mean().backward()
    _pipeline._loss_backward(twin(x).pow(2).mean())
    for a, b in zip(lin.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    # Anything but a plain tensor goes through Tensor.backward.
    w = torch.randn(3, requires_grad=True)
    loss = (w * 2).sum().as_subclass(_Sub)
    _pipeline._loss_backward(loss)
    assert torch.equal(w.grad, torch.full((3,), 2.0))
