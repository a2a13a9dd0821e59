"""`fasttune generate`: continue one or more prompts (through the chat template by default) and print the replies.

    fasttune generate --adapter out/adapter --prompt "What is LoRA?"
    fasttune generate --model model.gguf --prompt "One" --prompt "Two" --temperature 0.7 --seed 1
"""
from __future__ import annotations

import sys


def register(subparsers):
    from fasttune.command_helpers import add_model_flags, add_sampling_flags

    p = subparsers.add_parser("generate", help="generate text from prompts (KV cache, batched)")
    add_model_flags(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="a user message (repeat the flag for a batch of prompts)")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, not as a chat turn")
    add_sampling_flags(p, temperature=0.0, top_p=1.0, max_new_tokens=256)
    p.set_defaults(func=cmd_generate)


def cmd_generate(ns) -> int:
    from transformers import TextStreamer

    from fasttune.command_helpers import describe_model, load_model_and_tokenizer, sampling_kwargs
    from fasttune.generate import chat_prompt_ids, left_pad, new_tokens, stop_token_ids

    model, tok = load_model_and_tokenizer(ns.model, ns.adapter, ns.dtype)
    print(f"fasttune generate with {describe_model(model, ns.adapter)}", file=sys.stderr, flush=True)  # stdout: replies
    rows = [chat_prompt_ids(tok, [{"role": "user", "content": p}], chat=not ns.no_chat) for p in ns.prompt]
    stops = stop_token_ids(tok, model)
    ids, mask = left_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else stops[0])
    # One prompt streams its reply as it is generated; a batch prints each reply when all are done.
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if len(rows) == 1 else None
    # model.generate: our KV-cache generate, or transformers' for a model on the transformers fallback
    out = model.generate(ids, attention_mask=mask, eos_token_id=stops, streamer=streamer, **sampling_kwargs(ns))
    if streamer is None:
        for i, prompt in enumerate(ns.prompt):
            reply = tok.decode(new_tokens(out[i], ids.shape[1], stops), skip_special_tokens=True)
            print(f"### {prompt}\n{reply}\n")
    return 0
