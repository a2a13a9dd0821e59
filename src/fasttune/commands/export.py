"""`fasttune export`: a trained adapter (or any model we load) as a merged transformers checkpoint or a GGUF file.

    fasttune export --adapter out/adapter --format gguf --quantization q8_0 --output model.gguf
    fasttune export --adapter out/adapter --format gguf --quantization q4_k_m,q8_0 --output gguf/   # one file each
    fasttune export --adapter out/adapter --format merged --output merged/
    fasttune export --adapter out/adapter --format merged --quantization nf4 --output merged-4bit/   # bnb-4bit
    fasttune export --adapter out/adapter --format merged --quantization fp8 --output merged-fp8/    # FP8 blocks
    fasttune export --model model.gguf --format merged --output merged/      # GGUF -> transformers
    fasttune export --adapter out/adapter --format gguf --quantization q4_k_m --imatrix --imatrix-data train.jsonl \
        --output model.gguf      # k-quants weighted by an importance matrix measured on the training data
"""
from __future__ import annotations

FORMATS = ("merged", "gguf")


def register(subparsers):
    """Add the `export` subcommand (model flags, --format merged|gguf, --quantization, --output) to the CLI's argparse
    subparsers."""
    from fasttune.commands._common import add_model_flags

    p = subparsers.add_parser("export", help="write a merged checkpoint or a GGUF file (+ Ollama Modelfile)")
    add_model_flags(p, adapter_help="adapter folder to merge (its base model is loaded from the adapter config "
                                    "unless --model is given)")
    p.add_argument("--format", required=True, choices=FORMATS, help="merged: transformers safetensors folder; "
                                                                     "gguf: llama.cpp / Ollama file")
    p.add_argument("--quantization", default=None,
                   help="GGUF: f32 | f16 | bf16 | q8_0 (default) | q4_k_m | q5_k_m | q6_k | q4_k_s | q5_k_s | "
                        "q3_k_s | q3_k_m | q3_k_l | q2_k | q4_0 | q4_1 | q5_0 | q5_1 | mxfp4_moe (MoE models: "
                        "experts in MXFP4, as llama.cpp's gpt-oss files) (llama.cpp's mixtures, same "
                        "types and bytes as llama-quantize), or a comma list such as q4_k_m,q8_0 (one file each, "
                        "merged once); merged: nf4 writes a bitsandbytes 4-bit checkpoint, fp8 a FineGrainedFP8 "
                        "one (128 x 128 block scales) (default: the model's 16/32-bit weights)")
    p.add_argument("--imatrix", action="store_true",
                   help="GGUF: weight the quantizers by an importance matrix (llama.cpp's imatrix: the mean square "
                        "of each input feature), measured on --imatrix-data through the fine-tuned model; for the "
                        "k-quants and q4_0/q4_1/q5_0/q5_1 (llama.cpp ignores it for f16/bf16/f32/q8_0)")
    p.add_argument("--imatrix-data", default=None, metavar="FILE",
                   help="sample text for --imatrix (implies it): your training data file (.jsonl/.json/.csv/.parquet "
                        "or a save_to_disk folder; rows formatted as in training), a .txt file, or a llama.cpp "
                        "imatrix .gguf to use as it is")
    p.add_argument("--imatrix-tokens", type=int, default=None, metavar="N",
                   help="tokens of --imatrix-data to measure (default 4096)")
    p.add_argument("--output", required=True, help="merged: a folder; gguf: a .gguf path or a folder (several "
                                                   "methods: <stem>.<QUANT>.gguf beside the path, or "
                                                   "model.<QUANT>.gguf in the folder)")
    p.set_defaults(func=cmd_export)


def cmd_export(ns) -> int:
    """Run `fasttune export` on parsed arguments `ns`: a merged transformers checkpoint (save_pretrained_merged;
    --quantization nf4: merged_4bit, fp8: merged_fp8) or GGUF file(s) and a Modelfile (save_pretrained_gguf, default
    q8_0), printing what was written; returns 0. Raises ConfigError, before loading anything, without --model or
    --adapter, for a --quantization other than nf4 / fp8 with --format merged, or an unknown GGUF quantization;
    and what loading (ModelLoadError) and the exporters raise."""
    from fasttune.commands._common import load_model_and_tokenizer
    from fasttune.errors import ConfigError
    from fasttune.export.gguf import IMATRIX_METHODS, resolve_quantizations
    from fasttune.export.gguf_mmproj import is_vision_model, mmproj_target, mmproj_type

    if not ns.model and not ns.adapter:
        raise ConfigError("fasttune export needs --adapter DIR (a trained adapter) or --model PATH.")
    if ns.format == "merged" and ns.quantization not in (None, "nf4", "fp8"):
        raise ConfigError(f"--quantization {ns.quantization} does not apply to --format merged: use nf4 (a "
                          f"bitsandbytes 4-bit checkpoint), fp8 (FineGrainedFP8, 128 x 128 blocks) or leave it out "
                          f"for 16/32-bit weights (see --dtype).")
    quants = resolve_quantizations(ns.quantization or "q8_0") if ns.format == "gguf" else None  # fail before loading
    imatrix = _imatrix_source(ns, quants)
    model, tok = load_model_and_tokenizer(ns.model, ns.adapter, ns.dtype, need_tokenizer=ns.format == "gguf")
    if ns.format == "merged":
        method = {"nf4": "merged_4bit", "fp8": "merged_fp8"}.get(ns.quantization, "merged_16bit")
        out = model.save_pretrained_merged(ns.output, tok, save_method=method)
        auto = "AutoModelForImageTextToText" if getattr(model, "family", None) is not None else \
            "AutoModelForSequenceClassification" if getattr(model, "is_sequence_classifier", False) else \
            "AutoModelForCausalLM"
        print(f"fasttune: wrote {out} (load with transformers.{auto}.from_pretrained('{out}'))")
        return 0
    out = model.save_pretrained_gguf(ns.output, tok, quantization_method=quants if len(quants) > 1 else quants[0],
                                     imatrix=imatrix, imatrix_tokens=ns.imatrix_tokens)
    paths = out if isinstance(out, list) else [out]
    for path, quant in zip(paths, quants):
        print(f"fasttune: wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB, {quant})")
    if imatrix is not None:
        used = [q for q in quants if q in IMATRIX_METHODS]
        print(f"fasttune: importance matrix from {imatrix} weighted the quantizers of {', '.join(used)}")
    if is_vision_model(model):  # the vision tower and projector: one mmproj file beside the text model's
        projector = mmproj_target(paths[0], mmproj_type(quants))
        print(f"fasttune: wrote {projector} ({projector.stat().st_size / 2**20:,.1f} MiB, vision tower and projector)")
        print(f"fasttune: wrote {paths[0].parent / 'Modelfile'} (FROM {paths[0].name}, FROM {projector.name})")
        print(f"  llama.cpp: llama-mtmd-cli -m {paths[0]} --mmproj {projector} --image IMAGE -p PROMPT\n"
              f"  Ollama:    cd {paths[0].parent} && ollama create my-model -f Modelfile")
        return 0
    print(f"fasttune: wrote {paths[0].parent / 'Modelfile'} (FROM {paths[0].name})")
    print(f"  llama.cpp: llama-cli -m {paths[0]}\n  Ollama:    cd {paths[0].parent} && ollama create my-model -f "
          f"Modelfile")
    return 0


def _training_data(ns):
    """The data file `fasttune train` recorded in the run folder holding --adapter (or --model), when it still
    exists; else None."""
    import json
    from pathlib import Path

    folder = ns.adapter or ns.model
    record = Path(folder).expanduser().parent / "fasttune_run.json" if folder else None
    if record is None or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text()).get("data")
    except (OSError, ValueError):
        return None
    if data and Path(data).exists():
        print(f"fasttune: --imatrix measures on the training data recorded in {record}: {data}")
        return data
    return None


def _imatrix_source(ns, quants):
    """The --imatrix-data path (by default the training data recorded beside --adapter) when --imatrix or
    --imatrix-data is given, else None; ConfigError (before the model loads) for --format merged, methods that do
    not use it, no data given or recorded, or a path that does not exist."""
    from pathlib import Path

    from fasttune.errors import ConfigError
    from fasttune.export.gguf import IMATRIX_METHODS

    if not ns.imatrix and ns.imatrix_data is None and ns.imatrix_tokens is None:
        return None
    if ns.format != "gguf":
        raise ConfigError("--imatrix applies to --format gguf only (it weights llama.cpp's quantizers).")
    if not any(q in IMATRIX_METHODS for q in quants):
        raise ConfigError(f"--imatrix has no effect on --quantization {','.join(quants)}: llama.cpp uses an importance "
                          f"matrix only in the k-quants (q2_k .. q6_k) and q4_0/q4_1/q5_0/q5_1. Leave --imatrix out, "
                          f"or use e.g. --quantization q4_k_m.")
    if ns.imatrix_data is None:
        ns.imatrix_data = _training_data(ns)
    if ns.imatrix_data is None:
        raise ConfigError("--imatrix needs --imatrix-data FILE: the text to measure the importance matrix on, usually "
                          "the training data file (.jsonl/.json/.csv/.parquet, or a .txt), or a llama.cpp imatrix "
                          ".gguf. Without it, the data file `fasttune train` recorded beside the adapter "
                          "(fasttune_run.json in its run folder) is used; none was found.")
    if not Path(ns.imatrix_data).expanduser().exists():
        raise ConfigError(f"--imatrix-data {ns.imatrix_data}: no such file or folder.")
    return ns.imatrix_data
