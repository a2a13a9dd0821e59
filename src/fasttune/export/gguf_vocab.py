"""A transformers (fast) tokenizer as llama.cpp's GGUF vocabulary.

Two kinds are written:
- byte-level BPE (GPT-2 style: Llama 3, Qwen 2/3, SmolLM, GPT-2): `tokenizer.ggml.model = "gpt2"` with tokens,
  token types and merges, and `tokenizer.ggml.pre` naming the pre-tokenizer llama.cpp must use. The name is read
  off the tokenizer's own pre-tokenizer (regex split / digit split / plain byte-level); an unknown one is written
  as "default" with a warning, since llama.cpp would then split words differently.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1, Gemma): `tokenizer.ggml.model = "llama"`
  with tokens, scores and types. llama.cpp merges by score, so scores rank the merges (earlier merge = higher).

Unigram (T5-style) and WordPiece tokenizers, and slow (Python-only) tokenizers, are not supported.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from fasttune.errors import ConfigError

# Token types as llama.cpp reads them (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes as they appear in tokenizer.json, and the llama.cpp name of the same split.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
KNOWN_PRE = {
    ("bytelevel+regex",): "gpt-2",
    ("digits", "bytelevel+regex"): "smollm",  # digits one by one, then GPT-2's split (StarCoder, SmolLM)
    (f"split:{LLAMA3_REGEX}", "bytelevel"): "llama-bpe",
    (f"split:{QWEN2_REGEX}", "bytelevel"): "qwen2",
}


@dataclass
class GGUFVocab:
    """A tokenizer as the `tokenizer.ggml.*` keys of a GGUF file (llama.cpp's gguf-py key names). `tokens`,
    `types` (llama.cpp's token types, above) and `scores` are indexed by token id."""

    model: str  # "gpt2" | "llama" | "gemma4"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    add_space_prefix: bool | None = None
    special_ids: dict = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer):
        """Add the vocabulary's keys to `writer`, a gguf-py `GGUFWriter`."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                   "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            setters[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"GGUF export needs a fast (tokenizers-backed) tokenizer; {type(tokenizer).__name__} is a "
                          f"slow one. Load the model with a tokenizer.json (AutoTokenizer(..., use_fast=True)).")
    return json.loads(backend.to_str())


def _steps(pre: dict | None) -> tuple:
    """The pre-tokenizer as a tuple of simple step names, for matching against KNOWN_PRE."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    if kind == "ByteLevel":
        step = "bytelevel+regex" if pre.get("use_regex", True) else "bytelevel"
        return (step + ("+prefix-space" if pre.get("add_prefix_space") else ""),)  # llama.cpp adds no space
    if kind == "Digits":
        return ("digits" if pre.get("individual_digits") else "digits-grouped",)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (f"split:{pattern.get('Regex', pattern.get('String'))}",)
    return (kind,)


def _id_table(tokenizer, data: dict, vocab_size: int) -> tuple[list, dict]:
    """Token strings by id (None where the tokenizer has no token) and added tokens by id."""
    vocab = data["model"]["vocab"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    n = max([vocab_size, *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
    if n > vocab_size:
        raise ConfigError(f"The tokenizer has {n} token ids but the model's embedding has {vocab_size} rows; resize "
                          f"the model's embeddings to the tokenizer before exporting.")
    tokens: list = [None] * n
    for text, i in vocab.items():
        tokens[i] = text
    for i, t in added.items():
        tokens[i] = t["content"]
    return tokens, added


def _special_ids(tokenizer) -> dict:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding plain text adds BOS / EOS, read off an actual encoding."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids and bos is not None and ids[0] == bos), bool(len(ids) > 1 and eos is not None and ids[-1] == eos)


def _merge_strings(merges: list) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def gguf_vocab(tokenizer, vocab_size: int, arch: str | None = None) -> GGUFVocab:
    """Build the GGUF vocabulary; ids beyond the tokenizer's (a padded embedding) become unused [PAD<i>] tokens.
    For llama.cpp's gemma4 architecture a SentencePiece-style vocabulary is written as its `gemma4` tokenizer model
    (the same pieces, scores and types, plus the merges), as llama.cpp's converter writes Gemma 4's."""
    data = _backend_json(tokenizer)
    model = data["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style with byte "
                          f"fallback); this tokenizer is {model.get('type')}, which is not supported yet.")
    table, added = _id_table(tokenizer, data, vocab_size)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    common = dict(special_ids=_special_ids(tokenizer), add_bos=add_bos, add_eos=add_eos, chat_template=template)
    steps = _steps(data.get("pre_tokenizer"))
    byte_level = any(s.startswith("bytelevel") for s in steps) or (data.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level:
        if not model.get("merges"):
            raise ConfigError("This byte-level BPE tokenizer has no merges; llama.cpp needs a tokenizer with BPE "
                              "merges (every real BPE tokenizer has them).")
        pre = KNOWN_PRE.get(steps)
        if pre is None:
            warnings.warn(f"GGUF export: the tokenizer's pre-tokenizer {steps} has no known llama.cpp equivalent; "
                          f"writing 'default', so llama.cpp may split text into different tokens than transformers.")
            pre = "default"
        tokens, types = [], []
        for i, text in enumerate(table):
            if text is None:
                tokens.append(f"[PAD{i}]")
                types.append(UNUSED)
            else:
                tokens.append(text)
                types.append((CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL)
        return GGUFVocab("gpt2", tokens, types, merges=_merge_strings(model["merges"]), pre=pre, **common)
    if model.get("byte_fallback"):
        vocab = _sentencepiece_style(data, table, added, tokenizer, common)
        if arch == "gemma4":
            vocab.model, vocab.merges = "gemma4", _merge_strings(model.get("merges", []))
        return vocab
    raise ConfigError("GGUF export supports byte-level BPE and SentencePiece-style BPE (byte_fallback) tokenizers; "
                      "this BPE tokenizer is neither.")


def _sentencepiece_style(data, table, added, tokenizer, common) -> GGUFVocab:
    # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest, so a token's score
    # is minus the rank of the merge that creates it; pieces no merge creates (characters, bytes, specials) get 0.
    rank = {}
    for r, m in enumerate(_merge_strings(data["model"].get("merges", []))):
        left, right = m.split(" ", 1)
        rank.setdefault(left + right, r)
    unk = data["model"].get("unk_token")
    tokens, types, scores = [], [], []
    for i, text in enumerate(table):
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(-1e9)
            continue
        tokens.append(text)
        if i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif text == unk:
            types.append(UNKNOWN)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        scores.append(-float(rank[text] + 1) if text in rank else 0.0)
    norm = json.dumps(data.get("normalizer") or {}) + json.dumps(data.get("pre_tokenizer") or {})
    # Llama 2 / Mistral prepend "▁" to the text (Prepend normalizer or Metaspace prepend); Gemma does not.
    prefix = '"Prepend"' in norm or '"prepend_scheme": "always"' in norm or '"prepend_scheme": "first"' in norm
    return GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=prefix, **common)
