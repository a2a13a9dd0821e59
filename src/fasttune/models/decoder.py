"""The one decoder: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3, and the MoE families qwen3_moe and mixtral
(sparse MLP in models/moe.py) and gpt_oss (attention sinks in models/self_attention.py, its MoE MLP in
models/gpt_oss.py) — family quirks are ModelConfig fields. Each layer's self-attention is models/self_attention.py's
`Attention`, its dense MLP models/mlp.py's `MLP`, its norms models/norm.py's `RMSNorm`.

Module and parameter names mirror transformers' (`model.layers.0.self_attn.q_proj.weight`), so HF state dicts
load without renaming and adapters use PEFT's key names. The transformers model around this backbone (LM head, loss,
generation, saving) is models/causal_lm.py's `CausalLM`.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutput, MoeModelOutputWithPast

from fasttune.errors import ConfigError
from fasttune.kernels.rebuild import lean_saves
from fasttune.kernels.rope import mrope_cos_sin, rope_attention_factor, rope_cos_sin, rope_inv_freq
from fasttune.models.config import ModelConfig
from fasttune.models.cross_attention import CrossAttention, cross_layer
from fasttune.models.kept_block import block_pays
from fasttune.models.kv_cache import KVCache
from fasttune.models.masks import (build_masks, packed_segments, padding_runs, right_padded,
                                   segments_from_boundaries)
from fasttune.models.gated_deltanet import GatedDeltaNet, segment_spans
from fasttune.models.short_conv import ShortConv
from fasttune.models.mamba2 import Mamba2Mixer
from fasttune.models.gemma4 import (add_experts, add_per_layer_input, build_experts, build_per_layer_input,
                                    build_per_layer_tables, last_position, per_layer_inputs)
from fasttune.models.mla import LatentAttention
from fasttune.models.gpt_oss import GptOssMoeBlock
from fasttune.models.moe import SparseMoeBlock
from fasttune.models.offload import LayerInputOffloader, kept_block, offloaded_layer, recomputing
from fasttune.models.mlp import MLP
from fasttune.models.varlen import FLASH_MAX_HEAD_DIM, packed_spans, varlen_usable
from fasttune.models.norm import RMSNorm
from fasttune.models.word_embedding import word_embedding
from fasttune.models.self_attention import Attention


# The sandwich block's norms (after attention, before the MLP, after the MLP) as each family names them.
SANDWICH_NAMES = {"gemma2": ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
                  "glm4": ("post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
                  "lfm3": ("post_operator_norm", "ffn_norm", "post_ffn_norm")}
# A pre-norm block's two norms (before attention, before the MLP) where a family renames them (Apertus).
PRE_NORM_NAMES = {"apertus": ("attention_layernorm", "feedforward_layernorm"), "lfm2": ("operator_norm", "ffn_norm"),
                  "lfm3": ("operator_norm", "ffn_norm"), "lfm2_moe": ("operator_norm", "ffn_norm"),
                  "bamba": ("input_layernorm", "pre_ff_layernorm")}


class DecoderLayer(nn.Module):
    """One pre-norm decoder block (attention, then dense MLP or sparse MoE), with Gemma 2/3's four norms when
    `sandwich_norm` (GLM-4's under its own names), or OLMo 2/3's two norms after attention and MLP when `post_norm`;
    names as transformers' `model.layers.N`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        eps, off, f32 = cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_scale_fp32
        centered = cfg.centered_norm  # (Cohere's LayerNorms)
        self.kind = cfg.layer_kinds[layer_idx] if cfg.layer_kinds else None
        self.parallel_mamba = cfg.parallel_mamba
        if self.kind is not None:  # Nemotron-H: one norm and one mixer
            self._single_mixer(cfg, layer_idx)
            return
        if self.parallel_mamba:  # Falcon-H1: attention and Mamba side by side
            self._attention_beside_mamba(cfg, layer_idx)
            return
        # the token mixer: softmax attention, Qwen3.5's gated DeltaNet (models/gated_deltanet.py) or LFM2's short
        # convolution (models/short_conv.py)
        self.layer_idx = layer_idx
        self.is_linear = bool(cfg.linear_layers and cfg.linear_layers[layer_idx])
        # Llama 3.2 Vision: attends to the image features, with tanh gates on both sublayers (cross_attention.py)
        self.is_cross = layer_idx in cfg.cross_attention_layers
        if self.is_cross:
            self.mixer_name, mixer = "cross_attn", CrossAttention(cfg, layer_idx)
            self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
            self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))
        elif not self.is_linear:
            self.mixer_name = "self_attn"
            # (the latents' norms take RMSNorm's default eps in transformers, not rms_norm_eps)
            mixer = LatentAttention(cfg, layer_idx, lambda dim: RMSNorm(dim, 1e-6, off)) if cfg.kv_lora_rank else \
                Attention(cfg.layer_config(layer_idx), layer_idx)
        elif cfg.linear_kind == "short_conv":
            self.mixer_name, mixer = "conv", ShortConv(cfg, layer_idx)
        elif cfg.linear_kind == "mamba2":
            self.mixer_name, mixer = "mamba", Mamba2Mixer(cfg, layer_idx)
        else:
            self.mixer_name, mixer = "linear_attn", GatedDeltaNet(cfg, layer_idx)
        setattr(self, self.mixer_name, mixer)
        self.is_moe = bool(cfg.moe_layers and cfg.moe_layers[layer_idx])
        if not self.is_moe:  # (Gemma 4's shared key/value layers may have MLPs twice as wide)
            wide = cfg.double_wide_mlp and cfg.kv_source(layer_idx) is not None
            mlp = MLP(replace(cfg, intermediate_size=2 * cfg.intermediate_size) if wide else cfg)
        elif cfg.moe_block == "gpt_oss":
            mlp = GptOssMoeBlock(cfg)
        else:  # Qwen3.5-MoE's shared expert is our dense MLP at its own width
            shared = MLP(replace(cfg, intermediate_size=cfg.shared_expert_size)) if cfg.shared_expert_size else None
            mlp = SparseMoeBlock(cfg, shared)
        self.mlp_name = cfg.moe_name if self.is_moe else cfg.module_name("mlp")
        setattr(self, self.mlp_name, mlp)
        self.shared_beside = self.is_moe and cfg.shared_mlp_beside
        if self.shared_beside:  # Granite 4.0-H: the dense MLP added to the experts' output
            self.shared_mlp = MLP(cfg)
        self.post_norm = cfg.post_norm
        self.residual_multiplier = cfg.residual_multiplier  # Granite
        renamed = PRE_NORM_NAMES.get(cfg.model_type)
        self.pre_norm_names = renamed or ("input_layernorm", "post_attention_layernorm")
        # Cohere 2: attention and MLP side by side on the one input_layernorm's output (see forward)
        self.parallel = cfg.parallel_block
        if not self.post_norm:
            setattr(self, self.pre_norm_names[0], RMSNorm(cfg.hidden_size, eps, off, f32, centered))
        self.sandwich = cfg.sandwich_norm
        # the three norms of a sandwich block (after attention, before and after the MLP) by transformers' names
        self.norm_names = SANDWICH_NAMES.get(cfg.model_type, SANDWICH_NAMES["gemma2"])
        if self.sandwich:
            for name in self.norm_names:
                setattr(self, name, RMSNorm(cfg.hidden_size, eps, off, f32))
        elif not self.parallel:
            setattr(self, self.pre_norm_names[1], RMSNorm(cfg.hidden_size, eps, off, f32))
        if self.post_norm:
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off, f32)
        # Gemma 4: the layer's output times this (a checkpoint buffer, transformers' name)
        self.register_buffer("layer_scalar", torch.ones(1) if cfg.layer_scalar else None)
        self.act = cfg.hidden_act
        if cfg.per_layer_input_size:  # Gemma 4's per-layer embeddings (models/gemma4.py)
            build_per_layer_input(self, cfg, lambda dim: RMSNorm(dim, eps, off, f32))
        self.routed_beside = cfg.moe_block == "gemma4"  # Gemma 4 26B-A4B: experts beside the dense MLP
        if self.routed_beside:
            build_experts(self, cfg, lambda dim: RMSNorm(dim, eps, off, f32))

    def _single_mixer(self, cfg: ModelConfig, layer_idx: int):
        """A Nemotron-H layer (transformers' NemotronHBlock): `norm` and `mixer`, a Mamba-2 mixer, attention, an MLP
        or (Nemotron 3) an MoE block by cfg.layer_kinds; forward is x + mixer(norm(x)). The two-sublayer layers'
        other attributes are not set: forward and unsummed return before reading them."""
        self.layer_idx, self.is_cross, self.parallel = layer_idx, False, False
        self.is_linear, self.is_moe = self.kind == "mamba", self.kind == "moe"
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_scale_fp32)
        if self.kind == "mamba":
            mixer = Mamba2Mixer(cfg, layer_idx)
        elif self.kind == "attention":
            mixer = Attention(cfg.layer_config(layer_idx), layer_idx)
            mixer.keeps_block = False  # (the kept block belongs to the two-sublayer layer's residual adds)
        elif self.kind == "moe":  # Nemotron 3: routed ReLU² experts and the shared ones (an ungated MLP)
            shared = MLP(replace(cfg, intermediate_size=cfg.shared_expert_size)) if cfg.shared_expert_size else None
            mixer = SparseMoeBlock(cfg, shared)
            mixer.rope_kind, mixer.keeps_block = "global", False  # (the layer loop reads them off every mixer)
        else:
            mixer = MLP(cfg)
        self.mixer_name = self.mlp_name = "mixer"
        self.mixer = mixer  # (registered in _modules by nn.Module; the `mixer` property reads it from there)

    def _attention_beside_mamba(self, cfg: ModelConfig, layer_idx: int):
        """A Falcon-H1 layer (transformers' FalconH1DecoderLayer): `self_attn` and `mamba` on the same
        input_layernorm output, their outputs scaled and added (parallel_multipliers), then `feed_forward` after
        pre_ff_layernorm. The two-sublayer layers' other attributes are not set: forward and unsummed return before
        reading them."""
        self.layer_idx, self.is_cross, self.is_moe = layer_idx, False, False
        self.parallel, self.is_linear = False, False
        eps, off, f32 = cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_scale_fp32
        self.mixer_name, self.mlp_name = "self_attn", "feed_forward"
        self.self_attn = Attention(cfg.layer_config(layer_idx), layer_idx)
        self.self_attn.keeps_block = False  # (the kept block belongs to the two-sublayer layer's residual adds)
        self.mamba = Mamba2Mixer(cfg, layer_idx)
        self.feed_forward = MLP(cfg)
        self.pre_norm_names = ("input_layernorm", "pre_ff_layernorm")
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off, f32)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, eps, off, f32)
        self.multipliers = cfg.parallel_multipliers

    def unsummed(self, x, h, cos, sin, mask, cache: KVCache | None = None, per_layer_input=None):
        """The layer applied to x + h (h: the previous layer's unsummed output, or None), returning (x', h') whose
        sum is the layer's output: the residual add joins the next norm's kernel (a decode step's loop; inference
        only). Plain pre-norm blocks; MoE, sandwich- and post-norm layers sum first and return h' None."""
        if self.kind is not None or self.parallel_mamba or self.is_moe or self.sandwich or self.post_norm or \
                self.is_cross or self.parallel:
            return self(x if h is None else x + h, cos, sin, mask, cache, per_layer_input=per_layer_input), None
        x, normed = self.attn_norm.with_residual(x, h)
        h = self._scaled(self.mixer(normed, cos, sin, mask, cache))
        x, normed = self.mlp_norm.with_residual(x, h)
        return x, self._scaled(self.ffn(normed))

    @property
    def mixer(self) -> nn.Module:
        """The layer's token mixer: `self_attn` (Attention), `linear_attn` (GatedDeltaNet) in Qwen3.5's linear
        layers, `conv` (ShortConv) in LFM2's, `mamba` (Mamba2Mixer) in Granite 4.0's; a Nemotron-H layer's one
        `mixer` (a Mamba-2 mixer, attention or its MLP)."""
        return self._modules[self.mixer_name]

    @property
    def ffn(self) -> nn.Module:
        """The layer's MLP or MoE block (`mlp`, or the family's name for it; a Nemotron-H layer's mixer)."""
        return self._modules[self.mlp_name]

    @property
    def attn_norm(self) -> nn.Module:
        """The norm before attention (input_layernorm, or the family's name for it)."""
        return getattr(self, self.pre_norm_names[0])

    @property
    def mlp_norm(self) -> nn.Module:
        """The norm before the MLP in a pre-norm block (post_attention_layernorm, or the family's name for it)."""
        return getattr(self, self.pre_norm_names[1])

    def _scaled(self, h):
        """A sublayer's output as its residual add takes it: times Granite's residual_multiplier."""
        return h if self.residual_multiplier is None else h * self.residual_multiplier

    def _post_attention(self, x, h, cache):
        """(s, post_attention_layernorm(s)) for s = x + h. With the attention block kept ("offload",
        models/kept_block.py) the forward pass keeps s, and the recompute takes it back in place of x + h, whose
        o_proj part it skipped."""
        block = kept_block() if self.mixer.keeps_block and cache is None else None
        if block is not None and block[2]:
            keeper, slot, _ = block
            return self.mlp_norm.with_residual(keeper.substitute(slot, "h", x, h))
        x, normed = self.mlp_norm.with_residual(x, h)
        if block is not None:
            block[0].keep(block[1], "h", x)
        return x, normed

    def _sandwich(self, x, cos, sin, mask, cache, per_layer_input=None, shared_kv=None):
        """The four-norm block (Gemma 2/3/4, GLM-4); Gemma 4's per-layer input and layer_scalar; a layer whose keys
        and values a later layer reuses returns (x, k, v) outside generation (Attention.forward)."""
        post_attn, pre_mlp, post_mlp = (getattr(self, name) for name in self.norm_names)
        if shared_kv is None:
            h = self.mixer(self.attn_norm(x), cos, sin, mask, cache)
        else:  # Gemma 4's shared key/value layers in training
            h = self.mixer(self.attn_norm(x), cos, sin, mask, cache, shared_kv)
        kv = ()
        if isinstance(h, tuple):
            h, *kv = h
        x, normed = pre_mlp.with_residual(x, post_attn(h))
        out = self.ffn(normed)
        x = x + post_mlp(add_experts(self, x, out) if self.routed_beside else out)
        if per_layer_input is not None:
            x = add_per_layer_input(self, x, per_layer_input, self.act)
        x = x if self.layer_scalar is None else x * self.layer_scalar
        return (x, *kv) if kv else x

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, router_logits: bool = False,
                per_layer_input=None, shared_kv=None):
        """x (B, T, H) -> (B, T, H); an MoE layer asked for router_logits returns (x, logits (B*T, E)); Gemma 4:
        per_layer_input (B, T, P) this layer's per-layer embedding, shared_kv the (k, v) a shared key/value layer
        attends over, and a layer whose keys and values are reused returns (x, k, v) outside generation. A
        cross-attention layer (Llama 3.2 Vision) reads mask["cross"] (models/cross_attention.py)."""
        if self.parallel_mamba:  # Falcon-H1: x + mamba(n) * m_ssm_out + attention(n * m_attn_in) * m_attn_out
            attn_in, attn_out, _, ssm_out = self.multipliers
            normed = self.input_layernorm(x)
            h = self.mamba(normed, cos, sin, mask, cache) * ssm_out
            x = x + h + self.self_attn(normed * attn_in, cos, sin, mask, cache) * attn_out
            return x + self.feed_forward(self.pre_ff_layernorm(x), values_unused=recomputing())
        if self.kind is not None:  # Nemotron-H: x + mixer(norm(x))
            normed = self.norm(x)
            if self.kind == "mlp":
                return x + self.mixer(normed, values_unused=recomputing())
            if self.kind == "moe":
                h, logits = self.mixer(normed)
                return (x + h, logits) if router_logits else x + h
            return x + self.mixer(normed, cos, sin, mask, cache)
        if self.is_cross:
            return cross_layer(self, x, mask, cache)
        if self.parallel:  # Cohere 2: x + attention(n) + mlp(n), n = input_layernorm(x)
            normed = self.attn_norm(x)
            return x + self.mixer(normed, cos, sin, mask, cache) + self.ffn(normed)
        if self.is_moe:
            x, normed = self.attn_norm.with_residual(x)
            x, normed = self._post_attention(x, self._scaled(self.mixer(normed, cos, sin, mask, cache)), cache)
            h, logits = self.ffn(normed)
            if self.shared_beside:  # Granite 4.0-H: experts + shared MLP
                h = h + self.shared_mlp(normed)
            h = self._scaled(h)
            return (x + h, logits) if router_logits else x + h
        if self.post_norm:  # OLMo 2/3: the sublayers' outputs are normed, their inputs are not
            x = x + self.post_attention_layernorm(self.mixer(x, cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.ffn(x))
        if self.sandwich:  # Gemma 2, GLM-4: norm after attention and around the MLP
            return self._sandwich(x, cos, sin, mask, cache, per_layer_input, shared_kv)
        x, normed = self.attn_norm.with_residual(x)
        h = self._scaled(self.mixer(normed, cos, sin, mask, cache))
        x, normed = self._post_attention(x, h, cache)
        # Re-run inside backward, the layer's output value is discarded and the add's backward needs no values:
        # down_proj's base GEMM is skipped (kernels/lora.py). Gemma 2's post-MLP norm needs them, so not there.
        return x + self._scaled(self.ffn(normed, values_unused=recomputing()))


class DecoderModel(nn.Module):
    """The backbone (transformers' `model.model`): embeddings, layers, final norm. `forward` returns the final
    hidden state as transformers' base models do, so code that runs the backbone itself (TRL's fused LM head,
    reached through `model.base_model`) gets our kernels too."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.arch = cfg
        # (Gemma: scaled inside; Llama 3.2 Vision: rows past the vocabulary)
        self.embed_tokens = word_embedding(cfg.vocab_size + cfg.extra_embeddings, cfg.hidden_size, cfg.embed_scale)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm_name = cfg.module_name("norm")
        setattr(self, self.norm_name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset,
                                              cfg.norm_scale_fp32, cfg.centered_norm))
        if cfg.per_layer_input_size:  # Gemma 4's per-layer embeddings (models/gemma4.py)
            build_per_layer_tables(self, cfg, lambda dim: RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_offset,
                                                                  cfg.norm_scale_fp32))
        self.gradient_checkpointing: str | bool = False  # "auto" | True | False | "offload" (see api.py)
        # With recompute on: how many layers, from the first, are recomputed; the later ones keep their activations
        # (use_gradient_checkpointing="auto" sets it to fill the free memory, train/memory_policy.py). None: all.
        self.recompute_layers: int | None = None
        # Norms' and activations' outputs rebuilt in backward instead of kept (kernels/rebuild.py), in the layers
        # that keep their activations ("auto" turns it on when memory is the limit, train/memory_policy.py). Not in
        # a recomputed layer's re-run: its backward follows at once, so its peak would fall by the norms' outputs
        # at most (the activation is rebuilt while the rest is alive)
        self.lean_saves = False
        # whether any layer's mixer can keep its attention block under "offload" (models/kept_block.py)
        self.blocks_keepable = any(layer.mixer.keeps_block for layer in self.layers)
        self._inv_freq: dict = {}

    @property
    def final_norm(self) -> RMSNorm:
        """The norm after the last layer (`norm`, or the family's name for it: LFM2's embedding_norm)."""
        return getattr(self, self.norm_name)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the final norm's weight dtype)."""
        return self.final_norm.weight.dtype

    def inv_freq(self, device, local: bool = False) -> torch.Tensor:
        """RoPE inverse frequencies (rotary_dim / 2,) fp32 on `device`, cached; local=True: Gemma 3's
        sliding-window base."""
        key = (device, local)
        if key not in self._inv_freq:
            c = self.arch
            freq = (rope_inv_freq(c.rotary_dim, c.rope_local_theta) if local else
                    rope_inv_freq(c.global_rotary_dim, c.rope_theta, c.rope_scaling))
            self._inv_freq[key] = freq.to(device)
        return self._inv_freq[key]

    @property
    def rope_scale(self) -> float:
        """The factor on cos/sin of the global RoPE (yarn's attention factor; 1.0 otherwise)."""
        return rope_attention_factor(self.arch.rope_scaling)

    def rope_tables(self, position_ids, dtype) -> dict:
        """cos/sin per RoPE kind: "global", "local" for Gemma 3's sliding-window layers, and "none" (cos 1, sin 0:
        rotation by nothing) for SmolLM3's NoPE layers. position_ids (B, T), or (3, B, T) temporal/height/width
        positions for multimodal RoPE (models/vision.py)."""
        if position_ids.dim() == 3:
            return {"global": mrope_cos_sin(self.inv_freq(position_ids.device), position_ids,
                                            self.arch.mrope_section, dtype, self.arch.mrope_interleaved)}
        tables = {"global": rope_cos_sin(self.inv_freq(position_ids.device), position_ids, dtype, self.rope_scale)}
        if self.arch.rope_local_theta is not None:
            tables["local"] = rope_cos_sin(self.inv_freq(position_ids.device, local=True), position_ids, dtype)
        if not all(self.arch.rope_layers or [True]):
            cos = tables["global"][0]
            tables["none"] = (torch.ones_like(cos), torch.zeros_like(cos))
        return tables

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: KVCache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, segment_ids=None, return_dict: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                cache_position=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                max_length_k=None, seq_idx=None, output_router_logits: bool = False,
                image_blocks=None, deepstack=None, last_only: bool = False, per_layer_ids=None,
                logits_to_keep: int = 0, cross=None) -> BaseModelOutput:
        """input_ids (B, T) int64 or inputs_embeds (B, T, H) -> `.last_hidden_state` (B, T, H), final norm applied.

        attention_mask (B, past + T), 1 = real token; position_ids (B, T): positions that restart at 0 inside a row
        with no attention_mask mark packed documents (as transformers reads padding-free batches), which then
        attend only within themselves. last_only (generation, with a KVCache): only the last position's output is
        needed, so Gemma 4's shared key/value layers, which write no cache, run on it alone (transformers' prefill
        does the same); `.last_hidden_state` is then (B, 1, H). per_layer_ids (B, T): the ids Gemma 4's per-layer
        embeddings look up when inputs_embeds are given (models/gemma4.py).
        cu_seq_lens_q/k (D + 1,) int32: the document boundaries of a padding-free row (B = 1) as TRL's collator
        and flash attention write them (max_length_q/k are implied by them);
        seq_idx (B, T): the same documents as ids per token (TRL writes both; they are used as segment_ids).
        `past_key_values`: a KVCache to read and extend (generation).
        `use_cache`/`cache_position`/`return_dict` are accepted for transformers' callers: the cache is only
        the KVCache passed in; so is `logits_to_keep` (transformers' base models take it in their keyword arguments
        and return every position, which TRL's DistillationTrainer then slices). output_router_logits (MoE): also `.router_logits`, one (B*T, E) tensor per sparse
        layer (a MoeModelOutputWithPast). image_blocks (B, T) long: a vision-language model's image tokens that
        attend to each other both ways (Gemma 3), the k-th image's run of tokens k, text -1 (models/vision.py).
        deepstack (Qwen3-VL): (image-token mask (B, T) bool, [(image tokens, H)] per layer): layer i's output gets
        the i-th features added at the image tokens (transformers' Qwen3VLTextModel._deepstack_process).
        cross (Llama 3.2 Vision): the cross-attention layers' CrossInputs (models/cross_attention.py), or None (those
        layers skipped, or in generation their cached image keys / values with the prompt's last mask row).
        Raises ConfigError for output_attentions / output_hidden_states."""
        _refuse_extra_outputs(output_attentions, output_hidden_states)
        cfg = self.arch
        # Gemma scales inside its embedding module (models/word_embedding.py, as transformers 5's
        # *TextScaledWordEmbedding), so embeddings passed in are used as given, as transformers' Gemma models use them.
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = x.to(self.dtype)
        b, t = x.shape[:2]
        if cfg.embedding_multiplier is not None and (inputs_embeds is None or not cfg.embedding_multiplier_ids_only):
            x = x * cfg.embedding_multiplier  # (Granite scales given embeddings too, Falcon-H1 looked-up ids only)
        # Gemma 4's per-layer embeddings, looked up by id: input_ids, or with inputs_embeds that hold images, the ids
        # with the pad token at the image positions (per_layer_ids, models/vision.py)
        ple = per_layer_inputs(self, input_ids if input_ids is not None else per_layer_ids, x) \
            if cfg.per_layer_input_size else None
        past = past_key_values.length if past_key_values is not None else 0
        if attention_mask is not None and past == 0 and image_blocks is None and right_padded(attention_mask):
            # No padding, or padding only after each row's tokens (what transformers', TRL's and our collators
            # pass): under a causal mask no real token sees a later pad, so plain causal attention gives the real
            # positions the same values, and a dense mask would keep SDPA off its causal kernels. Only the
            # (ignored) outputs at pad positions differ. A prompt's prefill into an empty cache likewise (generate()
            # refuses right padding, so there it is a prompt without padding).
            attention_mask = None
        windows = set(cfg.sliding_windows)
        # Layers with heads wider than flash attention takes (Gemma 4's full layers) keep dense masks; the others
        # still go varlen when that is usable for them.
        wide = cfg.windows_wider_than(FLASH_MAX_HEAD_DIM)
        varlen_ok = not cfg.attn_sinks and bool(windows - wide) and varlen_usable(
            x, cfg.attn_logit_softcap, windows - wide, cfg.head_dim)
        if attention_mask is not None and past_key_values is None and image_blocks is None and segment_ids is None \
                and seq_idx is None and cu_seq_lens_q is None and attention_mask.shape[1] == t and varlen_ok:
            # Left padding (or padding on both sides, as GRPO's prompt + completion rows have): each row's tokens are
            # one run, attended causally as one varlen sequence instead of through a dense (B, T, T) mask. Only the
            # outputs at padding positions differ (made from padding either way), so does the prediction a padding
            # position makes of the first real token, which no collator makes a target.
            runs = padding_runs(attention_mask)
            if runs is not None:
                segment_ids, attention_mask = runs, None
        # Padding-free documents, from the most explicit description given (seq_idx needs no host sync).
        if segment_ids is None and seq_idx is not None:
            segment_ids = seq_idx
        elif segment_ids is None and cu_seq_lens_q is not None:
            segment_ids = segments_from_boundaries(cu_seq_lens_q, cu_seq_lens_k, b, t)
        given_positions = position_ids is not None
        if position_ids is not None and position_ids.dim() == 3:
            position_ids = mrope_positions(position_ids, self.arch)
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device).expand(b, t)
        elif segment_ids is None and attention_mask is None and past_key_values is None and position_ids.dim() == 2:
            segment_ids = packed_segments(position_ids)
        ropes = self.rope_tables(position_ids, x.dtype)
        # Varlen attention has no sink term: models with sinks take the masked SDPA path.
        if segment_ids is not None and past_key_values is None and image_blocks is None and varlen_ok:
            masks = {"varlen": packed_spans(segment_ids)}
            if wide:  # their layers find their window's dense mask here and take it (Attention.attend)
                masks.update(build_masks(None, t, x.device, wide, past, segment_ids))
        else:
            masks = build_masks(attention_mask, t, x.device, windows, past, segment_ids, image_blocks,
                                not cfg.image_blocks_sliding_only, window_kernels=past == 0,
                                blocks_beyond_window=cfg.blocks_beyond_window)
        if cfg.query_position_scale is not None and (given_positions or past + t > cfg.query_position_scale[1]):
            masks = {**masks, "query_scale": query_scales(cfg, position_ids, x.dtype)}
        if cfg.linear_layers:  # what Qwen3.5's and LFM2's linear layers read (gated_deltanet.py, short_conv.py)
            masks = {**masks, "padding": attention_mask, "segments": segment_ids,
                     "spans": None if segment_ids is None else segment_spans(segment_ids)}
        if cfg.cross_attention_layers:
            if cross is None and past_key_values is not None:  # a step after the prompt: its last mask row
                cross = past_key_values.cross_last
            elif cross is not None and past_key_values is not None:
                past_key_values.cross_last = cross.last()
            masks = {**masks, "cross": cross}
        router_logits = []
        deep_mask, deep_feats = deepstack if deepstack is not None else (None, [])
        if past_key_values is None:
            offload = self._offloader(x)
            shared = {}  # Gemma 4: layer index -> the (k, v) later layers reuse
            recomputed = len(self.layers) if self.recompute_layers is None else self.recompute_layers
            for i, layer in enumerate(self.layers):
                source = getattr(layer.mixer, "kv_source", None)
                recompute = offload is not None and i < recomputed
                if offload is not None and i == recomputed:  # the last offloaded layer's tensors, before the kept
                    offload[0].release_copied()  # layers allocate (LayerInputOffloader.save)
                with lean_saves(self.lean_saves and not recompute):
                    x = self._run_layer(layer, x, *ropes[layer.mixer.rope_kind], masks, offload if recompute else None,
                                        output_router_logits and layer.is_moe, None if ple is None else ple[:, :, i],
                                        None if source is None else shared[source])
                if getattr(layer.mixer, "kv_stored", False):
                    x, *shared[i] = x
                elif isinstance(x, tuple):
                    x, logits = x
                    router_logits.append(logits)
                if i < len(deep_feats):
                    x = add_at(x, deep_mask, deep_feats[i])
            if offload is not None:
                offload[0].release_copied()
        else:  # generation: no recompute, keys/values go to the cache
            first_shared = cfg.num_layers - cfg.kv_shared_layers if last_only and t > 1 and cfg.kv_shared_layers \
                else None
            for i, layer in enumerate(self.layers):
                if i == first_shared:  # the rest write no cache: only the last position's output is wanted
                    x, ple, ropes, masks = last_position(x, ple, ropes, masks)
                x = layer(x, *ropes[layer.mixer.rope_kind], masks, past_key_values,
                          per_layer_input=None if ple is None else ple[:, :, i])
                if i < len(deep_feats):
                    x = add_at(x, deep_mask, deep_feats[i])
            past_key_values.length += t
        if output_router_logits:
            return MoeModelOutputWithPast(last_hidden_state=self.final_norm(x), router_logits=tuple(router_logits))
        return BaseModelOutput(last_hidden_state=self.final_norm(x))

    def _checkpoint_mode(self, x):
        mode = self.gradient_checkpointing
        if mode == "auto":  # outside the trainer, which resolves it from the batch shape: be safe on GPUs
            mode = x.is_cuda
        return mode if self.training and torch.is_grad_enabled() else False

    def _offloader(self, x):
        """(saved-input store, anchor) for one forward pass with recompute, else None (see models/offload.py)."""
        mode = self._checkpoint_mode(x)
        if not mode:
            return None
        store = LayerInputOffloader(x.device, offload=mode == "offload")
        # the attention outputs go to the host too: the recompute skips the attention kernel (models whose every
        # layer attends; Qwen3.5's linear-attention layers keep nothing)
        if mode == "offload" and not self.arch.linear_layers:
            b, t, _ = x.shape
            arch, size = self.arch, x.element_size()
            layers, per_input = arch.num_layers, x.numel() * size
            width = max(arch.value_dim, arch.global_head_dim)  # (Gemma 4's full layers: wider heads)
            if store.keep_attention(layers, per_input, b * t * arch.num_heads * width * size) and \
                    self.blocks_keepable and (store.side is None or block_pays(arch, t, size)):
                # and q/k/v with the post-attention residual: the recompute skips the attention block's projections
                # (on a CPU always: no copies, and the tests take this path)
                qkv = b * t * (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim * size
                store.keep_block(layers, per_input, qkv + per_input)
        return store, torch.empty(0, device=x.device, requires_grad=True)

    def _run_layer(self, layer, x, cos, sin, masks, offload=None, router_logits: bool = False, per_layer_input=None,
                   shared_kv=None):
        if not layer.is_cross and masks.get("cross") is not None:
            # Only cross-attention layers read the image features. Under FSDP every input that requires grad is
            # wrapped for its post-backward hook, whose backward then sends zeros into the (trained) tower's graph,
            # and from inside a recompute that means running the forward pass's graph backward early: a failure.
            masks = {k: v for k, v in masks.items() if k != "cross"}
        if offload is None:
            return layer(x, cos, sin, masks, router_logits=router_logits, per_layer_input=per_layer_input,
                         shared_kv=shared_kv)
        cross = masks.get("cross") if layer.is_cross else None
        if cross is not None and cross.states is not None:  # the image features go in as an input, so that their
            # gradient (a training projector or tower) comes out of the recompute
            def run_cross(h, states):
                """The cross-attention layer on h (B, T, H) with the image features `states` (B, V, H)."""
                return layer(h, cos, sin, {**masks, "cross": replace(cross, states=states)})
            return offloaded_layer(run_cross, x, *offload, extras=(cross.states,))
        # Only the layer input is kept (with "offload": in pinned CPU memory, copied on a side stream and
        # brought back ahead of the recompute); backward recomputes the layer from it. Gemma 4's per-layer input
        # and shared keys / values go in as further inputs, so their gradients come out of the recompute.
        has_ple = per_layer_input is not None
        extras = ((per_layer_input,) if has_ple else ()) + tuple(shared_kv or ())

        def run(h, *more):
            """The layer on h (B, T, H), with `extras` as `more` (the per-layer input first where there is one)."""
            kv = tuple(more[1:] if has_ple else more)
            return layer(h, cos, sin, masks, router_logits=router_logits, per_layer_input=more[0] if has_ple else None,
                         shared_kv=kv or None)
        return offloaded_layer(run, x, *offload, extras=extras)



def query_scales(cfg: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ministral 3's per-position query factors (B, T, 1, 1) in `dtype` from position_ids (B, T):
    1 + beta * ln(1 + floor(p / original_max_position_embeddings)) (transformers' get_llama_4_attn_scale, in fp32),
    for cfg.query_position_scale = (beta, original max). Positions below the original length get exactly 1."""
    beta, original = cfg.query_position_scale
    scale = 1 + beta * torch.log(1 + torch.floor(position_ids / original))
    return scale[..., None, None].to(dtype)


def add_at(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (B, T, H) with values (mask.sum(), H) added at the positions where mask (B, T) is True, out of place."""
    return x.masked_scatter(mask[..., None].expand_as(x), x[mask] + values.to(x.dtype))


def mrope_positions(position_ids: torch.Tensor, arch: ModelConfig) -> torch.Tensor:
    """(3, B, T) positions as given, or (4, B, T) with transformers' leading text positions dropped; raises
    ConfigError on a model without multimodal RoPE."""
    if arch.mrope_section is None:
        raise ConfigError(f"position_ids of shape {tuple(position_ids.shape)}: 3-axis positions are for models with "
                          f"multimodal RoPE (Qwen2.5-VL); this {arch.model_type} model takes (batch, seq) positions.")
    if position_ids.shape[0] == 4:
        position_ids = position_ids[1:]
    if position_ids.shape[0] != 3:
        raise ConfigError(f"position_ids of shape {tuple(position_ids.shape)}: multimodal RoPE takes (3, batch, seq).")
    return position_ids



def _refuse_extra_outputs(output_attentions, output_hidden_states):
    if output_attentions or output_hidden_states:
        raise ConfigError("fasttune's decoder returns neither attention weights nor per-layer hidden states "
                          "(output_attentions / output_hidden_states): its fused attention never forms them. "
                          "Call model.model(...) for the final hidden state, or load with fast=False to run the "
                          "transformers model.")
