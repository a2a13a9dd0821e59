"""The files of a model folder besides its weights: the config's `architectures` field and the tokenizer. No
model classes here, so export/ can use them without importing the decoder; models/loading.py re-exports them.
"""
from __future__ import annotations

from pathlib import Path

from fasttune.errors import ModelLoadError
from fasttune.file_readers import read_json


def with_architectures(hf_config):
    """Fill `config.architectures` (the transformers class that loads these weights, e.g. LlamaForCausalLM) when the
    config lacks it, as configs built from GGUF metadata do; transformers' own save_pretrained always writes it, and
    tools that rebuild a model from its folder read it (TRL's reference model, vLLM, llama.cpp's converter)."""
    if not getattr(hf_config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
        if name is not None:
            hf_config.architectures = [name]
    return hf_config


def gguf_tokenizer(contents, required: bool):
    """The transformers tokenizer a parsed .gguf file (GGUFContents) describes (its build_tokenizer). For a file without
    a vocabulary, or one transformers cannot build, raises ModelLoadError when `required`, else returns None."""
    try:
        return contents.build_tokenizer()
    except (KeyError, ValueError, TypeError) as e:  # no vocabulary in the file, or a kind transformers cannot build
        if required:
            raise ModelLoadError(f"'{contents.path}' holds no tokenizer transformers can build ({type(e).__name__}: "
                                 f"{e}). Pass a model folder with tokenizer.json instead.") from None
        return None


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(path: Path, required: bool = True):
    """The tokenizer of a model folder (AutoTokenizer, local files only) or of a .gguf file (from its metadata). A
    damaged tokenizer JSON file is named in a ModelLoadError (file_readers.read_json); with no usable tokenizer, raises
    ModelLoadError when `required`, else returns None."""
    from transformers import AutoTokenizer

    try:
        if path.is_file():
            from fasttune.models.gguf_file import read_gguf

            return gguf_tokenizer(read_gguf(path), required)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        folder = path.parent if path.is_file() else path
        for name in TOKENIZER_JSON_FILES:  # a damaged file is named rather than reported as "no tokenizer"
            if (folder / name).is_file():
                read_json(folder / name, fix="Save the tokenizer again (tokenizer.save_pretrained) or copy it "
                                             "from the original model.")
        if required:
            raise ModelLoadError(f"No usable tokenizer in '{path}' ({e}). Save the tokenizer beside the weights "
                                 f"(tokenizer.json / tokenizer_config.json).") from None
        return None
