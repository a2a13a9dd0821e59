"""Read llama.cpp's Mamba-2 hybrid GGUF files back into transformers' layout: "granitehybrid" (Granite 4.0-H, and
Bamba's files, which use it too), "nemotron_h" / "nemotron_h_moe" (Nemotron-H, Nemotron Nano 2, Nemotron 3) and
"falcon-h1". transformers has no GGUF tables for them; this is the reverse of export/gguf_granite.py,
export/gguf_falcon_h1.py and what llama.cpp's convert_hf_to_gguf.py (GraniteHybridModel, NemotronHModel,
FalconH1Model over Mamba2Model) writes:

- the config from the file's keys: a layer with 0 key/value heads is a Mamba-2 layer (and, in nemotron_h, one with a
  feed-forward width an MLP or MoE layer), the Mamba sizes from the ssm.* keys, Granite's four multipliers from the
  scale keys, RoPE where the file says it is "finetuned";
- a granitehybrid file whose multipliers are all 1, whose attention scale is 1 / sqrt(head size) and whose
  attention rotates half of each head without experts is Bamba's (BambaConfig fixes that rotation); the others are
  Granite 4.0's;
- tensor names as the exporter writes them (export/gguf_parts.py, asked for each of the model's tensors), so
  the tensors llama.cpp splits (Granite's fused shared MLP, the experts' gate and up) are joined again;
- Falcon-H1's µP multipliers are folded into its weights in the file, so it reads back with every multiplier 1 (the
  same function), its Mamba output normed after the gate where the file has the norm (llama.cpp's only form);
- the Mamba mixer's tensors undone: ssm_a = -exp(A_log) -> A_log; D and the gated norm's (groups, channels) back to
  vectors; the conv (channels, kernel) -> (channels, 1, kernel).

Not carried by the files (llama.cpp has no key for them), so read back at transformers' defaults: the Mamba
time_step_limit, and Granite's router auxiliary-loss settings.
"""
from __future__ import annotations

import torch

from fasttune.errors import ModelLoadError

ARCHITECTURES = {"granitehybrid": "granitemoehybrid", "nemotron_h": "nemotron_h", "nemotron_h_moe": "nemotron_h",
                 "falcon-h1": "falcon_h1"}


def _per_layer(value, layers: int) -> list[int]:
    """A per-layer GGUF key (a list, or one number for every layer) as `layers` ints."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * layers
    return [int(v) for v in values[:layers]]


def hybrid_config(get, arch: str, path, tensor_names: set) -> dict:
    """transformers config fields (with model_type) of a granitehybrid / nemotron_h(_moe) file, from its `arch.*`
    keys (get: gguf_file.arch_values of the file) and which tensors it holds (the biases' presence). Raises
    ModelLoadError for a file without the keys llama.cpp needs, or a granitehybrid file whose attention rotates part
    of each head beside Granite's multipliers (no transformers config computes that)."""
    needed = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv", "ssm.conv_kernel",
              "ssm.state_size", "ssm.group_count", "ssm.inner_size", "ssm.time_step_rank")
    missing = [k for k in needed if get(k) is None]
    if missing:
        raise ModelLoadError(f"{path}: this {arch} GGUF lacks {', '.join(f'{arch}.{k}' for k in missing)}, which "
                             f"llama.cpp's {arch} needs. The file is incomplete; convert the model again.")
    layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    kv = _per_layer(get("attention.head_count_kv"), layers)
    head_dim = int(get("attention.key_length", hidden // heads))
    inner, mamba_heads = int(get("ssm.inner_size")), int(get("ssm.time_step_rank"))
    first = next((i for i, n in enumerate(kv) if n == 0), 0)
    conv_bias = f"blk.{first}.ssm_conv1d.bias" in tensor_names
    proj_bias = f"blk.{first}.ssm_in.bias" in tensor_names
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=max(kv) or heads, max_position_embeddings=int(get("context_length", 4096)),
                  attention_bias=f"blk.{kv.index(max(kv))}.attn_q.bias" in tensor_names if max(kv) else False)
    if arch == "falcon-h1":  # attention and Mamba side by side in every layer, multipliers folded (module docstring)
        return dict(common, model_type="falcon_h1", head_dim=head_dim, intermediate_size=int(get("feed_forward_length")),
                    mamba_d_ssm=inner, mamba_n_heads=mamba_heads, mamba_d_head=inner // mamba_heads,
                    mamba_n_groups=int(get("ssm.group_count")), mamba_d_state=int(get("ssm.state_size")),
                    mamba_d_conv=int(get("ssm.conv_kernel")), mamba_conv_bias=conv_bias, projectors_bias=proj_bias,
                    mamba_rms_norm="blk.0.ssm_norm.weight" in tensor_names, mamba_norm_before_gate=False,
                    rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_parameters=rope,
                    mlp_bias="blk.0.ffn_up.bias" in tensor_names)
    if arch == "granitehybrid":
        return _granite_config(get, path, layers, kv, head_dim, hidden, heads, inner, mamba_heads, conv_bias,
                               proj_bias, rope, common)
    ff = _per_layer(get("feed_forward_length", 0), layers)
    experts = int(get("expert_count", 0) or 0)
    kinds = ["full_attention" if k else ("moe" if experts else "mlp") if f else "linear_attention"
             for k, f in zip(kv, ff)]
    fields = dict(
        common, model_type="nemotron_h", layers_block_type=kinds, head_dim=head_dim,
        intermediate_size=max(ff) if not experts and max(ff) else None, mlp_hidden_act="relu2",
        mamba_num_heads=mamba_heads, mamba_head_dim=inner // mamba_heads, n_groups=int(get("ssm.group_count")),
        ssm_state_size=int(get("ssm.state_size")), conv_kernel=int(get("ssm.conv_kernel")), use_conv_bias=conv_bias,
        mamba_proj_bias=proj_bias, use_bias=proj_bias,
        layer_norm_epsilon=float(get("attention.layer_norm_epsilon",
                                     get("attention.layer_norm_rms_epsilon", 1e-5))))
    if experts:  # Nemotron 3: DeepSeek-V3's routing keys, ungated experts, shared experts beside them
        shared = int(get("expert_shared_count", 1) or 0)
        latent = get("moe_latent_size")
        fields.update(n_routed_experts=experts, num_experts_per_tok=int(get("expert_used_count")),
                      moe_intermediate_size=int(get("expert_feed_forward_length")), n_shared_experts=shared,
                      moe_shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length", 0) or 0),
                      routed_scaling_factor=float(get("expert_weights_scale", 1.0)),
                      norm_topk_prob=bool(get("expert_weights_norm", True)),
                      n_group=int(get("expert_group_count", 1) or 1),
                      topk_group=int(get("expert_group_used_count", 1) or 1),
                      moe_latent_size=int(latent) if latent else None)
    return {k: v for k, v in fields.items() if v is not None}


def _granite_config(get, path, layers, kv, head_dim, hidden, heads, inner, mamba_heads, conv_bias, proj_bias, rope,
                    common) -> dict:
    """The granitehybrid half of hybrid_config: Bamba's config or Granite 4.0's (module docstring)."""
    scales = [float(get(k, 1.0)) for k in ("embedding_scale", "residual_scale", "logit_scale")]
    attention_scale = float(get("attention.scale", head_dim ** -0.5))
    rotates = bool(get("rope.scaling.finetuned", False))
    rotary = int(get("rope.dimension_count", head_dim))
    experts = int(get("expert_count", 0) or 0)
    if inner % hidden:
        raise ModelLoadError(f"{path}: this granitehybrid GGUF's Mamba width ({inner}) is not a whole multiple of the "
                             f"model width ({hidden}), which Granite 4.0's and Bamba's configs (mamba_expand) need; "
                             f"the file cannot be loaded.")
    mamba = dict(mamba_n_heads=mamba_heads, mamba_d_head=inner // mamba_heads, mamba_n_groups=int(get("ssm.group_count")),
                 mamba_d_state=int(get("ssm.state_size")), mamba_d_conv=int(get("ssm.conv_kernel")),
                 mamba_expand=inner // hidden, mamba_conv_bias=conv_bias, mamba_proj_bias=proj_bias,
                 rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)), rope_parameters=rope)
    if rotates and not experts and scales == [1.0, 1.0, 1.0] and abs(attention_scale * head_dim ** 0.5 - 1) < 1e-6 \
            and rotary * 2 == head_dim:  # Bamba: half of each head rotates (BambaConfig's partial_rotary_factor)
        return dict(common, **mamba, model_type="bamba", attn_layer_indices=[i for i, n in enumerate(kv) if n],
                    intermediate_size=int(get("feed_forward_length")))
    if rotates and rotary != head_dim:
        raise ModelLoadError(f"{path}: this granitehybrid GGUF rotates {rotary} of each head's {head_dim} channels "
                             f"beside Granite's multipliers, which neither Granite 4.0's nor Bamba's transformers "
                             f"config computes; the file cannot be loaded.")
    if hidden // heads != head_dim:
        raise ModelLoadError(f"{path}: this granitehybrid GGUF has {heads} heads of {head_dim} channels for a width of "
                             f"{hidden}; Granite 4.0's config takes width / heads, so it cannot be loaded.")
    width = int(get("feed_forward_length"))
    fields = dict(common, **mamba, model_type="granitemoehybrid",
                  layer_types=["linear_attention" if n == 0 else "full_attention" for n in kv],
                  position_embedding_type="rope" if rotates else None, embedding_multiplier=scales[0],
                  residual_multiplier=scales[1], logits_scaling=scales[2], attention_multiplier=attention_scale,
                  shared_intermediate_size=width, num_local_experts=experts)
    if experts:  # Granite 4.0-H Tiny / Small: feed_forward_length is the experts' width, the shared MLP's own key
        fields.update(intermediate_size=width, num_experts_per_tok=int(get("expert_used_count")),
                      shared_intermediate_size=int(get("expert_shared_feed_forward_length", width)))
    return fields


def gguf_layout(shapes: dict, hf_config, arch: str) -> tuple[dict[str, list[tuple[str, int | None]]], object]:
    """({our tensor name: [(GGUF tensor name, the dimension the parts join along or None)]} as export/gguf_parts.py
    writes each tensor of a model with `shapes` ({state dict name: shape}) and config `hf_config` into architecture
    `arch`, the model's ModelConfig)."""
    import gguf

    from fasttune.export.gguf_parts import gguf_parts
    from fasttune.models.config import ModelConfig

    cfg = ModelConfig.from_hf(hf_config)
    tensor_map = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_layers)
    layout = {}
    for name in shapes:
        full = shapes[name]
        parts = gguf_parts(name, torch.empty(full, device="meta"), cfg, arch, tensor_map)
        first = next(iter(parts.values()))
        # (split parts keep every dimension but the one chunked)
        dim = next((d for d in range(len(full)) if first.shape[d] != full[d]), None) if len(parts) > 1 else None
        layout[name] = [(g, dim) for g in parts]
    return layout, cfg


def from_gguf(name: str, t: torch.Tensor, cfg, arch: str) -> torch.Tensor:
    """One of the model's tensors as joined from the file (float32) -> transformers' layout (module docstring): the
    Mamba mixer's A_log, D, gated norm and conv; granitehybrid's q / k rows back from llama.cpp's adjacent rotary
    pairs (cfg: the ModelConfig); the others as they are."""
    from fasttune.export.gguf_types import ROTATE_PAIRS, interleave_rotary_rows

    if arch in ROTATE_PAIRS and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
        return interleave_rotary_rows(t, heads, cfg.rotary_dim, inverse=True)
    mixer = ".mamba." in name or (".mixer." in name and name.endswith(("A_log", "D", "conv1d.weight")))
    gated_norm = name.endswith((".mamba.norm.weight", ".mixer.norm.weight"))
    if name.endswith(".A_log") and mixer:
        return (-t).log().reshape(-1)
    if (name.endswith(".D") and mixer) or gated_norm:
        return t.reshape(-1)
    if name.endswith("conv1d.weight") and mixer:
        return t.reshape(t.shape[0], 1, -1)
    return t
