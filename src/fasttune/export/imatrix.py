"""Importance matrices for GGUF quantization: llama.cpp's `imatrix`, collected by our own forward.

llama.cpp's `llama-imatrix` (tools/imatrix/imatrix.cpp) runs the model over sample text and, for every matrix
multiplication with a weight `blk.N.*` (the output projection only on request), adds up the square of each input
feature over all tokens: `in_sum2[j] = sum_t x_t[j]^2`, `counts = tokens`. `llama-quantize` hands
`in_sum2 / counts` (the mean square of input column j, length n_per_row = the weight's row length) to ggml's
quantizers as `quant_weights`, whose weighted searches then spend the levels where the inputs are large
(export/kquants.py, `*_weighted`). Here the same statistic is collected with forward pre-hooks on our decoder's
linear layers (LoRA layers included, so the fine-tuned model is what is measured) on a sample of the user's text,
under torch.no_grad with the reference (torch) kernels so that every projection runs through its module; the
token embedding (a lookup, not a product) and the output projection get none, as in llama.cpp by default.

Mixture-of-experts layers: llama-imatrix collects the stacked expert tensors (`ffn_{gate,up,down}_exps`, ggml's
MUL_MAT_ID) per expert, each over the tokens routed to it: in_sum2 (E, n) and counts (E,), and llama-quantize weights
expert e's rows by in_sum2[e] / counts[e] (1 where an expert saw no token). Here a forward pre-hook on each experts
module takes the tokens and their routing and computes the same, the down projection's input (the gated activation)
from the expert weights with their LoRA update.

Files: `save_imatrix` writes llama.cpp's GGUF imatrix format (`<tensor>.in_sum2` (1, n) and `<tensor>.counts` (1, 1)
float32, (E, n) and (E, 1) for expert stacks; `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`),
which llama-quantize reads with `--imatrix`; `load_imatrix` reads that format back, so one made by llama-imatrix can
be used too.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttune.data.text_tokenizer import text_tokenizer
from fasttune.errors import ConfigError
from fasttune.export.gguf_types import IMATRIX_METHODS

DEFAULT_TOKENS = 4096  # sample size: llama.cpp's examples use 100+ chunks, but a few thousand tokens already help
CHUNK_TOKENS = 512  # tokens per forward, llama-imatrix's default context
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass
class Imatrix:
    """Collected importance statistics. sums: GGUF tensor name ("blk.0.attn_q.weight") -> float64 (n_per_row,) sum
    over tokens of each input feature's square, or (E, n_per_row) per expert for a stacked expert tensor
    ("blk.1.ffn_down_exps.weight"); counts: name -> tokens summed (an int), or a float64 (E,) tensor of each
    expert's tokens; datasets: where the text came from; chunk_size / chunk_count: tokens per forward and forwards
    (llama.cpp's file metadata)."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int | torch.Tensor] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = CHUNK_TOKENS
    chunk_count: int = 0

    def weights(self, name: str) -> torch.Tensor | None:
        """The quant_weights llama-quantize derives for tensor `name`: in_sum2 / counts as float32 (n_per_row,), or
        (E, n_per_row) for an expert stack with 1 for experts that saw no token (tools/quantize/quantize.cpp's
        load_imatrix); None when the tensor has no entry or no token (ggml then uses its reference quantizer)."""
        if name not in self.sums:
            return None
        sums, counts = self.sums[name], self.counts.get(name)
        if sums.dim() == 1:
            return (sums / counts).float().cpu() if counts else None
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if not bool((counts > 0).any()):
            return None
        mean = sums / counts.clamp(min=1)[:, None]
        return torch.where((counts > 0)[:, None], mean, torch.ones_like(mean)).float().cpu()


def imatrix_targets(model) -> dict[str, str]:
    """Module name -> GGUF tensor name for every linear layer whose weight llama.cpp would collect (`blk.N.*`):
    q/k/v/o (or fused qkv), gate/up/down (or fused gate_up) of each layer; LoRA and NF4/int8 layers included."""
    import gguf

    from fasttune.export.gguf_types import architecture
    from fasttune.peft.lora import LoraLinear
    from fasttune.quant.linear import QuantLinear

    cfg = model.arch
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[architecture(cfg)]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_layers)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, LoraLinear, QuantLinear)) or name.endswith(".base_layer"):
            continue
        # our decoder's own names (`model.layers.N...`), as the text GGUF is written; a vision-language model's
        # tower (`visual.*`, `vision_tower.*`) has no `blk.N` place and goes to the mmproj unweighted
        new = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if new is not None and new.startswith("blk."):
            out[name] = new
    return out


def expert_imatrix_targets(model) -> dict[str, tuple[str, str, str]]:
    """Experts module name -> the GGUF names of its stacks (ffn_gate_exps, ffn_up_exps, ffn_down_exps) for every
    mixture-of-experts layer (Qwen3-MoE, Mixtral, gpt-oss)."""
    from fasttune.models.gpt_oss import GptOssExperts
    from fasttune.models.moe import Experts

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (Experts, GptOssExperts)):
            layer = re.search(r"layers\.(\d+)\.", name + ".")
            if layer is not None:
                out[name] = tuple(f"blk.{layer[1]}.ffn_{k}_exps.weight" for k in ("gate", "up", "down"))
    return out


def _expert_weight(module, name: str, e: int, dense: dict) -> torch.Tensor:
    """Expert e's float32 weight `name` (gate_up_proj / down_proj) in the module's layout, with its enabled LoRA
    update added (ExpertLora.delta_weight of that expert). `dense` caches a stack dequantised from NF4."""
    from fasttune.quant.experts import QuantExpertWeight

    if name not in dense:  # an NF4 stack is dequantised once per forward
        w = getattr(module, name)
        dense[name] = w.dequantized(torch.float32) if isinstance(w, QuantExpertWeight) else w
    w = dense[name][e].float()
    adapter = module.lora[name] if name in module.lora else None
    return w if adapter is None or adapter.disabled else w + adapter.delta_weight(e).float()


def _expert_stats(module, x: torch.Tensor, experts: torch.Tensor):
    """(counts (E,), sum of x^2 (E, H), sum of the down projection's input squared (E, I)), float64 on the CPU, over
    the tokens routed to each expert: x (..., H) the experts module's input, experts (..., k) its routing."""
    from fasttune.kernels.activations import gated_act_reference
    from fasttune.kernels.clamped_swiglu import clamped_swiglu_reference
    from fasttune.models.gpt_oss import GptOssExperts

    x = x.reshape(-1, x.shape[-1]).float()
    experts = experts.reshape(x.shape[0], -1)
    gpt_oss = isinstance(module, GptOssExperts)  # (in, out) weights, interleaved gate/up, biases
    n_experts = module.gate_up_proj.shape[0]
    inner = module.down_proj.shape[-2 if gpt_oss else -1]
    counts = torch.zeros(n_experts, dtype=torch.float64)
    x2 = torch.zeros(n_experts, x.shape[1], dtype=torch.float64)
    h2 = torch.zeros(n_experts, inner, dtype=torch.float64)
    dense = {}
    for e in range(n_experts):
        xe = x[(experts == e).any(-1)]
        if xe.shape[0] == 0:
            continue
        gate_up = _expert_weight(module, "gate_up_proj", e, dense)
        if gpt_oss:
            h = clamped_swiglu_reference(xe @ gate_up + module.gate_up_proj_bias[e].float(), module.limit,
                                         module.alpha)
        else:
            h = gated_act_reference(*(xe @ gate_up.t()).chunk(2, dim=-1), module.act)
        counts[e] = xe.shape[0]
        x2[e] = xe.square().sum(0).double().cpu()
        h2[e] = h.square().sum(0).double().cpu()
    return counts, x2, h2


@contextlib.contextmanager
def _reference_kernels():
    """FASTTUNE_KERNELS=torch for the duration: the fused LoRA kernel computes several projections without calling
    their modules, which the hooks need."""
    old = os.environ.get("FASTTUNE_KERNELS")
    os.environ["FASTTUNE_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTTUNE_KERNELS", None)
        else:
            os.environ["FASTTUNE_KERNELS"] = old


@torch.no_grad()
def collect_imatrix(model, token_ids: list[int], chunk_tokens: int = CHUNK_TOKENS, progress: bool = True,
                    dataset: str = "") -> Imatrix:
    """Run `model` (our decoder, LoRA applied) over `token_ids` in chunks of `chunk_tokens` (the last chunk may be
    shorter) and collect, per GGUF weight `blk.N.*`, the sum over tokens of each input feature's square and the
    token count, as llama-imatrix does (per expert, over its routed tokens, for expert stacks). The model is put
    in eval mode for the forward and restored after. Raises ConfigError when there are no tokens or a targeted
    layer received no input."""
    from tqdm import tqdm

    if len(token_ids) < 2:
        raise ConfigError("The importance matrix needs sample text: the data given has fewer than 2 tokens.")
    targets = imatrix_targets(model)
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_size=chunk_tokens)
    modules = dict(model.named_modules())

    def hook(gname):
        """A forward pre-hook adding the squares of a linear layer's input features to entry `gname`."""
        def pre(_module, args):
            """args[0] (..., in): the layer's input."""
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = x.square().sum(0).double()
            im.sums[gname] = sq if gname not in im.sums else im.sums[gname] + sq
            im.counts[gname] = im.counts.get(gname, 0) + x.shape[0]
        return pre

    def expert_hook(names):
        """A forward pre-hook on an experts module (args: x, weights, experts) adding per-expert statistics to
        its three entries `names` (gate, up, down stacks)."""
        def pre(module, args):
            """args: (x (..., H), weights (..., k), experts (..., k)), as Experts.forward takes them."""
            gate, up, down = names
            counts, x2, h2 = _expert_stats(module, args[0].detach(), args[2])
            for gname, sq in ((gate, x2), (up, x2), (down, h2)):
                im.sums[gname] = sq if gname not in im.sums else im.sums[gname] + sq
                im.counts[gname] = counts if gname not in im.counts else im.counts[gname] + counts
        return pre

    handles = [modules[m].register_forward_pre_hook(hook(g)) for m, g in targets.items()]
    experts = expert_imatrix_targets(model)
    handles += [modules[m].register_forward_pre_hook(expert_hook(names)) for m, names in experts.items()]
    backbone = model.model if isinstance(getattr(model, "model", None), torch.nn.Module) else model
    was_training = model.training
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.device)
    chunks = list(ids.split(chunk_tokens))
    try:
        model.eval()
        with _reference_kernels():
            for chunk in tqdm(chunks, desc="imatrix", unit="chunk", disable=not progress):
                backbone(input_ids=chunk[None])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    im.chunk_count = len(chunks)
    # Qwen3.5: ssm_out's columns are value heads in llama.cpp's tiled order (not Qwen3-Next's, nor LFM's convolutions)
    if model.arch.linear_layers and model.arch.linear_kind == "gated_deltanet" and \
            model.arch.model_type != "qwen3_next":
        from fasttune.export.gguf_qwen35 import imatrix_in_gguf_order

        im.sums = {n: imatrix_in_gguf_order(n, v, model.arch) for n, v in im.sums.items()}
    missing = sorted((set(targets.values()) | {n for names in experts.values() for n in names}) - set(im.sums))
    if missing:
        raise ConfigError(f"The importance matrix got no activations for {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}; this model's forward does not run those layers "
                          f"as modules. Export without imatrix.")
    return im


def sample_token_ids(source, tokenizer, max_tokens: int = DEFAULT_TOKENS, max_seq_length: int = CHUNK_TOKENS
                     ) -> tuple[list[int], str]:
    """Up to `max_tokens` token ids of sample text, and a short description of where they came from.

    source: a plain-text file (.txt/.md: its text, tokenized as one document, like llama-imatrix -f), a dataset
    file or folder our trainer reads (.jsonl/.json/.csv/.parquet, save_to_disk; rows are tokenized as in training,
    chat template included, and taken evenly spaced over the file so a sorted file is sampled throughout), a list
    of strings, a list of row dicts or a datasets.Dataset. Raises ConfigError for an unreadable source, a format
    without text (preference pairs), or one that gives fewer than 2 tokens."""
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in TEXT_SUFFIXES:
        path = Path(source).expanduser()
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(max_tokens * 16)  # more characters than tokens can need
        except OSError as e:
            raise ConfigError(f"Cannot read the imatrix sample text '{path}': {e}.") from None
        return list(text_tokenizer(tokenizer)(text)["input_ids"][:max_tokens]), str(path)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, str) for s in source):
        ids = []
        for text in source:
            ids.extend(text_tokenizer(tokenizer)(text)["input_ids"])
            if len(ids) >= max_tokens:
                break
        return ids[:max_tokens], f"{len(source)} texts"
    from fasttune.data import load_rows, tokenize_rows

    rows = load_rows(source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else f"{type(source).__name__} of {len(rows)} rows"
    take = min(len(rows), max(1, max_tokens // 16))  # rows of 16+ tokens fill the sample; more would only cost time
    picked = sorted({round(i * (len(rows) - 1) / max(1, take - 1)) for i in range(take)})
    examples = tokenize_rows(rows.select(picked), tokenizer, max_seq_length=max_seq_length, source_name=name)
    ids = []
    for ex in examples:
        ids.extend(int(t) for t in ex["input_ids"])
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens], name


def save_imatrix(im: Imatrix, path) -> Path:
    """Write `im` in llama.cpp's GGUF imatrix format (see the module docstring) to `path`; returns the path.
    llama-quantize --imatrix reads it (for k-quants and the i-quants we do not write)."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", list(im.datasets))
    writer.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.sums):
        sums = im.sums[name].float().cpu()
        writer.add_tensor(f"{name}.in_sum2", sums.numpy().reshape(-1 if sums.dim() == 2 else 1, sums.shape[-1]))
        counts = torch.as_tensor(im.counts[name], dtype=torch.float32).reshape(-1, 1)
        writer.add_tensor(f"{name}.counts", counts.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def load_imatrix(path) -> Imatrix:
    """Read a GGUF imatrix file (ours, or llama-imatrix's default output; not its legacy .dat format): dense entries
    (one count) and expert stacks (one count per expert). Raises ConfigError for a file that is not one."""
    import gguf

    path = Path(path).expanduser()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot read the imatrix file '{path}': {e}. Pass a GGUF imatrix (llama-imatrix's "
                          f"default output) or sample text.") from None
    tensors = {t.name: t for t in reader.tensors}
    im = Imatrix()
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[:-len(".in_sum2")]
        counts = tensors.get(f"{base}.counts")
        if counts is None:
            raise ConfigError(f"The imatrix file '{path}' has {name} without {base}.counts.")
        sums = torch.from_numpy(t.data.astype("float64").copy())
        n = counts.data.size
        if n == 1:
            im.sums[base] = sums.reshape(-1)
            im.counts[base] = int(counts.data.reshape(-1)[0])
        elif sums.numel() % n == 0:  # an expert stack: (E, n_per_row) sums, E counts
            im.sums[base] = sums.reshape(n, -1)
            im.counts[base] = torch.from_numpy(counts.data.astype("float64").reshape(-1).copy())
        else:
            raise ConfigError(f"The imatrix file '{path}': {name} has {sums.numel()} values for {n} counts.")
    if not im.sums:
        raise ConfigError(f"'{path}' holds no imatrix entries (<tensor>.in_sum2 with <tensor>.counts).")
    field_ = reader.fields.get("imatrix.datasets")
    if field_ is not None:
        im.datasets = [str(v) for v in field_.contents()]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        if key in reader.fields:
            setattr(im, attr, int(reader.fields[key].contents()))
    return im


def resolve_imatrix(model, tokenizer, imatrix, quants: list[str], tokens: int | None = None,
                    progress: bool = True):
    """The Imatrix an export uses, or None. imatrix: None/False (none); sample text to collect it on (a .txt file,
    a dataset file or folder, a list of strings or rows, a datasets.Dataset: export/imatrix.sample_token_ids),
    measured on up to `tokens` tokens (default imatrix.DEFAULT_TOKENS); a llama.cpp imatrix file (.gguf); or an
    Imatrix. Raises ConfigError when none of `quants` uses one, for imatrix=True (it names no text: fasttune runs do
    not record their data file), and for a bad `tokens`."""
    if imatrix is None or imatrix is False:
        return None
    if not any(q in IMATRIX_METHODS for q in quants):
        raise ConfigError(f"imatrix has no effect on quantization_method {', '.join(quants)}: llama.cpp uses an "
                          f"importance matrix only in the k-quants (q2_k .. q6_k), q4_0/q4_1/q5_0/q5_1 and "
                          f"iq4_nl/iq4_xs (f32/f16/bf16 are not quantized, q8_0 and mxfp4_moe round each value to its "
                          f"nearest level). Leave imatrix out, or choose e.g. quantization_method='q4_k_m'.")
    if imatrix is True:
        raise ConfigError("imatrix=True does not say which text to measure the importance matrix on: pass the sample "
                          "instead, e.g. imatrix='train.jsonl' (your training data: .jsonl/.json/.csv/.parquet or a "
                          ".txt file), a list of strings, or a llama.cpp imatrix .gguf file (CLI: --imatrix-data "
                          "FILE).")
    tokens = DEFAULT_TOKENS if tokens is None else tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 16:
        raise ConfigError(f"imatrix_tokens={tokens!r}: use an integer >= 16 (the tokens of sample text the importance "
                          f"matrix is measured on; default {DEFAULT_TOKENS}).")
    if isinstance(imatrix, Imatrix):
        return imatrix
    if isinstance(imatrix, (str, os.PathLike)) and Path(imatrix).suffix.lower() == ".gguf":
        return load_imatrix(imatrix)
    ids, source = sample_token_ids(imatrix, tokenizer, tokens)
    return collect_imatrix(model, ids, min(CHUNK_TOKENS, len(ids)), progress=progress, dataset=source)


def check_imatrix(im, tensors: dict):
    """ConfigError when an imatrix entry's length differs from its tensor's rows (llama-quantize refuses too) or
    when no entry names a tensor of this model."""
    known = [n for n in im.sums if n in tensors]
    if not known:
        raise ConfigError(f"None of the imatrix's {len(im.sums)} entries ({', '.join(sorted(im.sums)[:3])}, ...) names "
                          f"a tensor of this model: it was made for another model.")
    for name in known:
        sums, t = im.sums[name], tensors[name]
        if sums.shape[-1] != t.shape[-1] or (sums.dim() == 2 and (t.dim() != 3 or sums.shape[0] != t.shape[0])):
            raise ConfigError(f"The imatrix entry for {name} has shape {tuple(sums.shape)} but the tensor is "
                              f"{tuple(t.shape)} (rows of {t.shape[-1]}): the imatrix was made for another model.")
