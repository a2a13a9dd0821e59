"""How many saved values per token lean saves (kernels/rebuild.py) spare in each decoder layer: what
use_gradient_checkpointing="auto" (train/memory_policy.py) counts when it weighs them.

Counted only where the rebuild surely frees the value, so that the estimate never falls below the real peak:
- the input norm's output, when the token mixer's input projections (q/k/v or qkv_proj, or an MLP's up / gate-up in
  a Nemotron-H MLP layer) are fused LoRA layers and nothing else reads it. Not under OLMo's post-norm layers (they
  attend over the residual itself), nor for a linear mixer (with padding it reads a masked copy), nor in the first
  layer when the embedding is frozen (its norm then keeps nothing to rebuild from);
- the MLP norm's output, when gate and up (or gate_up) are fused LoRA layers;
- act(gate) * up (a gated MLP) or relu(up)^2 (Arcee's, Nemotron-H's), when down_proj is;
- in an MoE block with LoRA on the stacked experts: the k expert-sorted input copies (gate_up's LoRA keeps them)
  and act(gate) * up (down's).
Zeros for centred norms, FASTTUNE_KERNELS=torch (the reference ops mark nothing) and anything not our decoder.
The counts are tested against the saved tensors' bytes (tests/kernels/test_rebuild.py).
"""
from __future__ import annotations


def lean_values(model) -> list[int]:
    """Values per token each of the model's decoder layers stops keeping with lean saves (see the module doc);
    model: our CausalLM (anything else gets zeros). Returns one int per layer."""
    from fasttune.kernels.dispatch import kernel_choice

    cfg = model.arch
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or cfg.centered_norm or kernel_choice() == "torch":
        return [0] * cfg.num_layers
    parts = [_layer(layer, cfg) for layer in layers]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if parts and not getattr(getattr(embedding, "weight", None), "requires_grad", False):
        parts[0] = (0, parts[0][1])  # a frozen embedding: the first norm's output needs no gradient
    return [first + rest for first, rest in parts]


def _layer(layer, cfg) -> tuple[int, int]:
    """(values of the input norm's output, values of the rest) one layer spares."""
    from fasttune.models.mlp import MLP
    from fasttune.models.self_attention import Attention

    if getattr(layer, "parallel_mamba", False) or getattr(layer, "is_cross", False) or \
            getattr(layer, "parallel", False) or getattr(layer, "routed_beside", False):
        return 0, 0
    h, mixer = cfg.hidden_size, layer.mixer
    if getattr(layer, "kind", None) is not None:  # Nemotron-H: x + mixer(norm(x)), one sublayer
        if layer.kind == "attention":
            return (h if _attention_reads_norm(mixer, cfg) else 0), 0
        if layer.kind == "mlp" and type(mixer) is MLP:
            return _mlp(mixer, h)
        return 0, 0
    first = h if type(mixer) is Attention and not layer.post_norm and _attention_reads_norm(mixer, cfg) else 0
    norm_out, act = _mlp(layer.ffn, h) if type(layer.ffn) is MLP else (0, _experts(layer.ffn, cfg))
    return first, (0 if layer.post_norm else norm_out) + act


def _attention_reads_norm(attention, cfg) -> bool:
    if cfg.attn_head_gate:  # (LFM3's head gate reads the input through a plain Linear)
        return False
    if cfg.fused_qkv:
        return _fused_lora(attention.qkv_proj)
    v = () if attention.values_from_keys else (attention.v_proj,)
    return _fused_lora(attention.q_proj, attention.k_proj, *v)


def _mlp(mlp, h: int) -> tuple[int, int]:
    """(the MLP input's values, the activation's) a dense MLP spares: its input where its first projections are
    fused LoRA layers, act(gate) * up or relu(up)^2 where down_proj is (not xIELU's, which keeps its own)."""
    if not mlp.gated and mlp.act == "xielu":
        return 0, 0
    first = (mlp.gate_up,) if mlp.gated and mlp.fused else (mlp.gate, mlp.up) if mlp.gated else (mlp.up,)
    return (h if _fused_lora(*first) else 0), (mlp.intermediate if _fused_lora(mlp.down) else 0)


def _experts(block, cfg) -> int:
    """Values per token an MoE block's gated experts (models/moe.py's Experts, gpt-oss's) spare: the k
    expert-sorted input copies, kept by gate_up_proj's LoRA, and act(gate) * up, kept by down_proj's."""
    from fasttune.models.gpt_oss import GptOssExperts
    from fasttune.models.moe import Experts

    experts = getattr(block, "experts", None)
    gated = type(experts) is GptOssExperts or (type(experts) is Experts and experts.gated)
    if not gated or hasattr(block, "fc1_latent_proj") or getattr(block, "jitter", 0):
        return 0
    enabled = {name for name, adapter in experts.lora.items() if not adapter.disabled}
    k = cfg.num_experts_per_tok
    return k * (cfg.hidden_size * ("gate_up_proj" in enabled) + cfg.moe_intermediate_size * ("down_proj" in enabled))


def _fused_lora(*modules) -> bool:
    """Whether the modules all run kernels/lora.py's fused path on a GPU (peft/lora_layer.py's can_fuse)."""
    from fasttune.peft.lora_layer import LoraLinear

    return all(type(m) is LoraLinear and not m.disabled and
               not any(p.requires_grad for p in m.base_layer.parameters(recurse=False)) for m in modules)
