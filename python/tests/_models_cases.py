"""Hugging Face causal LMs cut into stages, run on every rank of a world."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dualpipe_rs
from dualpipe_rs.torch import Pipeline, measure_layer_costs, split_model

from _cases import cal_diff

VOCAB, SEQ = 64, 8


def tiny(arch: str):
    """A tiny model of ``arch`` in float64 with random weights (nothing downloaded)."""
    import transformers as tf

    torch.manual_seed(5)
    common = dict(vocab_size=VOCAB, max_position_embeddings=32)
    if arch == "gpt2":
        config = tf.GPT2Config(
            n_embd=16, n_layer=4, n_head=2, n_positions=32, vocab_size=VOCAB,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = tf.GPT2LMHeadModel(config)
    else:
        kinds = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4}),
        }
        cfg, cls, extra = kinds[arch]
        config = cfg(
            hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, **common, **extra,
        )
        model = cls(config)
    return model.double().eval()


def lm_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _batch(c: int):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (2 * c, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (2 * c, SEQ), generator=g)
    return ids, labels


def _feeds(schedule, rank, ids, labels):
    parts, lparts = ids.tensor_split(schedule.num_microbatches), labels.tensor_split(schedule.num_microbatches)
    xs, ys, outs = [], [], []
    for pipe in schedule.pipelines:
        mbs = sorted(pipe["microbatches"])
        if pipe["route"][0] == rank:
            xs += [parts[m] for m in mbs]
        if pipe["route"][-1] == rank:
            ys += [lparts[m] for m in mbs]
            outs += mbs
    return (torch.cat(xs) if xs else None), (torch.cat(ys) if ys else None), outs


def pipelined_equals_full(rank: int, arch: str, families, reentrant: Optional[bool] = None):
    """The pipelined losses per micro-batch equal the whole model's (1e-12 relative) and the
    gradients, copies and tied weights summed, agree within cal_diff < 1e-13. With
    ``reentrant`` set, the model is in training mode with transformers' gradient
    checkpointing on (reentrant or not), in the pipeline as in the whole model."""
    torch.set_num_threads(1)
    done = 0
    for family in families:
        c = 4
        schedule = dualpipe_rs.plan(family, dist.get_world_size(), c)
        model = tiny(arch)
        if reentrant is not None:
            model.config.use_cache = False
            model.train()  # the tiny models have no dropout
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        full = copy.deepcopy(model)
        ids, labels = _batch(c)
        ref = []
        for x, y in zip(ids.tensor_split(c), labels.tensor_split(c)):
            loss = lm_loss(full(x).logits, y)
            loss.backward()
            ref.append(loss.detach())
        modules = split_model(model, schedule, rank)
        pipe = Pipeline(schedule, modules, timeout=60)
        x, y, outs = _feeds(schedule, rank, ids, labels)
        loss, _ = pipe.step(x, criterion=lm_loss, labels=(y,))
        if outs:
            want = torch.stack([ref[m] for m in outs])
            rel = ((loss - want).abs() / want.abs()).max().item()
            assert rel < 1e-12, f"{arch} {family} rank {rank}: losses differ by {rel}"
        pipe.sum_copy_gradients()
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        ref_params = dict(full.named_parameters(remove_duplicate=False))
        checked = 0
        for m in modules:
            for p in m.parameters():
                q = ref_params[names[id(p)]]
                assert p.grad is not None, f"{arch} {family}: {names[id(p)]} has no gradient"
                d = cal_diff(p.grad, q.grad)
                assert d < 1e-13, f"{arch} {family} rank {rank}: {names[id(p)]} cal_diff {d}"
                checked += 1
        assert checked > 0
        done += 1
    return done


def measured_costs(rank: int):
    """Rank 0 measures, every rank gets the same list: one entry per unit."""
    model = tiny("llama")
    sample = torch.randint(0, VOCAB, (2, SEQ))
    costs = measure_layer_costs(model, sample, repeats=2)
    assert len(costs) == 6, costs
    assert [c["name"] for c in costs][:2] == ["embed_tokens", "layers.0"]
    for c in costs:
        assert c["f"] > 0 and c["b"] > 0 and 0 <= c["w"] <= c["b"], c
        assert c["param_bytes"] > 0 and c["activation_bytes"] > 0, c
    return costs
