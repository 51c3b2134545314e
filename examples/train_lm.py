"""Train a small Llama-style language model under a pipeline schedule, on text in this repository.

    torchrun --nproc-per-node 4 examples/train_lm.py                 # dualpipev on 4 ranks
    torchrun --nproc-per-node 2 examples/train_lm.py --schedule zbv --steps 40
    torchrun --nproc-per-node 2 examples/train_lm.py --check         # against one process

The model (random initialisation, about 3 M parameters) reads bytes, so no tokenizer is needed;
the text is the repository's own documentation unless --data names files. Before training,
rank 0 measures every layer's forward, backward and weight-gradient time and broadcasts them;
the partitioner cuts the model for the schedule from those costs, and prints its predicted step
time. Each step prints the loss and the tokens per second; at the end the last step's Chrome
trace and the measured busy/idle summary are written. On CPU it uses gloo; with one GPU per
process, NCCL.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dualpipe_rs
from dualpipe_rs.torch import Pipeline, measure_layer_costs, split_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="dualpipev", help="a family dualpipe_rs.plan knows")
    p.add_argument("--microbatches", type=int, default=None, help="default: 2 x stages' need")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--data", nargs="*", default=None, help="text files (default: the docs)")
    p.add_argument("--trace", default="train_lm_trace.json", help="Chrome trace of the last step")
    p.add_argument("--force", action="store_true", help="replace an existing trace or log file")
    p.add_argument("--loss-csv", default=None, help="write step, loss, tokens/s as CSV")
    p.add_argument("--check", action="store_true", help="compare the first steps with one process")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=max(256, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def load_text(paths):
    if not paths:
        paths = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    data = b"".join(open(p, "rb").read() for p in paths)
    return torch.tensor(list(data), dtype=torch.long)


def batches(tokens, rows, seq, seed):
    """An endless stream of (inputs, next-byte labels), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq - 1, (rows,), generator=g)
        window = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def lm_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def feeds(schedule, rank, x, y):
    """This rank's share of the batch: inputs where it runs stage 0, labels where it runs the
    last stage (pipelines in document order, then micro-batches in order)."""
    xs, ys = x.tensor_split(schedule.num_microbatches), y.tensor_split(schedule.num_microbatches)
    mine_x, mine_y = [], []
    for pipe in schedule.pipelines:
        mbs = sorted(pipe["microbatches"])
        if pipe["route"][0] == rank:
            mine_x += [xs[m] for m in mbs]
        if pipe["route"][-1] == rank:
            mine_y += [ys[m] for m in mbs]
    return (torch.cat(mine_x) if mine_x else None), (torch.cat(mine_y) if mine_y else None)


def main() -> int:
    args = parse_args()
    # Built before the process group: a transformers model first built after it keeps the
    # default group alive past destroy_process_group, and gloo's thread may then free a
    # finished collective's tensor while the interpreter shuts down (an abort at exit).
    model = build_model(args)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    lead = rank == 0
    if lead and args.loss_csv and os.path.exists(args.loss_csv) and not args.force:
        # Said before training, not after it (torchrun then stops the other ranks).
        raise SystemExit(f"{args.loss_csv} exists; pass --force to replace it")

    chunks = args.microbatches if args.microbatches is not None else 2 * ranks
    schedule = dualpipe_rs.plan(args.schedule, ranks, chunks)
    model = model.to(device)
    reference = copy.deepcopy(model) if args.check else None
    params = sum(p.numel() for p in model.parameters())

    tokens = load_text(args.data)
    rows = chunks * args.micro_batch_size
    stream = batches(tokens, rows, args.seq, args.seed)
    sample = next(batches(tokens, args.micro_batch_size, args.seq, args.seed + 1))[0].to(device)
    costs = measure_layer_costs(model, sample)
    cut = dualpipe_rs.partition(costs, schedule)
    modules = split_model(model, schedule, rank, layer_costs=costs)
    pipe = Pipeline(schedule, modules, profile=True)
    local = [p for m in pipe.module for p in m.parameters()]
    unique = list({id(p): p for p in local}.values())
    optimizer = torch.optim.AdamW(unique, lr=args.lr, weight_decay=0.0)
    if lead:
        print(
            f"{args.schedule} on {ranks} ranks ({'nccl' if cuda else 'gloo'}), {chunks} micro-batches of "
            f"{args.micro_batch_size}x{args.seq} bytes; model {params / 1e6:.2f} M parameters in "
            f"{len(costs)} units; {len(tokens)} bytes of text",
            flush=True,
        )
        print(f"cut (units per stage): {[e - s for s, e in cut['ranges']]}; predicted step "
              f"{cut['predicted_step']:.1f} ms (equal cut {cut['equal_cut_step']:.1f} ms)", flush=True)

    ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr, weight_decay=0.0) if reference else None
    log = [] if lead else None
    worst = 0.0
    for step in range(args.steps):
        x, y = next(stream)
        x, y = x.to(device), y.to(device)
        xi, yi = feeds(schedule, rank, x, y)
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = pipe.step(xi, criterion=lm_loss, labels=(yi,))
        pipe.sum_copy_gradients()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        # Every micro-batch's loss lives on the rank that ran its last stage: add them up.
        total = torch.zeros(2, dtype=torch.float64, device=device)
        if loss is not None:
            total += torch.stack([loss.double().sum(), torch.tensor(float(loss.numel()), device=device, dtype=torch.float64)])
        dist.all_reduce(total)
        mean = (total[0] / total[1]).item()
        if reference is not None and step < 3:
            ref_opt.zero_grad(set_to_none=True)
            ref_losses = []
            for mx, my in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
                l = lm_loss(reference(mx).logits, my)
                l.backward()
                ref_losses.append(l.item())
            ref_opt.step()
            ref_mean = sum(ref_losses) / len(ref_losses)
            worst = max(worst, abs(mean - ref_mean) / abs(ref_mean))
            if lead:
                print(f"check step {step}: pipelined {mean:.8f}, one process {ref_mean:.8f}", flush=True)
        rate = rows * args.seq / elapsed
        if lead:
            done = (step + 1) * 30 // args.steps
            bar = "#" * done + "." * (30 - done)
            print(f"[{bar}] step {step + 1:3d}/{args.steps} loss {mean:.4f} {rate:8.0f} tokens/s", flush=True)
            log.append((step + 1, mean, rate))

    summary = pipe.profile.summary()
    trace = args.trace
    if not args.force:
        # Keep what an earlier run wrote: take the next free name instead.
        stem, ext = os.path.splitext(trace)
        n = 1
        while os.path.exists(trace):
            trace, n = f"{stem}.{n}{ext}", n + 1
    pipe.profile.chrome_trace(trace, overwrite=args.force)
    if lead:
        print("last step: " + ", ".join(
            f"rank {r['rank']} busy {r['busy']:.1f} ms idle {r['idle']:.1f} ms" for r in summary["ranks"]))
        print(f"measured step {summary['step']:.1f} ms, bubble {summary['measured_bubble']:.1%} "
              f"(simulated from measured costs {summary['simulated_bubble']:.1%}); trace in {trace}")
        if args.loss_csv:
            with open(args.loss_csv, "w") as fh:
                fh.write("step,loss,tokens_per_s\n")
                for s, l, r in log:
                    fh.write(f"{s},{l:.6f},{r:.1f}\n")
        if len(log) >= 10:
            first, last = sum(l for _, l, _ in log[:5]) / 5, sum(l for _, l, _ in log[-5:]) / 5
            print(f"loss fell from {first:.3f} (first 5 steps) to {last:.3f} (last 5 steps)")
    ok = True
    if args.check:
        bound = 1e-5 if cuda else 1e-6
        ok = worst < bound
        if lead:
            print(f"check: largest relative difference {worst:.2e} over 3 steps (bound {bound:g}): {'ok' if ok else 'FAILED'}")
    # Every rank is past its last message before any rank closes its connections.
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
