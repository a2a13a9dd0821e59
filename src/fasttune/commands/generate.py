"""`fasttune generate`: continue one or more prompts (through the chat template by default) and print the replies.

    fasttune generate --adapter out/adapter --prompt "What is LoRA?"
    fasttune generate --model model.gguf --prompt "One" --prompt "Two" --temperature 0.7 --seed 1
    fasttune generate --adapter out/adapter --image cat.png --prompt "What is in the picture?"   # a VLM
    fasttune generate --adapter out/adapter --video frames/ --fps 2 --prompt "What happens?"     # frames in a folder
"""
from __future__ import annotations

import sys


def register(subparsers):
    """Add the `generate` subcommand (model flags, --prompt (repeatable), --no-chat, --image and --video
    (repeatable), --fps, sampling flags: greedy, 256 new tokens) to the CLI's argparse subparsers."""
    from fasttune.commands._common import add_model_flags, add_sampling_flags

    p = subparsers.add_parser("generate", help="generate text from prompts (KV cache, batched)")
    add_model_flags(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="a user message (repeat the flag for a batch of prompts)")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, not as a chat turn")
    p.add_argument("--image", action="append", default=[],
                   help="an image file for a vision-language model, shown before the prompt's text (repeat it: "
                        "with one prompt all images go with it, with several prompts one image per prompt)")
    p.add_argument("--video", action="append", default=[],
                   help="a video file (.mp4, .mov, .webm, ...; needs PyAV) or a folder of its frames (.png / .jpg "
                        "/ .webp in name order, already sampled) for a vision-language model that reads videos "
                        "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Gemma 4); shown before the prompt's text, after "
                        "its images; repeat it as --image")
    p.add_argument("--fps", type=float, default=None,
                   help="frames a second: the rate to sample a --video file at (default 2), or the rate of a "
                        "folder's frames (default 24, as transformers assumes)")
    add_sampling_flags(p, temperature=0.0, top_p=1.0, max_new_tokens=256)
    p.set_defaults(func=cmd_generate)


def cmd_generate(ns) -> int:
    """Run `fasttune generate` on parsed arguments `ns`. A text model gets the prompts as one left-padded batch
    (through the chat template unless --no-chat): one prompt streams its reply to stdout, several print "### <prompt>"
    and the reply each; a vision-language model (or --image / --video) goes through _generate_with_images, which
    prints the same blocks. Returns 0. Raises ConfigError for --image / --video on a text model, an image or video
    count that fits no rule, or --fps without --video; DataError for a video the model's processor does not read;
    and what load_model_and_tokenizer (ModelLoadError, ConfigError) and generate (ConfigError) raise."""
    from transformers import TextStreamer

    from fasttune.commands._common import describe_model, load_model_and_tokenizer, sampling_kwargs
    from fasttune.generate import chat_prompt_ids, left_pad, new_tokens, stop_token_ids

    model, tok = load_model_and_tokenizer(ns.model, ns.adapter, ns.dtype)
    print(f"fasttune generate with {describe_model(model, ns.adapter)}", file=sys.stderr, flush=True)  # stdout: replies
    if ns.image or ns.video or getattr(model, "family", None) is not None:
        return _generate_with_images(ns, model, tok)
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


def _generate_with_images(ns, model, tok) -> int:
    """A vision-language model's replies; images and videos per prompt as --image / --video describe. Raises
    ConfigError for media on a text model, a count that fits neither rule, or --fps without --video."""
    from fasttune.commands._common import sampling_kwargs
    from fasttune.errors import ConfigError
    from fasttune.generate import generate_vision_text

    flag = "--video" if ns.video and not ns.image else "--image"
    if getattr(model, "family", None) is None:
        raise ConfigError(f"{flag}: {ns.model or ns.adapter} is a text-only model; pass a vision-language model "
                          f"(e.g. Qwen2.5-VL) to generate from images or videos.")
    if ns.fps is not None and not ns.video:
        raise ConfigError("--fps is the rate of --video frames; pass --video FOLDER with it (or drop --fps).")
    images, videos = _per_prompt(ns.image, ns.prompt, "--image"), _per_prompt(ns.video, ns.prompt, "--video")
    rate = {} if ns.fps is None else {"fps": ns.fps}
    contents = [[{"type": "image", "image": i} for i in imgs] + [{"type": "video", "video": v, **rate} for v in vids]
                + [{"type": "text", "text": p}] for p, imgs, vids in zip(ns.prompt, images, videos)]
    options = sampling_kwargs(ns)
    replies = generate_vision_text(model, tok, contents, max_new_tokens=options.pop("max_new_tokens", 256), **options)
    for prompt, reply in zip(ns.prompt, replies):
        print(f"### {prompt}\n{reply}\n")
    return 0


def _per_prompt(media: list, prompts: list, flag: str) -> list[list]:
    """--image / --video values per prompt: all with a single prompt, else none or one per prompt. Raises
    ConfigError for another count."""
    from fasttune.errors import ConfigError

    if len(prompts) == 1:
        return [media]
    if len(media) in (0, len(prompts)):
        return [[m] for m in media] if media else [[] for _ in prompts]
    raise ConfigError(f"{len(media)} {flag} for {len(prompts)} --prompt: give one per prompt, or any number with a "
                      f"single prompt.")
