"""Cutting a model into pipeline stages: ``nn.Sequential`` and Hugging Face causal LMs.

A model is seen as a list of *units* cut into contiguous ranges, one range per stage: for an
``nn.Sequential`` its children; for a causal LM the embeddings, each decoder layer, and the
final norm with the LM head. The cut comes from the Rust partitioner
(:func:`dualpipe_rs.partition`) on measured costs or, without them, on parameter counts, so
every rank cuts the same model identically.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import Schedule
from ._split import backward_input

__all__ = ["split_model", "measure_layer_costs", "model_units", "TIE_ATTRIBUTE"]

TIE_ATTRIBUTE = "_dualpipe_rs_tie"
"""The attribute that marks a parameter shared by several units (tied weights); its value
names the parameter the same way on every rank."""


class _Unit(nn.Module):
    """One unit of a causal LM: embeddings, one decoder layer, or the final norm and head."""

    def __init__(self, kind: str, name: str, modules: Dict[str, nn.Module], index: int = -1) -> None:
        super().__init__()
        self.kind = kind
        self.unit_name = name
        self.index = index
        for key, module in modules.items():
            self.add_module(key, module)


class CausalLMStage(nn.Module):
    """A contiguous run of a causal LM's units.

    Stage 0 takes ``input_ids``; a middle stage takes and returns hidden states; the last
    stage returns logits. Positions, rotary embeddings and the causal mask are rebuilt in
    every stage exactly as the whole model builds them (the same functions, the same
    configuration), so the pipelined logits equal the whole model's.
    """

    def __init__(self, family: str, config, units: Sequence[_Unit], rotary: Optional[nn.Module]) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.units = nn.ModuleList(units)
        self.rotary = rotary

    def _masks(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        from transformers import masking_utils

        args = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        masks = {"full_attention": masking_utils.create_causal_mask(**args)}
        kinds = {_layer_kind(self.config, self.family, u.index) for u in self.units if u.kind == "layer"}
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = masking_utils.create_sliding_window_causal_mask(**args)
        return masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x
        first = self.units[0]
        if first.kind == "embed":
            hidden = first.embed(x)
            seq = x.shape[1]
        else:
            seq = hidden.shape[1]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        if first.kind == "embed" and self.family == "gpt2":
            hidden = first.drop(hidden + first.wpe(position_ids).to(hidden.device))
        layers = [u for u in self.units if u.kind == "layer"]
        if layers:
            masks = self._masks(hidden, position_ids)
            if self.family == "gpt2":
                for u in layers:
                    hidden = u.layer(
                        hidden, None, masks["full_attention"], None,
                        encoder_attention_mask=None, use_cache=False, position_ids=position_ids,
                    )
            else:
                embeddings = self.rotary(hidden, position_ids)
                for u in layers:
                    kind = _layer_kind(self.config, self.family, u.index)
                    hidden = u.layer(
                        hidden,
                        attention_mask=masks[kind],
                        position_embeddings=embeddings,
                        position_ids=position_ids,
                        use_cache=False,
                    )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        last = self.units[-1]
        if last.kind == "head":
            hidden = last.lm_head(last.norm(hidden))
        return hidden


def _layer_kind(config, family: str, index: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return types[index]
    if family == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


def model_units(model: nn.Module):
    """``(family, units, rotary, config)``: how ``model`` is cut. ``family`` is
    ``"sequential"``, ``"gpt2"`` or ``"llama"`` (Llama, Qwen2, Mistral and models built the
    same way: ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``)."""
    if isinstance(model, nn.Sequential):
        return "sequential", list(model), None, None
    inner = getattr(model, "model", None)
    if inner is not None and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        config = model.config
        family = "mistral" if getattr(config, "model_type", "") == "mistral" else "llama"
        units = [_Unit("embed", "embed_tokens", {"embed": inner.embed_tokens})]
        for i, layer in enumerate(inner.layers):
            units.append(_Unit("layer", f"layers.{i}", {"layer": layer}, i))
        units.append(_Unit("head", "norm+lm_head", {"norm": inner.norm, "lm_head": model.lm_head}))
        return family, units, getattr(inner, "rotary_emb", None), config
    inner = getattr(model, "transformer", None)
    if inner is not None and all(hasattr(inner, a) for a in ("wte", "wpe", "h", "ln_f")):
        config = model.config
        units = [_Unit("embed", "wte+wpe", {"embed": inner.wte, "wpe": inner.wpe, "drop": inner.drop})]
        for i, block in enumerate(inner.h):
            units.append(_Unit("layer", f"h.{i}", {"layer": block}, i))
        units.append(_Unit("head", "ln_f+lm_head", {"norm": inner.ln_f, "lm_head": model.lm_head}))
        return "gpt2", units, None, config
    raise TypeError(
        f"cannot cut a {type(model).__name__}: pass an nn.Sequential or a causal LM built like "
        f"Llama, Qwen2, Mistral or GPT-2 (model.model.layers or model.transformer.h)"
    )


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _mark_ties(units: Sequence[nn.Module]) -> None:
    """Mark every parameter that more than one unit holds (tied weights)."""
    seen: Dict[int, List[str]] = {}
    params: Dict[int, torch.nn.Parameter] = {}
    for i, unit in enumerate(units):
        for name, p in unit.named_parameters():
            if i not in [j for j, _ in seen.get(id(p), [])]:
                seen.setdefault(id(p), []).append((i, name))
            params[id(p)] = p
    for key, where in seen.items():
        if len(where) > 1:
            label = "=".join(f"{i}.{name}" for i, name in where)
            setattr(params[key], TIE_ATTRIBUTE, label)


def split_model(
    model: nn.Module,
    schedule: Schedule,
    rank: int,
    layer_costs: Optional[Sequence[Dict[str, Any]]] = None,
    memory_cap: Optional[int] = None,
) -> List[nn.Module]:
    """This rank's stage modules, in ``schedule.stages_on(rank)`` order, ready for
    :class:`~dualpipe_rs.torch.Pipeline`.

    The units (see :func:`model_units`) are cut by :func:`dualpipe_rs.partition` for this
    schedule: on ``layer_costs`` (one dict per unit, as :func:`measure_layer_costs` returns)
    or, when ``None``, on parameter counts, which every rank computes alike. The stage
    modules share the model's submodules (nothing is copied). Parameters held by several
    units (tied embeddings and LM head) are marked, so that
    :meth:`Pipeline.sum_copy_gradients` sums their gradients across the ranks that hold them.
    """
    import dualpipe_rs

    family, units, rotary, config = model_units(model)
    if len(units) < schedule.num_stages:
        raise ValueError(
            f"rank {rank}: the model has {len(units)} units but the schedule has "
            f"{schedule.num_stages} stages"
        )
    if layer_costs is None:
        layer_costs = parameter_costs(units)
    if len(layer_costs) != len(units):
        raise ValueError(
            f"rank {rank}: layer_costs has {len(layer_costs)} entries but the model has "
            f"{len(units)} units ({units[0].__class__.__name__} ...)"
        )
    cut = dualpipe_rs.partition(list(layer_costs), schedule, memory_cap=memory_cap)
    ranges = cut["ranges"]
    _mark_ties(units)
    stages = []
    for stage in schedule.stages_on(rank):
        start, end = ranges[stage]
        if family == "sequential":
            stages.append(nn.Sequential(*units[start:end]))
        else:
            stages.append(CausalLMStage(family, config, units[start:end], rotary))
    return stages


def parameter_costs(units: Sequence[nn.Module]) -> List[Dict[str, Any]]:
    """Costs proportional to each unit's parameter count (forward 1, backward 2, weight 1
    per parameter): a cut that every rank computes alike, without measuring."""
    out = []
    for i, unit in enumerate(units):
        n = float(sum(p.numel() for p in unit.parameters())) or 1.0
        out.append(
            {
                "name": getattr(unit, "unit_name", str(i)),
                "f": n,
                "b": 2 * n,
                "w": n,
                "param_bytes": _param_bytes(unit),
                "activation_bytes": 0,
            }
        )
    return out


def measure_layer_costs(
    model: nn.Module,
    sample: torch.Tensor,
    repeats: int = 3,
    group: Optional[dist.ProcessGroup] = None,
) -> List[Dict[str, Any]]:
    """Time each unit's forward, full backward and weight-gradient part (milliseconds,
    medians of ``repeats``) on ``sample`` (one micro-batch of the model's input), with its
    parameter bytes and output activation bytes: the partitioner's input.

    In a distributed run, rank 0 of ``group`` (default: the default group) measures and
    broadcasts, so that every rank cuts the model identically.
    """
    if dist.is_available() and dist.is_initialized():
        holder: List[Any] = [None]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        if dist.get_rank() == src:
            holder[0] = _measure(model, sample, repeats)
        dist.broadcast_object_list(holder, src=src, group=group)
        return holder[0]
    return _measure(model, sample, repeats)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _measure(model: nn.Module, sample: torch.Tensor, repeats: int) -> List[Dict[str, Any]]:
    family, units, rotary, config = model_units(model)
    if family == "sequential":
        stages = [nn.Sequential(u) for u in units]
    else:
        stages = [CausalLMStage(family, config, [u], rotary) for u in units]
    device = sample.device
    times = [{"f": [], "b": [], "w": []} for _ in stages]
    act_bytes = [0] * len(stages)
    for _ in range(repeats):
        x = sample
        for i, stage in enumerate(stages):
            params = [p for p in stage.parameters() if p.requires_grad]
            inp = x.detach().requires_grad_(x.is_floating_point())
            t0 = _now(device)
            out = stage(inp)
            t1 = _now(device)
            grad = torch.ones_like(out) if out.is_floating_point() else None
            times[i]["f"].append((t1 - t0) * 1e3)
            act_bytes[i] = out.numel() * out.element_size()
            if grad is not None:
                t0 = _now(device)
                torch.autograd.backward([out], [grad], inputs=params + ([inp] if inp.requires_grad else []))
                t1 = _now(device)
                times[i]["b"].append((t1 - t0) * 1e3)
                out = stage(inp)
                _, later = backward_input([out], [grad], [inp], params)
                t0 = _now(device)
                later.run()
                t1 = _now(device)
                times[i]["w"].append((t1 - t0) * 1e3)
            for p in params:
                p.grad = None
            x = out.detach()
    result = []
    for i, unit in enumerate(units):
        t = times[i]
        b = statistics.median(t["b"]) if t["b"] else 0.0
        w = min(statistics.median(t["w"]), b) if t["w"] else 0.0
        result.append(
            {
                "name": getattr(unit, "unit_name", str(i)),
                "f": statistics.median(t["f"]),
                "b": b,
                "w": w,
                "param_bytes": _param_bytes(unit),
                "activation_bytes": act_bytes[i],
            }
        )
    return result
