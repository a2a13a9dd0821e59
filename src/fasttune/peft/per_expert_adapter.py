"""LoRA adapters written for transformers 4's per-expert MoE layers, stacked into the layout our experts take.

transformers 4 kept each expert of Mixtral and Qwen3-MoE as its own Linear layers, so PEFT adapters trained there
hold one LoRA per expert and projection: `<layer>.block_sparse_moe.experts.<e>.w1|w3|w2.lora_A.weight` (Mixtral)
or `<layer>.mlp.experts.<e>.gate_proj|up_proj|down_proj...` (Qwen3-MoE), A (r, in) and B (out, r). transformers 5
stacks the experts (`mlp.experts.gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)), and PEFT on it loads such an
adapter by stacking it (peft.utils.transformers_weight_conversion, through transformers' conversion mapping):

    gate_up:  A_e = [A_gate; A_up] (2r, H),   B_e = blockdiag(B_gate, B_up) (2I, 2r)
    down:     A_e = A_down,                    B_e = B_down

so that B_e @ A_e = [B_gate A_gate; B_up A_up] exactly, with rank 2r and alpha 2 * alpha on gate_up (alpha / r
kept), in PEFT's ParamWrapper layout (lora_A (E*r, in), rows e*r + j; lora_B (out, r*E), column j*E + e). Any
difference between a projection's own scaling and the stacked one (rsLoRA's alpha / sqrt(r), per-name patterns) is
folded into B, so the update is the adapter's to rounding. The router's LoRA (Mixtral's `block_sparse_moe.gate`) is
renamed to `mlp.gate`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fasttune.errors import ModelLoadError
from fasttune.peft.lora import LoraSettings, expert_lora_layers

PER_EXPERT_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+?)\.(?P<block>block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
                            r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.lora_(?P<ab>[AB])\.weight$")
GATE, UP, DOWN = ("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")


def has_per_expert_keys(saved: dict) -> bool:
    """Whether an adapter's tensors (PEFT keys, adapter-name infix removed) include transformers 4 per-expert LoRA."""
    return any(PER_EXPERT_KEY.match(k) for k in saved)


def stack_per_expert_adapter(model, saved: dict[str, torch.Tensor], asked: LoraSettings, folder: Path,
                             stems: dict[str, str]) -> dict[str, torch.Tensor]:
    """`saved` with its per-expert LoRA tensors replaced by the stacked ones of `model`'s ExpertLora layers (already
    applied from the same adapter config; `stems`: their PEFT key stems, adapter_io.expert_adapter_keys), and
    Mixtral's `block_sparse_moe.` renamed to `mlp.`. asked: the settings as the adapter config gave them, before the
    MoE mapping (each per-expert projection's own rank and scaling). Raises ModelLoadError naming `folder` for an
    expert, projection or rank the stacked layer cannot take."""
    per_expert: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    blocks: dict[tuple[str, str], str] = {}  # the adapter's own module path, as its rank / alpha patterns saw it
    rest = {}
    for k, t in saved.items():
        m = PER_EXPERT_KEY.match(k)
        if m is None:
            rest[k.replace(".block_sparse_moe.", ".mlp.")] = t
            continue
        per_expert.setdefault((m["layer"], m["proj"]), {}).setdefault(int(m["e"]), {})[m["ab"]] = t
        blocks[(m["layer"], m["proj"])] = f"{m['layer']}.{m['block']}.experts.{{}}.{m['proj']}"
    used = set()
    for name, adapter in expert_lora_layers(model):
        layer = name.split(".mlp.experts.")[0]
        parts = (GATE, UP) if name.endswith("gate_up_proj") else (DOWN,)
        found = [next(((layer, p) for p in part if (layer, p) in per_expert), None) for part in parts]
        if None in found:
            missing = [p[0] + "/" + p[1] for p, f in zip(parts, found) if f is None]
            raise ModelLoadError(f"Adapter {folder}: per-expert LoRA of {layer} lacks {', '.join(missing)} while "
                                 f"the model adapts {name}; load it onto the base it was trained from.")
        a, b = _stack(adapter, [per_expert[key] for key in found], [blocks[key] for key in found], asked, folder)
        rest[f"{stems[name]}.lora_A.weight"], rest[f"{stems[name]}.lora_B.weight"] = a, b
        used.update(found)
    left = sorted(set(per_expert) - used)
    if left:
        raise ModelLoadError(f"Adapter {folder} has per-expert LoRA for {left[0][0]}.experts.*.{left[0][1]}, which "
                             f"this model does not adapt as experts (a dense MLP layer, or another base model).")
    return rest


def _stack(adapter, groups: list[dict], names: list[str], asked: LoraSettings, folder: Path):
    """(lora_A (E*R, in), lora_B (out, R*E)) of `adapter` from per-expert {e: {"A": (r, in), "B": (out, r)}} groups
    (gate then up, or down alone; `names` their module paths with {} for the expert), each B scaled by its own
    scaling over the stacked one."""
    e_count, rank = adapter.num_experts, adapter.r
    a_rows, b_blocks = [], []
    for e in range(e_count):
        a_parts, b_parts = [], []
        for group, name in zip(groups, names):
            if e not in group or set(group[e]) != {"A", "B"}:
                raise ModelLoadError(f"Adapter {folder}: {name.format(e)} has no complete lora_A / lora_B pair; the "
                                     f"adapter file is incomplete.")
            r, alpha = asked.rank_alpha(name.format(e))
            own = alpha / (r ** 0.5 if asked.use_rslora else r)
            a_parts.append(group[e]["A"].float())
            b_parts.append(group[e]["B"].float() * (own / adapter.scaling))
        a_e, b_e = torch.cat(a_parts), torch.block_diag(*b_parts)
        if a_e.shape != (rank, adapter.in_features) or b_e.shape != (adapter.out_features, rank):
            raise ModelLoadError(f"Adapter {folder}: the per-expert LoRA of {names[0].format(e)} "
                                 f"stacks to rank {a_e.shape[0]} over {tuple(b_e.shape)} x {tuple(a_e.shape)}, the "
                                 f"model's layer takes rank {rank} for ({adapter.out_features}, "
                                 f"{adapter.in_features}) (a rank pattern on single experts, or another base model).")
        a_rows.append(a_e)
        b_blocks.append(b_e)
    lora_a = torch.stack(a_rows).reshape(e_count * rank, adapter.in_features)  # rows e*R + j
    lora_b = torch.stack(b_blocks, dim=2).reshape(adapter.out_features, rank * e_count)  # column j*E + e
    return lora_a, lora_b
