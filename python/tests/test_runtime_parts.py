"""Parts of the torch runtime that need no process group: releasing sent activations and the
backward of a scalar loss."""

from __future__ import annotations

import torch
import torch.nn as nn

from dualpipe_rs.torch import _comm, _pipeline


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


def test_fused_message_groups_agree_on_both_ends():
    """Every fused group of sends has the same messages as a fused group of receives at its
    peer, in stream order, and each group lies in one batch on both ends."""
    import dualpipe_rs

    cases = [("dualpipev", 2, 8), ("dualpipev", 4, 8), ("dualpipe", 4, 8), ("zbv", 2, 6),
             ("1f1b", 4, 8), ("interleaved-1f1b", 2, 4)]
    fused_somewhere = False
    for family, ranks, mbs in cases:
        try:
            s = dualpipe_rs.plan(family, ranks, mbs)
        except ValueError:
            continue
        groups = {r: _pipeline._fused_groups(s, r) for r in range(ranks)}
        streams = {r: _comm.message_streams(s, r) for r in range(ranks)}
        for r in range(ranks):
            sends, recvs, _ = streams[r]
            for peer, mine in sends.items():
                theirs = streams[peer][1][r]
                assert len(mine) == len(theirs)
                for (sb, si), (rb, ri) in zip(mine, theirs):
                    g_send = groups[r].get(si)
                    g_recv = groups[peer].get(ri)
                    assert (g_send is None) == (g_recv is None), (family, r, peer, si, ri)
                    if g_send is None:
                        continue
                    fused_somewhere = True
                    pos_s = [i for _, i in mine].index(si) - g_send.index(si)
                    pos_r = [i for _, i in theirs].index(ri) - g_recv.index(ri)
                    assert pos_s == pos_r and len(g_send) == len(g_recv)
                    assert len({b for b, i in mine if i in g_send}) == 1
                    assert len({b for b, i in theirs if i in g_recv}) == 1
    assert fused_somewhere


def test_fused_message_round_trip_keeps_bits_and_dtypes():
    """A fused receive splits back into tensors of their own storage, bit for bit."""
    parts = [torch.randn(2, 3), torch.arange(5), torch.tensor([True, False]),
             torch.randn(3, dtype=torch.complex64), torch.randn(4, dtype=torch.bfloat16)]
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in parts])
    members = [
        [(tuple(parts[0].shape), parts[0].dtype, True), (tuple(parts[1].shape), parts[1].dtype, False)],
        [(tuple(t.shape), t.dtype, False) for t in parts[2:]],
    ]
    whole = _pipeline._Fused(flat.clone(), members)
    second = _pipeline._Part(whole, 1).take()
    first = _pipeline._Part(whole, 0).take()
    assert whole.buf is None  # released once every member took its share
    got = first + second
    for a, b in zip(got, parts):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    assert first[0].requires_grad and first[0].is_leaf and not first[1].requires_grad
