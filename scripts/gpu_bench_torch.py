"""The torch side of scripts/gpu_bench.sh: torch's own ScheduleDualPipeV at world size 1 (both
stages on one GPU) on the reference model, at the sizes `dualpipe bench-gpu` measured, then
one table with both. Usage: gpu_bench_torch.py OURS.tsv [--steps N] [--warmup N]"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV


def make_stage(hidden, device, dtype):
    # Linear(h, 4h) -> GELU (tanh) -> Linear(4h, h), as the reference model.
    return nn.Sequential(
        nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden)
    ).to(device=device, dtype=dtype)


def dualpipev_step_ms(hidden, rows, dtype, microbatches, steps, warmup):
    device = torch.device("cuda", 0)
    example = torch.empty(rows, hidden, device=device, dtype=dtype)
    modules = [make_stage(hidden, device, dtype) for _ in range(2)]
    # At world size 1 the stages' shapes are given up front: shape inference would message
    # the same rank.
    stages = [
        PipelineStage(m, i, 2, device, input_args=(example,), output_args=(example,))
        for i, m in enumerate(modules)
    ]
    schedule = ScheduleDualPipeV(stages, n_microbatches=microbatches, loss_fn=nn.functional.mse_loss)
    x = torch.rand(microbatches * rows, hidden, device=device, dtype=dtype) * 2 - 1
    target = 0.5 * torch.sin(2 * x) + 0.25
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        schedule.step(x, target=target)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        for m in modules:
            m.zero_grad(set_to_none=False)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ours")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--large-rows", type=int, default=1024)
    args = parser.parse_args()
    ours = {}
    header = ""
    with open(args.ours) as f:
        for line in f:
            if line.startswith("#"):
                header = line[1:].strip()
                continue
            name, value, unit = line.rstrip("\n").split("\t")
            ours[name] = (float(value), unit)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch_small = dualpipev_step_ms(512, 768, torch.float32, 20, args.steps, args.warmup)
        torch_large = dualpipev_step_ms(4096, args.large_rows, torch.bfloat16, 20, args.steps, args.warmup)
    finally:
        dist.destroy_process_group()

    def row(what, value, unit, against=None, against_what="", target=""):
        ratio = f"{value / against:.2f}x {against_what}" if against else ""
        print(f"| {what} | {value:.3f} {unit} | {'' if against is None else f'{against:.3f} {unit}'} | {ratio} | {target} |")

    print(f"device: {header}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print("| measurement | dualpipe | compared with | ratio | target |")
    print("|---|---|---|---|---|")
    d = ours["dispatch_per_instruction"]
    row("host dispatch per instruction (dualpipev 1 rank, 20 mb)", d[0], d[1], target="<= 5 us")
    s = ours["dualpipev_1rank_small_f32"]
    row("dualpipev 1 rank, 20 mb, h 512, rows 768, f32", s[0], s[1], torch_small, "torch ScheduleDualPipeV", "<= 0.5x")
    l = ours["dualpipev_1rank_large_bf16"]
    row(f"dualpipev 1 rank, 20 mb, h 4096, rows {args.large_rows}, bf16", l[0], l[1], torch_large, "torch ScheduleDualPipeV", "<= 1.0x")
    v = ours["dualpipev_4ranks_small_f32"]
    q = ours["sequential_8stages_small_f32"]
    row("dualpipev 4 virtual ranks (8 stages), 20 mb, h 512, f32", v[0], v[1], q[0], "plain sequence (ours)")
    n = ours["dualpipev_4ranks_small_f32_comm_noop"]
    row("same step, communication as no-ops", v[0], v[1], n[0], "no-op communication", "<= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
