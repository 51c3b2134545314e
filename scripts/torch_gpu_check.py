"""The torch runtime on one GPU (NCCL, world size 1): correctness, profiling, and step time
against torch's ScheduleDualPipeV on the same model. Run by scripts/gpu_check.sh.

    python3 scripts/torch_gpu_check.py [--steps 10]

Exits 0 when every check passes, 1 on a failure, 2 without a GPU. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("skipped: no GPU")
        return 2
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

    import dualpipe_rs
    from dualpipe_rs.torch import Pipeline

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    rows, failures = [], 0

    def stage(hidden, dtype):
        return nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden)
        ).to(device=device, dtype=dtype)

    def cal_diff(x, y):
        x, y = x.double(), y.double()
        return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()

    # 1. Correctness in float64: every one-rank family against the same model in one pass.
    cases = (("dualpipev", 4, None, False), ("dualpipev", 8, None, True), ("zbv", 4, None, False),
             ("interleaved-1f1b", 4, 3, False), ("1f1b", 4, None, False))
    for family, c, v, fb_streams in cases:
        name = f"{family} 1 rank, {c} micro-batches, float64{', FB on two streams' if fb_streams else ''}"
        try:
            schedule = dualpipe_rs.plan(family, 1, c, chunks_per_rank=v)
            torch.manual_seed(0)
            full = nn.Sequential(*[stage(64, torch.float64) for _ in range(schedule.num_stages)])
            x = torch.randn(4 * c, 64, device=device, dtype=torch.float64)
            y = torch.randn(4 * c, 64, device=device, dtype=torch.float64)
            ref = []
            for mx, my in zip(x.tensor_split(c), y.tensor_split(c)):
                loss = F.mse_loss(full(mx), my)
                loss.backward()
                ref.append(loss.detach())
            mods = [copy.deepcopy(full[s]) for s in schedule.stages_on(0)]
            for m in mods:
                m.zero_grad(set_to_none=True)
            pipe = Pipeline(schedule, mods, profile=True, fb_streams=fb_streams)
            loss, _ = pipe.step(x, criterion=F.mse_loss, labels=(y,))
            torch.cuda.synchronize()
            rel = ((loss - torch.stack(ref)).abs() / torch.stack(ref).abs()).max().item()
            worst = max(
                cal_diff(p.grad, q.grad)
                for s, m in zip(schedule.stages_on(0), mods)
                for p, q in zip(m.parameters(), full[s].parameters())
            )
            summary = pipe.profile.summary()
            ok = rel < 1e-12 and worst < 1e-13 and summary["step"] > 0
            rows.append((name, f"loss rel {rel:.1e}, cal_diff {worst:.1e}, profiled step {summary['step']:.2f} ms", "ok" if ok else "FAIL"))
            failures += not ok
        except Exception as exc:  # report and go on with the next check
            rows.append((name, f"{type(exc).__name__}: {exc}"[:200], "FAIL"))
            failures += 1

    # 2. Step time against torch's ScheduleDualPipeV, world size 1 (both stages on the GPU).
    for hidden, rows_per_mb, dtype in ((512, 768, torch.float32), (4096, 1024, torch.bfloat16)):
        name = f"dualpipev 1 rank, 20 micro-batches, h {hidden}, {str(dtype).replace('torch.', '')}"
        try:
            c = 20
            torch.manual_seed(0)
            mods_t = [stage(hidden, dtype) for _ in range(2)]
            mods_o = [copy.deepcopy(m) for m in mods_t]
            example = torch.empty(rows_per_mb, hidden, device=device, dtype=dtype)
            stages = [
                PipelineStage(m, i, 2, device, input_args=(example,), output_args=(example,))
                for i, m in enumerate(mods_t)
            ]
            sched = ScheduleDualPipeV(stages, n_microbatches=c, loss_fn=F.mse_loss, scale_grads=False)
            mods_s = [copy.deepcopy(m) for m in mods_t]
            pipe = Pipeline(dualpipe_rs.plan("dualpipev", 1, c), mods_o)
            pipe_s = Pipeline(dualpipe_rs.plan("dualpipev", 1, c), mods_s, fb_streams=True)
            x = torch.randn(c * rows_per_mb, hidden, device=device, dtype=dtype)
            y = torch.randn(c * rows_per_mb, hidden, device=device, dtype=dtype)
            times = {"torch": [], "ours": [], "ours, FB on two streams": []}
            for i in range(args.steps + 2):
                for key in times:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if key == "torch":
                        sched.step(x, target=y)
                    elif key == "ours":
                        pipe.step(x, criterion=F.mse_loss, labels=(y,))
                    else:
                        pipe_s.step(x, criterion=F.mse_loss, labels=(y,))
                    torch.cuda.synchronize()
                    if i >= 2:
                        times[key].append((time.perf_counter() - t0) * 1e3)
                    for m in mods_t + mods_o + mods_s:
                        m.zero_grad(set_to_none=True)
            ours, theirs = statistics.median(times["ours"]), statistics.median(times["torch"])
            two = statistics.median(times["ours, FB on two streams"])
            rows.append((name, f"{ours:.2f} ms against torch ScheduleDualPipeV {theirs:.2f} ms: {ours / theirs:.2f}x; "
                               f"FB on two streams {two:.2f} ms ({two / ours:.2f}x of one stream)", "measured"))
        except Exception as exc:
            rows.append((name, f"{type(exc).__name__}: {exc}"[:200], "FAIL"))
            failures += 1

    print(f"torch {torch.__version__}; {torch.cuda.get_device_name(0)}; {time.strftime('%Y-%m-%d')}")
    print("| torch runtime check | result | status |")
    print("|---|---|---|")
    for name, result, status in rows:
        print(f"| {name} | {result} | {status} |")
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
