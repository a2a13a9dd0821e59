"""Read a .gguf file once: the transformers config, the tokenizer and the dequantised tensors all come from one
parse of the file (the `gguf` package's GGUFReader, memory-mapped), named and laid out with transformers' own GGUF
tables and tensor processors. transformers' loaders parse the file anew for each of the three, which costs seconds
per parse on a 49k-token vocabulary.

gpt-oss ("gpt-oss" in llama.cpp) is read here without transformers' GGUF code, which does not load it (as of
transformers 5.24 its rope-scaling reader fails on any gpt-oss file, its table misses the sliding-window key, and its
GptOssTensorProcessor expects `ffn_*_projs` names that llama.cpp does not write). The reverse of what llama.cpp's
convert_hf_to_gguf.py (GptOssModel) and our export/gguf.py write: `gpt_oss_config` builds GptOssConfig's fields from
the metadata and `tensors` puts the `ffn_{gate,up,down}_exps` weights and biases back into transformers' transposed,
gate/up-interleaved expert stacks (`_gpt_oss_experts`).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from fasttune.errors import ModelLoadError
from fasttune.export.gguf_types import SMOLLM3_NOPE_STEP
from fasttune.export.mxfp4 import dequantize_mxfp4
from fasttune.models.gguf_hybrid import ARCHITECTURES as HYBRID_ARCHITECTURES
from fasttune.models.gguf_qwen35 import ARCHITECTURES as QWEN35_ARCHITECTURES
from fasttune.models.gguf_qwen35 import from_gguf, gguf_lookup_name, qwen35_config

# GGUF metadata value types: number formats (struct), 8 = string, 9 = array.
_NUMBERS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# GGUF architecture names whose transformers model_type differs (as transformers' load_gguf_checkpoint renames).
_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
# GGUF architectures whose metadata transformers reads under another name (load_gguf_checkpoint's
# updated_architecture).
_RENAMED_ARCHITECTURES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                          "minimax-m2": "minimax_m2"}
# llama.cpp's smollm3 is its llama (same keys, tensors and q/k row pairing) with no RoPE in every
# SMOLLM3_NOPE_STEP-th layer (export/gguf_types.py); transformers has no GGUF table for it, so it is read as llama.
_READ_AS = {"smollm3": "llama"}
# Stacked MoE experts (llama.cpp's 3-D ffn_{gate,up,down}_exps, ne = (in, out, E)) -> transformers 5's stacked
# weights: gate and up are concatenated (gate rows first) into experts.gate_up_proj (E, 2I, H).
_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
# gpt-oss's experts, weights and biases (llama.cpp's GPT_OSS tensors; source: llama.cpp's src/llama-arch.cpp).
_GPT_OSS_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.(weight|bias)")


class _Cursor:
    """Reads GGUF's little-endian header fields from a memory-mapped file."""

    def __init__(self, blob: np.ndarray):
        self.blob, self.pos = blob, 0

    def number(self, fmt: str):
        """The next little-endian number in struct format `fmt` (e.g. "<Q"); advances past it."""
        value = struct.unpack_from(fmt, self.blob, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        """The next GGUF string (uint64 length, UTF-8 bytes); advances past it."""
        n = self.number("<Q")
        self.pos += n
        return bytes(self.blob[self.pos - n:self.pos]).decode("utf-8")

    def value(self, kind: int):
        """The next metadata value of GGUF value type `kind` (number, string or array of them); ValueError for an
        unknown type."""
        if kind in _NUMBERS:
            return self.number(_NUMBERS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.number("<I"), self.number("<Q")
        if item in _NUMBERS:  # a block of numbers in one read (token types, scores)
            dtype = np.dtype(_NUMBERS[item])
            values = np.frombuffer(self.blob, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return values
        return [self.value(item) for _ in range(count)]


def _parse(blob: np.ndarray) -> tuple[dict, list, int]:
    """(metadata, [(name, numpy shape, ggml type, offset)], start of the tensor data) of a GGUF v2/v3 file."""
    cur = _Cursor(blob)
    if bytes(blob[:4]) != b"GGUF":
        raise ValueError("it does not start with the GGUF magic bytes")
    cur.pos = 4
    version = cur.number("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.number("<Q"), cur.number("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.number("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.number("<Q") for _ in range(cur.number("<I"))]
        tensors.append((name, tuple(reversed(dims)), cur.number("<I"), cur.number("<Q")))
    align = int(metadata.get("general.alignment", 32))
    return metadata, tensors, (cur.pos + align - 1) // align * align


def dequantize_fast(raw: np.ndarray, kind) -> np.ndarray:
    """gguf's `dequantize(raw, kind)` (float32, the same bits), with the block formats of most small GGUF files
    (Q4_0, Q4_1, Q8_0) and gpt-oss's MXFP4 experts computed by whole-tensor torch operations instead of gguf's numpy
    loop over groups of 16 rows, which costs about a second on a 135M-parameter model. Other types go to gguf's own
    code.

    Args: raw: the tensor's bytes as a uint8 array (rows of blocks, last axis bytes); kind: its
    GGMLQuantizationType. Returns a float32 array of the tensor's shape. Raises ValueError / NotImplementedError
    as gguf does for a type it cannot dequantise or bytes that do not fill whole blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    fast = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
            GGMLQuantizationType.MXFP4)
    if kind not in fast:
        return dequantize(raw, kind)
    block, size = GGML_QUANT_SIZES[kind]
    if raw.ndim == 0 or raw.shape[-1] % size:
        return dequantize(raw, kind)  # gguf's own error for bytes that are not whole blocks
    shape = (*raw.shape[:-1], raw.shape[-1] // size * block)
    blocks = torch.from_numpy(np.array(raw, copy=True).reshape(-1, size))  # (n_blocks, bytes): fp16 scale first
    if kind == GGMLQuantizationType.MXFP4:
        return dequantize_mxfp4(blocks, block).reshape(shape).numpy()  # ggml's bits, as gguf's
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    if kind == GGMLQuantizationType.Q8_0:  # int8 quants times the scale
        out = blocks[:, 2:].contiguous().view(torch.int8).float().mul_(scale)
    else:  # 16 bytes of nibbles: low nibbles are the block's first 16 values, high nibbles the last 16
        packed = blocks[:, -16:]
        out = torch.empty(blocks.shape[0], block, dtype=torch.float32)  # filled in place: one float32 buffer
        low, high = packed & 0x0F, packed >> 4
        if kind == GGMLQuantizationType.Q4_0:  # scale * (q - 8)
            low, high = low.view(torch.int8) - 8, high.view(torch.int8) - 8
        out[:, :16], out[:, 16:] = low, high
        out.mul_(scale)
        if kind == GGMLQuantizationType.Q4_1:  # scale * q + minimum, two roundings as gguf's numpy (no fused FMA)
            out.add_(blocks[:, 2:4].contiguous().view(torch.float16).float())
    return out.reshape(shape).numpy()


def _owned_float32(weights: np.ndarray) -> torch.Tensor:
    """A writable float32 tensor of `weights`, sharing the array when it is already one (no second copy of every
    weight), else copied (views of the memory-mapped file are read-only)."""
    if weights.dtype == np.float32 and weights.flags.writeable and weights.flags.c_contiguous:
        return torch.from_numpy(weights)
    return torch.from_numpy(np.array(weights, dtype=np.float32))


def arch_values(metadata: dict, arch: str):
    """get(key, default=None) -> metadata[f"{arch}.{key}"] (default when absent), a one-element list unwrapped to its
    value: the architecture's own keys of a GGUF file, as llama.cpp writes them."""
    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        return value[0] if isinstance(value, list) and len(value) == 1 else value
    return get


def gpt_oss_config(metadata: dict, path) -> dict:
    """GptOssConfig fields of a llama.cpp "gpt-oss" file that transformers' GGUF table does not give (source:
    llama.cpp's convert_hf_to_gguf.py GptOssModel.set_gguf_parameters and src/llama-model.cpp's LLM_ARCH_OPENAI_MOE
    hparams; our export/gguf.py writes the same keys):
    - head_dim from `attention.key_length` (64 in every gpt-oss; GptOssConfig's default too);
    - intermediate_size from `expert_feed_forward_length` (llama.cpp's n_ff_exp), else `feed_forward_length`;
    - sliding_window from `attention.sliding_window` (llama.cpp requires it), layer_types alternating sliding
      (even layers) and full attention (odd), as llama.cpp's set_swa_pattern(2) for gpt-oss;
    - rope_parameters: YaRN with `rope.scaling.factor`, `rope.scaling.original_context_length` (4096 when absent,
      as the converter's default), beta_fast / beta_slow from `rope.scaling.yarn_beta_fast` / `yarn_beta_slow`
      (32 and 1, llama.cpp's defaults, when absent) and truncate False (GptOssConfig's default and OpenAI's
      checkpoints; the GGUF does not record it); plain RoPE when `rope.scaling.type` is absent or "none".

    Args: metadata: the file's GGUF keys; path: the file, for messages. Returns the fields as a dict.
    Raises ModelLoadError when the file has no sliding window or a RoPE scaling type other than yarn/none."""
    get = arch_values(metadata, "gpt-oss")
    layers = int(get("block_count"))
    window = get("attention.sliding_window")
    if window is None:
        raise ModelLoadError(f"{path}: this gpt-oss GGUF has no gpt-oss.attention.sliding_window, which llama.cpp's "
                             f"gpt-oss requires (its even layers attend over that window). The file is incomplete; "
                             f"convert the model again.")
    fields = dict(sliding_window=int(window),
                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                  intermediate_size=int(get("expert_feed_forward_length", get("feed_forward_length"))))
    if get("attention.key_length") is not None:
        fields["head_dim"] = int(get("attention.key_length"))
    theta = float(get("rope.freq_base", 150000.0))
    scaling = get("rope.scaling.type", "none")
    if scaling == "none":
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    elif scaling == "yarn":
        fields["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": theta, "factor": float(get("rope.scaling.factor", 1.0)),
            "beta_fast": float(get("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(get("rope.scaling.yarn_beta_slow", 1.0)), "truncate": False,
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length", 4096))}
    else:
        raise ModelLoadError(f"{path}: gpt-oss with RoPE scaling '{scaling}' is not something llama.cpp or "
                             f"transformers computes (gpt-oss takes YaRN); the file cannot be loaded.")
    return fields


def _gpt_oss_experts(parts: dict, weight: bool) -> torch.Tensor:
    """llama.cpp's gpt-oss expert tensors -> transformers' GptOssExperts layout: {"down": (E, H, I)} weight ->
    down_proj (E, I, H); {"gate", "up": (E, I, H)} weights -> gate_up_proj (E, H, 2I) with gate in the even and up
    in the odd columns; biases (E, out) keep their rows, gate/up interleaved the same way (E, 2I). The reverse of
    convert_hf_to_gguf.py's GptOssModel.modify_tensors (transpose, then [:, ::2] / [:, 1::2])."""
    if "down" in parts:
        t = parts["down"]
    else:
        t = torch.stack([parts["gate"], parts["up"]], dim=2).flatten(1, 2)  # rows gate0, up0, gate1, up1, ...
    return t.transpose(1, 2).contiguous() if weight else t


class GGUFContents:
    """One parsed .gguf file: `metadata` (GGUF keys), `architecture` (as the file names it), `model_type`, `config`
    (transformers config keyword arguments), `tokenizer` and `tokenizer_config` (transformers' GGUF tokenizer
    fields), and `tensors(names)`, which dequantises the weights one at a time under transformers' names."""

    def __init__(self, path: Path, blob: np.ndarray, metadata: dict, tensor_table: list, data_start: int):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, GGUF_TO_TRANSFORMERS_MAPPING

        self.path, self.metadata = Path(path), metadata
        self._blob, self._table, self._data_start = blob, tensor_table, data_start
        if "general.architecture" not in metadata:
            raise ModelLoadError(f"GGUF file '{path}' has no general.architecture in its metadata; it is not a "
                                 f"model file that llama.cpp or transformers can load.")
        # The config as transformers' load_gguf_checkpoint builds it: its GGUF key -> field tables and renames.
        self.architecture = arch = metadata["general.architecture"]
        renamed = "mistral" if "llama" in arch and "mistral" in str(metadata.get("general.name", "")) else arch
        renamed = _RENAMED_ARCHITECTURES.get(arch, _READ_AS.get(arch, renamed))
        if arch in QWEN35_ARCHITECTURES or arch in HYBRID_ARCHITECTURES:  # no transformers table:
            renamed = "qwen2"  # models/gguf_qwen35.py and gguf_hybrid.py read the config and tensors
        elif arch not in GGUF_SUPPORTED_ARCHITECTURES and renamed not in GGUF_SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"transformers has no GGUF mapping for architecture '{arch}', so the GGUF file "
                                 f"'{path}' cannot be read into a model. Use the model's transformers folder "
                                 f"(config.json and *.safetensors) instead.")
        parsed = {group: {} for group in GGUF_TO_TRANSFORMERS_MAPPING}
        for key, value in metadata.items():
            prefix, _, rest = key.replace(arch, renamed).partition(".")
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if isinstance(value, str) and arch in value:
                value = value.replace(arch, renamed)
            for group, renames in GGUF_TO_TRANSFORMERS_MAPPING.items():
                target = renames.get(prefix, {}).get(rest)
                if target is not None and target != -1:
                    parsed[group][target] = value
        config = parsed["config"]
        config["tie_word_embeddings"] = all(t[0] != "output.weight" for t in tensor_table) or arch in ("falcon", "bloom")
        try:
            from transformers.modeling_gguf_pytorch_utils import GGUF_CONFIG_DEFAULTS_MAPPING as defaults
        except ImportError:  # older transformers
            defaults = {}
        for key, value in defaults.get(renamed, defaults.get(arch, {})).items():
            config.setdefault(key, value)
        model_type = config.get("model_type", renamed)
        experts = metadata.get(f"{arch}.expert_count") or 0
        if arch == "llama" and experts:  # Mixtral: llama.cpp's llama with experts, which transformers reads as dense
            model_type = "mixtral"
            config.update(num_local_experts=experts, num_experts_per_tok=metadata[f"{arch}.expert_used_count"])
        if f"{arch}.expert_feed_forward_length" in metadata and renamed in ("qwen2_moe", "qwen3_moe"):
            # transformers' tables drop this key (its Qwen3-MoE default, 768, is Qwen3-30B-A3B's)
            config["moe_intermediate_size"] = metadata[f"{arch}.expert_feed_forward_length"]
        if renamed == "gpt_oss":
            config.update(gpt_oss_config(metadata, path))
        if arch in QWEN35_ARCHITECTURES:
            config = {**qwen35_config(arch_values(metadata, arch), arch, path), "tie_word_embeddings": config["tie_word_embeddings"]}
            model_type = config["model_type"]
        if arch in HYBRID_ARCHITECTURES:
            from fasttune.models.gguf_hybrid import hybrid_config

            config = {**hybrid_config(arch_values(metadata, arch), arch, path, {t[0] for t in tensor_table}),
                      "tie_word_embeddings": config["tie_word_embeddings"]}
            model_type = config["model_type"]
        if arch == "lfm2":  # as transformers' load_gguf_checkpoint reads llama.cpp's LFM2: per-layer key/value heads,
            heads = metadata.get(f"{arch}.attention.head_count_kv")  # 0 in the short-convolution layers
            heads = heads if isinstance(heads, list) else [heads] * config["num_hidden_layers"]
            config.update(num_key_value_heads=max(heads), full_attn_idxs=[i for i, n in enumerate(heads) if n > 0],
                          block_auto_adjust_ff_dim=False)  # feed_forward_length is the MLP's width already
        if arch == "smollm3":
            model_type = "smollm3"
            config.update(no_rope_layer_interval=SMOLLM3_NOPE_STEP, no_rope_layers=None)
        config["model_type"] = self.model_type = _MODEL_TYPES.get(model_type, model_type)
        if "vocab_size" not in config and "tokens" in parsed["tokenizer"]:
            config["vocab_size"] = len(parsed["tokenizer"]["tokens"])
        self.config, self.tokenizer, self.tokenizer_config = config, parsed["tokenizer"], parsed["tokenizer_config"]

    def tensors(self, names):
        """(transformers name, float32 tensor) for each weight the file has among `names` (the model's parameter
        names, e.g. `model.layers.0.self_attn.q_proj.weight`, or a {name: shape} dict, which the Mamba-2 hybrids'
        files need), dequantised lazily, one tensor at a time."""
        from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        if self.architecture in HYBRID_ARCHITECTURES:
            yield from self._hybrid_tensors(names)
            return
        processor = TENSOR_PROCESSORS.get(_READ_AS.get(self.architecture, self.architecture),
                                          TensorProcessor)(config=self.config)
        arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == self.architecture), None)
        if arch is None:
            raise ModelLoadError(f"{self.path}: the installed gguf package does not know the architecture "
                                 f"'{self.architecture}'; upgrade it with `pip install -U gguf`.")
        gguf_names = get_tensor_name_map(arch, self.config["num_hidden_layers"])
        gpt_oss = self.model_type == "gpt_oss"
        qwen35 = self.architecture in QWEN35_ARCHITECTURES
        to_hf = {}  # GGUF tensor name -> transformers name, as transformers' get_gguf_hf_weights_map finds it
        for name in names:
            if qwen35 and name.endswith("linear_attn.dt_bias"):
                to_hf[gguf_names.get_name(gguf_lookup_name(name).removesuffix(".bias")) + ".bias"] = name
                continue
            name = processor.preprocess_name(name)
            base, suffix = (name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1]) if name.endswith(
                (".weight", ".bias")) else (name, "")
            found = gguf_names.get_name(base)
            if found is not None:
                # gpt-oss's sinks are a bare parameter (self_attn.sinks) that llama.cpp names attn_sinks.weight
                to_hf[found + (".weight" if found.endswith(".attn_sinks") else suffix)] = name
        parsed = {"config": self.config, "tensors": {}}
        wanted, halves, given = set(names), {}, set()
        for name, shape, kind, offset in self._table:
            kind = GGMLQuantizationType(kind)
            raw = self._raw(shape, kind, offset)
            if gpt_oss and (m := _GPT_OSS_EXPERTS.fullmatch(name)):
                layer, part, kind_name = m.groups()
                target = f"model.layers.{layer}.mlp.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}"
                target += "_bias" if kind_name == "bias" else ""
                if target not in wanted:
                    continue
                halves.setdefault(target, {})[part] = _owned_float32(self._dequantize(name, raw, kind))
                if part == "down" or len(halves[target]) == 2:
                    given.add(target)
                    yield target, _gpt_oss_experts(halves.pop(target), kind_name == "weight")
                continue
            if m := _EXPERTS.fullmatch(name):  # stacked experts, read here for the other MoE architectures
                layer, part = m.groups()
                target = f"model.layers.{layer}.mlp.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}"
                if target not in wanted:
                    continue
                weights = _owned_float32(self._dequantize(name, raw, kind))
                if part == "down":
                    yield target, weights
                    continue
                halves.setdefault(target, {})[part] = weights
                if len(halves[target]) == 2:  # (E, I, H) gate and up -> (E, 2I, H)
                    pair = halves.pop(target)
                    yield target, torch.cat([pair["gate"], pair["up"]], dim=1)
                continue
            result = processor.process(weights=self._dequantize(name, raw, kind), name=name,
                                       tensor_key_mapping=to_hf, parsed_parameters=parsed)
            if result.name in to_hf:
                given.add(to_hf[result.name])
                weights = _owned_float32(result.weights)
                yield to_hf[result.name], from_gguf(to_hf[result.name], weights, self.config) if qwen35 else weights
        yield from parsed["tensors"].items()  # tensors a processor assembled itself (split MoE experts)
        if gpt_oss:
            self._check_gpt_oss_complete(names, given, to_hf, halves)

    def _raw(self, shape, kind, offset: int) -> np.ndarray:
        """A tensor's bytes in the memory-mapped file, shaped (..., row bytes) as the dequantisers take them."""
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[kind]
        count = int(np.prod(shape)) if shape else 1
        start = self._data_start + offset
        raw = self._blob[start:start + count // block * size]
        return raw.reshape(*shape[:-1], shape[-1] // block * size) if shape else raw

    def _hybrid_tensors(self, names: dict):
        """tensors() of a Mamba-2 hybrid file (models/gguf_hybrid.py): each of `names` ({name: shape}) joined from the
        GGUF tensors the exporter splits it into, and undone from llama.cpp's layout."""
        from gguf import GGMLQuantizationType
        from transformers import AutoConfig

        from fasttune.models.gguf_hybrid import from_gguf, gguf_layout

        if not isinstance(names, dict):
            raise ValueError("a Mamba-2 hybrid's tensors need the model's {name: shape}")
        fields = dict(self.config)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        layout, cfg = gguf_layout(names, hf_config, self.architecture)
        owner = {g: ours for ours, parts in layout.items() for g, _ in parts}
        pending = {}
        for name, shape, kind, offset in self._table:
            ours = owner.get(name)
            if ours is None:
                continue
            kind = GGMLQuantizationType(kind)
            t = _owned_float32(self._dequantize(name, self._raw(shape, kind, offset), kind))
            parts = layout[ours]
            if len(parts) == 1:
                yield ours, from_gguf(ours, t, cfg, self.architecture)
                continue
            pending.setdefault(ours, {})[name] = t
            if len(pending[ours]) == len(parts):
                got = pending.pop(ours)
                yield ours, from_gguf(ours, torch.cat([got[g] for g, _ in parts], dim=parts[0][1]), cfg,
                                      self.architecture)

    def _dequantize(self, name: str, raw: np.ndarray, kind) -> np.ndarray:
        """dequantize_fast of one tensor; a ModelLoadError naming the tensor and its type when the installed gguf
        package has no dequantiser for it."""
        try:
            return dequantize_fast(raw, kind)
        except NotImplementedError:
            from importlib.metadata import version

            raise ModelLoadError(
                f"{self.path}: tensor '{name}' is stored as GGML type {kind.name}, which the installed gguf package "
                f"({version('gguf')}) cannot dequantise. Upgrade it (`pip install -U gguf`) if a newer release reads "
                f"{kind.name}, or convert the file to a type it reads with llama.cpp's quantizer, e.g. "
                f"`llama-quantize --allow-requantize {self.path.name} out.gguf Q8_0`.") from None

    def _check_gpt_oss_complete(self, names, given: set, to_hf: dict, halves: dict):
        """ModelLoadError naming the first GGUF tensor llama.cpp's gpt-oss needs that the file lacks (a layer's
        expert gate without its up half, a missing sink, ...); the output tensor may be absent (tied)."""
        for target, parts in halves.items():  # half of a gate/up pair arrived
            layer = target.split(".")[2]
            have = next(iter(parts))
            other = "up" if have == "gate" else "gate"
            suffix = "bias" if target.endswith("_bias") else "weight"
            raise ModelLoadError(f"{self.path}: the GGUF file has blk.{layer}.ffn_{have}_exps.{suffix} but no "
                                 f"blk.{layer}.ffn_{other}_exps.{suffix}, which llama.cpp's gpt-oss needs beside it. "
                                 f"The file is incomplete or damaged; convert the model again.")
        to_gguf = {hf: g for g, hf in to_hf.items()}
        for name in names:
            if name in given or (name == "lm_head.weight" and self.config.get("tie_word_embeddings")):
                continue
            if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(_bias)?", name):
                layer, part, bias = m.groups()
                suffix = "bias" if bias else "weight"
                gguf_name = " and ".join(f"blk.{layer}.ffn_{p}_exps.{suffix}"
                                         for p in (("down",) if part == "down" else ("gate", "up")))
            else:
                gguf_name = to_gguf.get(name, "(no llama.cpp name)")
            raise ModelLoadError(f"{self.path}: the GGUF file has no tensor {gguf_name} ({name}), which llama.cpp's "
                                 f"gpt-oss has in every model. The file is incomplete, or holds another architecture "
                                 f"under the name gpt-oss; convert the model again.")

    def build_tokenizer(self):
        """The transformers tokenizer the file describes, as AutoTokenizer.from_pretrained(gguf_file=...) builds it
        (the tokens, merges and special tokens of the file, its chat template), without reading the file again."""
        from transformers import PreTrainedTokenizerFast

        try:
            from transformers.integrations.gguf import convert_gguf_tokenizer
        except ImportError:  # transformers < 5
            from transformers.integrations.ggml import convert_gguf_tokenizer
        tokenizer, config = dict(self.tokenizer), dict(self.tokenizer_config)
        if tokenizer.get("tokenizer_type") == "llama":
            config.setdefault("add_bos_token", True)  # llama.cpp's default for a sentencepiece vocabulary
        tokens = tokenizer.get("tokens") or []
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                          ("pad_token", "pad_token_id")):
            token_id = tokenizer.get(key)
            config[name] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
        backend, extra = convert_gguf_tokenizer(self.architecture, tokenizer)
        return self._tokenizer_class(PreTrainedTokenizerFast)(tokenizer_object=backend,
                                                              name_or_path=str(self.path.parent), **config, **extra)

    def _tokenizer_class(self, generic):
        """The class AutoTokenizer picks for this model type (e.g. GemmaTokenizer), else `generic`."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

        try:
            found = TOKENIZER_MAPPING.get(CONFIG_MAPPING[self.model_type], None)
        except (KeyError, ValueError, ImportError):
            return generic
        if isinstance(found, tuple):  # transformers < 5: (slow, fast)
            found = found[1]
        if found is None or found.__name__ in ("MistralCommonBackend", "PythonBackend"):
            return generic
        return found


def read_gguf(path) -> GGUFContents:
    """Parse a .gguf file's metadata and tensor table once; the tensor data stays memory-mapped until `tensors()`
    reads it. Raises ModelLoadError for a file that is not a GGUF file, or a truncated or corrupt one."""
    from gguf import GGML_QUANT_SIZES

    from fasttune.file_readers import damaged_weights, gguf_failure

    blob = None
    try:
        blob = np.memmap(path, mode="r", dtype=np.uint8).view(np.ndarray)  # plain views: no per-slice memmap cost
        metadata, table, data_start = _parse(blob)
        for name, shape, kind, offset in table:
            block, size = GGML_QUANT_SIZES[kind]
            if data_start + offset + int(np.prod(shape)) // block * size > len(blob):
                raise ValueError(f"tensor '{name}' ends after the end of the file")
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, IndexError, OSError) as e:
        if blob is None or not (len(blob) >= 4 and bytes(blob[:4]) == b"GGUF"):
            raise gguf_failure(path, e) from None  # unreadable, or not a GGUF file at all
        raise damaged_weights(path, e, "GGUF") from None
    return GGUFContents(Path(path), blob, metadata, table, data_start)
