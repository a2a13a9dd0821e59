"""Small trained BPE tokenizers in the styles real models use, built offline in about a second.

llama.cpp needs real merges (the byte-only tiny tokenizer has none), and each style exercises one pre-tokenizer
mapping of the GGUF export: "gpt2" (plain byte-level), "smollm" (digits split one by one), "llama3" and "qwen2"
(their regex splits), and "spm" (SentencePiece-style BPE with byte fallback, as Llama 2 / Gemma).
"""
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tiny_tokenizer import CHATML_TEMPLATE

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we've got 12345 reasons to train models.",
    "Low-rank adapters add small matrices to a frozen model; they're cheap to train and easy to merge.",
    "def add(a, b):\n    return a + b\n\nprint(add(40, 2))  # prints 42",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "Tokenizers split text into pieces: words, numbers like 3.14159, and punctuation!?",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STYLES = ("gpt2", "smollm", "llama3", "qwen2", "spm")


def _byte_level(style: str):
    if style == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    regex = LLAMA3_REGEX if style == "llama3" else LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def make_bpe_tokenizer(style: str = "gpt2", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    if style == "spm":
        return _make_spm(vocab_size)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = _byte_level(style)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _make_spm(vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-2-like: '▁' for spaces (and prepended), <0xNN> byte pieces for anything outside the vocabulary."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_model.normalizer = normalizer
    trainer_model.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(byte_pieces), special_tokens=specials,
                                  show_progress=False)
    trainer_model.train_from_iterator(CORPUS, trainer)
    learned = trainer_model.get_vocab()
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in _json_model(trainer_model)["merges"]]
    # specials, then bytes, then the learned pieces in their order (as SentencePiece lays out a vocabulary)
    vocab = {t: i for i, t in enumerate(specials + byte_pieces)}
    for t, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    return tok


def _json_model(backend) -> dict:
    import json

    return json.loads(backend.to_str())["model"]
