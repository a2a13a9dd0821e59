"""The GGML type of each tensor for a quantization method, as llama.cpp's `llama-quantize` chooses it.

A method names one of llama.cpp's file types ("mixtures"): q4_k_m is mostly Q4_K, with attn_v and ffn_down in Q6_K
on the "more bits" layers, the output projection in Q6_K, and so on. `tensor_type` follows src/llama-quant.cpp
(`llama_tensor_get_type_impl`, `tensor_type_fallback`, `tensor_allows_quantization`) for the architectures we
export (llama, qwen2, qwen3, gemma, gemma2, gemma3, phi3, smollm3, olmo2, granite, exaone4, ernie4_5, glm4,
hunyuan-dense, arcee, apertus, and the MoE qwen3moe, llama-with-experts (Mixtral) and
gpt-oss (compared for q8_0, q4_k_m and q4_0)),
without imatrix and without user overrides:
- `output.weight`, and `token_embd.weight` when the model has no separate output tensor (tied embeddings): Q6_K,
  or Q8_0 when its rows do not divide into the method's blocks (and Q8_0 stays Q8_0);
- attn_v (attn_qkv for phi3) and ffn_down get more bits on some layers: `use_more_bits(i, n)` is the first and
  last eighth of the layers plus every third layer between; q3_k_m, q3_k_l, q4_k_s, q2_k have their own rules, q2_k
  depends on the GQA ratio, and llama's 70B (80 layers, GQA) raises Q3_K/Q4_K attn_v to Q5_K;
- attn_output gets Q3_K/Q4_K/Q5_K in q2_k/q3_k_m/q3_k_l;
- a row that does not divide into the chosen type's blocks falls back (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0), and to F16 when not even 32 divides it (where llama.cpp refuses for the 32-blocks);
- 1-D tensors (norms, biases, rope factors) and the MoE router (`ffn_gate_inp`) are F32;
- MoE: the expert tensors (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`, 3-D (E, out, in)) follow the
  ffn_gate/up/down rules with the layer read from the name, quantized per row as (E * out) rows; a model with
  exactly 8 experts (Mixtral-8x7B's rules) gets attn_v and attn_k in Q8_0, and attn_output in Q5_K for q2_k,
  q3_k_s, q3_k_m, q4_k_s and q4_k_m.
llama.cpp visits the tensors in layer order, so its attn_v / ffn_down counters equal the layer index here.
"""
from __future__ import annotations

import re

# transformers' model_type -> llama.cpp's architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                 "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "smollm3": "smollm3", "olmo2": "olmo2",
                 "olmo3": "olmo2", "granite": "granite", "ministral": "llama", "ministral3": "mistral3",
                 "exaone4": "exaone4", "ernie4_5": "ernie4_5", "glm4": "glm4",
                 "hunyuan_v1_dense": "hunyuan-dense", "arcee": "arcee",
                 "apertus": "apertus", "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "lfm2": "lfm2",
                 "glm4_moe": "glm4moe", "qwen3_next": "qwen3next", "glm4_moe_lite": "deepseek2",
                 "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "gemma4_text": "gemma4",
                 "mistral4": "mistral4", "lfm2_moe": "lfm2moe", "seed_oss": "seed_oss",
                 "cohere2": "cohere2", "cohere": "command-r", "granitemoehybrid": "granitehybrid",
                 "ernie4_5_moe": "ernie4_5-moe", "nemotron_h": "nemotron_h", "bamba": "granitehybrid",
                 "falcon_h1": "falcon-h1",
                 # vision-language models' text halves
                 "qwen2_vl_text": "qwen2vl", "qwen2_5_vl_text": "qwen2vl", "qwen3_vl_text": "qwen3vl",
                 "qwen3_vl_moe_text": "qwen3vlmoe",
                 "qwen3_moe": "qwen3moe",
                 "mixtral": "llama", "gpt_oss": "gpt-oss"}


def architecture(cfg) -> str:
    """llama.cpp's architecture name for a ModelConfig: ARCHITECTURES by model_type, except that Nemotron-H with
    experts (Nemotron 3) is llama.cpp's nemotron_h_moe."""
    if cfg.model_type == "nemotron_h" and cfg.num_experts:
        return "nemotron_h_moe"
    return ARCHITECTURES[cfg.model_type]


# llama.cpp's LLAMA_ROPE_TYPE_NORM architectures among ours
# llama.cpp's smollm3: no RoPE where (i + 1) % step == 0, a step fixed in its code (no GGUF key)
SMOLLM3_NOPE_STEP = 4
ROTATE_PAIRS = ("llama", "smollm3", "granite", "arcee", "mistral3", "granitehybrid")


def interleave_rotary_rows(w, n_heads: int, rotary: int | None = None, inverse: bool = False):
    """Reorder q/k projection rows (a torch tensor) within each head from transformers' rotate-half layout (dims i
    and i + r/2 form a pair) to llama.cpp's adjacent pairs (2i, 2i + 1), over the first `rotary` dims of each head
    (None: all; partial RoPE, e.g. Bamba's half, leaves the rest in place); inverse=True: back from llama.cpp's to
    transformers'. Works on weights (out, in) and biases (out,)."""
    import torch

    d = w.shape[0] // n_heads
    r = d if rotary is None else rotary
    heads = w.reshape(n_heads, d, *w.shape[1:])
    split = (n_heads, r // 2, 2) if inverse else (n_heads, 2, r // 2)
    rotated = heads[:, :r].reshape(*split, *w.shape[1:]).transpose(1, 2).reshape(n_heads, r, *w.shape[1:])
    return torch.cat([rotated, heads[:, r:]], dim=1).reshape(w.shape)


# method -> (default GGML type, gguf.LlamaFileType name)
METHODS = {"q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
           "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q2_k": ("Q2_K", "MOSTLY_Q2_K"),
           "q3_k_s": ("Q3_K", "MOSTLY_Q3_K_S"), "q3_k_m": ("Q3_K", "MOSTLY_Q3_K_M"),
           "q3_k_l": ("Q3_K", "MOSTLY_Q3_K_L"), "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
           "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"), "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
           "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"), "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
           "mxfp4_moe": ("MXFP4", "MOSTLY_MXFP4_MOE"),
           "iq4_nl": ("IQ4_NL", "MOSTLY_IQ4_NL"), "iq4_xs": ("IQ4_XS", "MOSTLY_IQ4_XS")}
# Methods whose tensors an importance matrix changes: all but q8_0 and mxfp4_moe (ggml's Q8_0 and MXFP4 ignore it;
# floats are not quantized).
IMATRIX_METHODS = tuple(m for m in METHODS if m not in ("q8_0", "mxfp4_moe"))
# Methods for MoE models only: their rule is about the expert tensors (a dense model would be all Q8_0).
MOE_METHODS = ("mxfp4_moe",)
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "MXFP4": 32, "IQ4_NL": 32,
         "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
IQ4 = ("iq4_nl", "iq4_xs")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def tensor_type(name: str, shape, method: str, *, arch: str, n_layer: int, n_head: int, n_head_kv: int,
                tied: bool, n_expert: int = 0, imatrix: bool = False) -> str:
    """The GGML type name ("Q6_K", "F32", ...) llama-quantize gives tensor `name` for `method`.

    name: the GGUF tensor name ("blk.3.attn_v.weight"); shape: torch order (rows, row length), the last dimension
    being llama.cpp's ne[0]; method: a key of METHODS; arch: the GGUF architecture ("llama", "qwen2", ...);
    n_layer / n_head / n_head_kv: the model's block count and attention heads; tied: True when the GGUF has no
    `output.weight` (the token embedding is then quantized like the output); n_expert: the MoE expert count (0 for
    a dense model); imatrix: whether an importance matrix weights the quantizers (the IQ4 methods then keep their
    first layers' ffn_down in IQ4)."""
    default = METHODS[method][0]
    # (ggml counts no trailing 1s: Qwen3.5-MoE's (1, H) shared-expert gate is 1-D there)
    if len(shape) < 2 or shape[0] == 1 or not name.endswith("weight") or "_norm.weight" in name or \
            "ffn_gate_inp.weight" in name:
        return "F32"
    ncols = shape[-1]
    if method == "mxfp4_moe":  # llama_tensor_get_type_impl: `tensor->ne[2] > 1` -> MXFP4, else Q8_0
        new = "MXFP4" if len(shape) == 3 and shape[0] > 1 else "Q8_0"
        return "F16" if ncols % BLOCK[new] else new
    new = default
    i = _layer(name)
    gqa = n_head // n_head_kv
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % BLOCK[new]:
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif name == "token_embd.weight":
        pass
    elif "attn_v.weight" in name or "attn_qkv.weight" in name:
        if method == "q2_k":
            new = "Q4_K" if gqa >= 4 else "Q3_K"
        elif method == "q3_k_m":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif method == "q3_k_l":
            new = "Q5_K"
        elif method in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layer):
            new = "Q6_K"
        elif method == "q4_k_s" and i < 4:
            new = "Q5_K"
        elif method in IQ4 and gqa >= 4:
            new = "Q5_K"
        if arch == "llama" and n_layer == 80 and n_head != n_head_kv and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"  # llama.cpp's LLM_TYPE_70B
        if n_expert == 8:
            new = "Q8_0"  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    elif "attn_k.weight" in name:
        if n_expert == 8:
            new = "Q8_0"
    elif "ffn_down" in name:
        if method == "q2_k":
            new = "Q3_K"
        elif method == "q3_k_m":
            new = "Q5_K" if i < n_layer // 16 else "Q4_K"
        elif method == "q3_k_l":
            new = "Q5_K"
        elif method == "q4_k_m":
            if use_more_bits(i, n_layer):
                new = "Q6_K"
        elif method == "q5_k_m" and use_more_bits(i, n_layer):
            new = "Q6_K"
        elif method == "q4_k_s" and i < n_layer // 8:
            new = "Q5_K"
        elif method in IQ4 and i < n_layer // 8 and not imatrix:
            new = "Q5_K"
    elif "attn_output.weight" in name:
        if n_expert == 8:
            if method in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", *IQ4):
                new = "Q5_K"
        else:
            new = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(method, new)
    if ncols % BLOCK[new]:
        new = FALLBACK.get(new, "F16")
        if ncols % BLOCK.get(new, 1 << 30):
            new = "F16"
    return new
