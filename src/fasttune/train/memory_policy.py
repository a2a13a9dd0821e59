"""use_gradient_checkpointing="auto": pick the fastest recompute policy that fits the free GPU memory.

LoRA without recompute does ~4N FLOPs per token instead of ~6N, so "off" is taken whenever the activations it
keeps fit. The estimate counts what one decoder layer saves for backward per token (with our kernels: the norm
input and output, q/k/v, the attention output, gate, up and act(gate)), times layers and micro-batch tokens,
plus the fp32 logits chunk of the loss, with a safety factor. CPU runs keep "off" (memory is rarely the limit).
"""
from __future__ import annotations

import torch

SAFETY = 1.3  # allocator fragmentation and temporaries the count leaves out
RESERVE_BYTES = 2 << 30  # left free for the CUDA context, cuBLAS workspaces and the optimizer step


def _layer_values(cfg) -> list[int]:
    """Values saved per token by each decoder layer: attention (6h + 2 kv) plus the MLP's gate, up and act (3I),
    or for a sparse MoE layer k times its expert rows (input h, gate_up 2I, act I, output h) and the fp32 router
    logits (2E values)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    dense = 6 * h + 2 * kv + 3 * cfg.intermediate_size
    sparse = 6 * h + 2 * kv + cfg.num_experts_per_tok * (2 * h + 3 * cfg.moe_intermediate_size) + 2 * cfg.num_experts
    moe = list(cfg.moe_layers) if cfg.num_experts else []
    return [sparse if i < len(moe) and moe[i] else dense for i in range(cfg.num_layers)]


def activation_bytes(cfg, tokens: int, bytes_per_el: int, recompute: bool) -> int:
    """Estimated bytes of activations saved for backward for `tokens` tokens at `bytes_per_el` bytes a value,
    from the model's Config (hidden, kv heads x head_dim, intermediate, layers; for MoE layers the top-k expert
    rows). recompute=True counts the layer inputs of all layers plus the largest layer's full set; no safety
    factor, no logits (see choose_checkpointing)."""
    values = _layer_values(cfg)
    if recompute:  # layer inputs for all layers + one layer's full set during its backward
        return tokens * bytes_per_el * (cfg.num_layers * cfg.hidden_size + max(values))
    return tokens * bytes_per_el * sum(values)


def choose_checkpointing(model, micro_batch_tokens: int) -> tuple[bool | str, str]:
    """Returns (mode, one-line explanation)."""
    if model.device.type != "cuda":
        return False, "gradient checkpointing auto -> off (CPU)"
    cfg, el = model.arch, torch.finfo(model.dtype).bits // 8
    logits = 2 * 4 * min(micro_batch_tokens, 8192) * cfg.vocab_size  # fp32 logits chunk and its gradient
    free, _ = torch.cuda.mem_get_info(model.device)
    budget = free - RESERVE_BYTES
    gib = 2**30
    for mode, recompute in ((False, False), (True, True)):
        need = SAFETY * activation_bytes(cfg, micro_batch_tokens, el, recompute) + logits
        if need <= budget:
            label = "off" if mode is False else "on (recompute each layer)"
            return mode, (f"gradient checkpointing auto -> {label}: needs ~{need / gib:.1f} GiB of "
                          f"{free / gib:.1f} GiB free for {micro_batch_tokens} tokens per micro-batch")
    return "offload", (f"gradient checkpointing auto -> offload (layer inputs to CPU): {micro_batch_tokens} tokens "
                       f"per micro-batch do not fit {free / gib:.1f} GiB free otherwise")
