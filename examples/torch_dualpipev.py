"""Train a small model under DualPipeV with torch.distributed, checked against one process.

Run it with as many processes as pipeline ranks::

    torchrun --nproc-per-node 4 examples/torch_dualpipev.py

On CPU it uses gloo; where CUDA is available with one GPU per process, NCCL. Each rank holds two
stages (rank r: stages r and 2N-1-r). The script checks what the reference implementation's own
example checks: the losses bit for bit against the whole model run in one process, the
gradients within cal_diff < 1e-13 (float64 on CPU; float32 on GPU, with a looser bound), and
the same for an inference step under ``torch.no_grad()``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import dualpipe_rs
from dualpipe_rs.torch import Pipeline, WeightGradStore, run_backward


class LinearWithDeferredWeight(torch.autograd.Function):
    """``x @ w.T`` whose weight gradient waits in the WeightGradStore while it is enabled."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)

        def weight_gradient():
            weight.grad += grad_out.flatten(0, -2).T @ x.flatten(0, -2)

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_gradient)
        else:
            weight_gradient()
        return grad_out @ weight, None


class Linear(nn.Linear):
    def forward(self, x):
        return LinearWithDeferredWeight.apply(x, self.weight)


class Stage(nn.Module):
    """Linear - GELU - Linear, with the hook that overlaps one forward with one backward."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = Linear(hidden, 4 * hidden, bias=False)
        self.down = Linear(4 * hidden, hidden, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))

    @classmethod
    def overlapped_forward_backward(
        cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1
    ):
        # A real model would interleave the two halves (e.g. hide an all-to-all of one
        # micro-batch behind the other's compute); this one runs them one after the other.
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(output, target):
    return F.mse_loss(output, target).clone()


def cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


def main() -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    )
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        torch.set_default_device("cuda")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.set_num_threads(1)
    dtype = torch.float32 if cuda else torch.float64
    bound = 1e-5 if cuda else 1e-13
    torch.manual_seed(233)

    chunks, micro_batch, seq, hidden = 2 * ranks + 2, 2, 16, 64
    schedule = dualpipe_rs.plan("dualpipev", ranks, chunks)
    full = nn.Sequential(*[Stage(hidden) for _ in range(schedule.num_stages)]).to(dtype)
    x = torch.randn(chunks * micro_batch, seq, hidden, dtype=dtype)
    y = torch.randn(chunks * micro_batch, seq, hidden, dtype=dtype)

    # The whole model in this process: each micro-batch forward, then backward.
    ref_losses, ref_outputs = [], []
    for mx, my in zip(x.chunk(chunks), y.chunk(chunks)):
        out = full(mx)
        loss = criterion(out, my)
        loss.backward()
        ref_losses.append(loss.detach())
        ref_outputs.append(out.detach())
    ref_loss, ref_output = torch.stack(ref_losses), torch.cat(ref_outputs)

    # This rank's stages, in schedule.stages_on(rank) order: [r, 2N-1-r].
    stages = schedule.stages_on(rank)
    modules = nn.ModuleList(Stage(hidden).to(dtype) for _ in stages)
    for module, stage in zip(modules, stages):
        module.load_state_dict(full[stage].state_dict())
    pipe = Pipeline(schedule, modules)

    # Rank 0 runs stage 0 and the last stage: it alone takes the inputs and the labels.
    inputs, labels = (x, y) if rank == 0 else (None, None)
    loss, _ = pipe.step(inputs, num_chunks=chunks, criterion=criterion, labels=(labels,))
    if rank == 0:
        assert torch.equal(loss, ref_loss), "losses differ from the single-process run"
    else:
        assert loss is None
    for module, stage in zip(modules, stages):
        for p, q in zip(module.parameters(), full[stage].parameters()):
            assert cal_diff(p.grad, q.grad) < bound, f"stage {stage}: gradients differ"

    with torch.no_grad():
        loss, outputs = pipe.step(
            inputs, num_chunks=chunks, criterion=criterion, labels=(labels,), return_outputs=True
        )
    if rank == 0:
        assert torch.equal(loss, ref_loss) and torch.equal(outputs, ref_output)
        print(
            f"dualpipev on {ranks} ranks ({'nccl' if cuda else 'gloo'}), {chunks} micro-batches: "
            f"losses equal bit for bit, gradients within cal_diff < {bound:g}, inference equal; "
            f"mean loss {ref_loss.mean().item():.6f}",
            flush=True,
        )
    # Every rank is past its last message before any rank closes its connections.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
