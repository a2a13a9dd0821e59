"""Data-parallel scaling and equivalence through the real trainer, launched by torchrun.

The same global batch two ways: 1 GPU with gradient accumulation N, and N GPUs with accumulation 1. The loss
curves must agree (bf16 tolerance) and tokens/s should scale ~N x. Random-init weights of a real shape, LoRA r16,
pre-tokenized learnable rows of `--seq` tokens. Usage on a 2-GPU machine:

    python bench/bench_ddp.py --gpus 2            # runs both launches and prints the table
    python bench/bench_ddp.py --gpus 2 --fsdp     # adds a third launch: N GPUs with FSDP2 sharding, accumulation 1
    python bench/bench_ddp.py --gpus 2 --only-fsdp --meta-init --shape llama-3.1-70b   # larger than one GPU

`--fsdp` builds the model like the other runs (whole, on each GPU) and then shards it, so its losses must match
theirs. `--load-dir DIR` loads a saved model folder instead, with from_pretrained(fsdp=True) under --fsdp (rank 0
reads it into host memory, the others build on the meta device; each layer moves to the GPUs as it is sharded), and
reports the GPU peak while loading and each rank's peak host memory; `--write-model` first writes a random model of
`--shape` there (16-bit safetensors):

    python bench/bench_ddp.py --gpus 2 --only-fsdp --quant nf4 --load-dir /tmp/m8b --write-model

`--meta-init` builds it on the meta device instead, shards it and materialises only this rank's shards with random
values (per-rank seeds): a model larger than one GPU fits, but its losses are not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_packing import SHAPES, build, random_decoder, rows  # noqa: E402
from bench_lora import ROPE  # noqa: E402

SHAPES = dict(SHAPES, **{"llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                               num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                               tie_word_embeddings=False)})


def build_sharded(shape: str, device: str, r: int = 16):
    """LoRA model built on the meta device (no memory), sharded with FSDP2, then only this rank's shards allocated
    on `device` and filled: random bf16 base, PEFT's LoRA init (A kaiming-uniform, B zero), norms 1."""
    import math

    import torch

    from fasttune.api import FastLanguageModel
    from fasttune.models.causal_lm import CausalLM
    from fasttune.train.distributed import Dist
    from fasttune.train.fsdp import shard_model

    Dist()  # the process group, which fully_shard needs
    cfg = shape_config(shape)
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device("meta"):
        model = CausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.lora_settings, model.name_or_path, model.max_seq_length = None, shape, 4096
    model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r)  # LoRA weights on meta too (fp32)
    shard_model(model)
    model.to_empty(device=device)  # allocates the local shards only
    torch.manual_seed(1000 + int(os.environ.get("RANK", "0")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local()  # init the shard in place (before the first forward, which FSDP syncs from)
            if name.endswith("lora_A"):
                torch.nn.init.kaiming_uniform_(local, a=math.sqrt(5))
            elif name.endswith("lora_B"):
                local.zero_()
            elif p.dim() == 2:
                local.normal_(0.0, 0.02)
            else:
                local.fill_(1.0)  # RMSNorm weights
    return model


def shape_config(shape: str):
    from transformers import LlamaConfig

    if shape == "tiny":
        return LlamaConfig(**SHAPES["tiny"], max_position_embeddings=4096)
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_parameters=dict(ROPE),
                       rope_scaling=dict(ROPE), rms_norm_eps=1e-5)


def worker(a):
    import torch

    from fasttune import SFTConfig, SFTTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()  # a CPU (gloo) run only checks that the script works
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before building: each rank on its own GPU
    data = rows(256, SHAPES[a.shape]["vocab_size"], a.seq, a.seq + 1)
    load = {}
    if a.load_dir:
        model, load = loaded(a, cuda)
    else:
        model = build_sharded(a.shape, device) if a.meta_init else build(a.shape, device, a.quant)
    from fasttune.api import set_gradient_checkpointing

    set_gradient_checkpointing(model, {"on": True, "off": False}.get(a.gc, a.gc))
    results = {}
    for name, steps in (("warmup", 2), ("timed", a.steps)):
        with tempfile.TemporaryDirectory() as out:
            args = SFTConfig(output_dir=out, max_seq_length=a.seq, max_steps=steps, learning_rate=1e-3,
                             per_device_train_batch_size=a.bs, gradient_accumulation_steps=a.grad_accum,
                             logging_steps=1, lr_scheduler_type="constant", shuffle=False, seed=0, fsdp=a.fsdp)
            trainer = SFTTrainer(model=model, tokenizer=None, train_dataset=data, args=args)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            results[name] = (trainer.train(), [h["loss"] for h in trainer.log_history])
    metrics, losses = results["timed"]
    host = trainer.dist.gather(load.get("host_peak_gib"))
    if trainer.dist.is_main:
        import transformers

        print(json.dumps({"bench": "ddp", "gpus": world, "grad_accum": a.grad_accum, "shape": a.shape,
                          "mode": "fsdp" if a.fsdp else "ddp" if world > 1 else "single", "meta_init": a.meta_init,
                          "quant": a.quant,
                          "gc": a.gc, "batch_per_gpu": a.bs, "seq": a.seq, "steps": a.steps,
                          "tokens_per_second": round(metrics["train_tokens_per_second"], 1),
                          "peak_gib_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                          "losses": losses, "card": torch.cuda.get_device_name() if cuda else "cpu",
                          **({"load_dir": a.load_dir, "load_peak_gib_rank0": load["gpu_peak_gib"],
                              "load_host_peak_gib": host} if a.load_dir else {}),
                          "torch": torch.__version__,
                          "transformers": transformers.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def loaded(a, cuda: bool):
    """(model with LoRA r16, {"gpu_peak_gib", "host_peak_gib"}) from --load-dir, loaded with fsdp=True under --fsdp:
    this rank's GPU peak while loading and its peak host memory (resident set) so far."""
    import resource

    import torch

    from fasttune.api import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(a.load_dir, load_in_4bit=a.quant == "nf4", fsdp=a.fsdp,
                                                 dtype="bfloat16" if cuda else "float32")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    gpu = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    host = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # (KiB on Linux)
    return model, {"gpu_peak_gib": gpu, "host_peak_gib": host}


def write_model(shape: str, folder: str):
    """A random model of `shape` saved to `folder` as transformers' files (config.json, 16-bit safetensors), built on
    the CPU (~2 bytes a weight of host memory)."""
    import torch
    from safetensors.torch import save_file

    cfg = shape_config(shape)
    model = random_decoder(cfg, "cpu", torch.bfloat16)
    Path(folder).mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight")  # (tied: the embedding's)
    save_file(state, str(Path(folder) / "model.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--gc", default="auto", choices=["auto", "on", "off", "offload"], help="gradient checkpointing")
    ap.add_argument("--fsdp", action="store_true", help="also run N GPUs with FSDP2 sharding (accumulation 1)")
    ap.add_argument("--only-fsdp", action="store_true", help="run only the FSDP launch (a model too big for one GPU)")
    ap.add_argument("--meta-init", action="store_true",
                    help="FSDP: build on the meta device and materialise only each rank's shards (random values)")
    ap.add_argument("--quant", default="none", choices=["none", "nf4"],
                    help="nf4: the base quantised (QLoRA; under --fsdp its NF4 storage is sharded too)")
    ap.add_argument("--load-dir", default=None, help="load this model folder (with fsdp=True under --fsdp)")
    ap.add_argument("--write-model", action="store_true", help="first write a random --shape model to --load-dir")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddp.jsonl"))
    a = ap.parse_args()
    if a.meta_init and not (a.fsdp or a.only_fsdp):
        ap.error("--meta-init needs --fsdp or --only-fsdp (an unsharded model is built whole)")
    if a.meta_init and a.quant != "none":
        ap.error("--meta-init builds a bf16 base; --quant nf4 needs the whole model built first")
    if a.shape == "llama-3.1-70b" and not a.worker and not (a.only_fsdp and a.meta_init):
        ap.error("--shape llama-3.1-70b fits no single GPU: use it with --only-fsdp --meta-init")
    if a.load_dir and a.meta_init:
        ap.error("--load-dir loads real weights; --meta-init builds random ones")
    if a.worker:
        return worker(a)
    if a.write_model:
        if not a.load_dir:
            ap.error("--write-model writes to --load-dir; give it")
        write_model(a.shape, a.load_dir)
    rows_out = []
    for gpus, ga, fsdp in launches(a):  # the same global batch every way
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__,
               "--worker", "--shape", a.shape, "--seq", str(a.seq), "--bs", str(a.bs), "--steps", str(a.steps),
               "--grad-accum", str(ga), "--gc", a.gc, "--quant", a.quant] + (["--fsdp"] if fsdp else []) + (
               ["--meta-init"] if fsdp and a.meta_init else []) + (["--load-dir", a.load_dir] if a.load_dir else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"FAILED gpus={gpus} fsdp={fsdp}:\n{proc.stderr[-3000:]}", flush=True)
            return
        row = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
        rows_out.append(row)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    report(rows_out)


def launches(a) -> list[tuple[int, int, bool]]:
    """(processes, gradient accumulation, fsdp) per launch."""
    if a.only_fsdp:
        return [(a.gpus, 1, True)]
    runs = [(1, a.gpus, False), (a.gpus, 1, False)]
    return runs + [(a.gpus, 1, True)] if a.fsdp else runs


def report(rows_out: list[dict]):
    print(f"\n{'mode':<7} {'gpus':<5} {'GA':<3} {'tok/s':>9} {'peak GiB r0':>12}  card")
    for r in rows_out:
        peak = f"{r['peak_gib_rank0']:>12.2f}" if r["peak_gib_rank0"] is not None else f"{'-':>12}"
        print(f"{r.get('mode', '-'):<7} {r['gpus']:<5} {r['grad_accum']:<3} {r['tokens_per_second']:>9,.0f} {peak}  "
              f"{r['card']}")
    one = rows_out[0]
    for many in rows_out[1:]:
        diffs = [abs(x - y) / abs(x) for x, y in zip(one["losses"], many["losses"])]
        same_init = not many.get("meta_init")
        print(f"{many['mode']}: {many['tokens_per_second'] / one['tokens_per_second']:.2f}x of {one['mode']}; "
              + (f"max relative loss difference per step {max(diffs):.2e}; " if same_init else "")
              + f"losses {one['losses'][0]:.3f}->{one['losses'][-1]:.3f} vs "
              f"{many['losses'][0]:.3f}->{many['losses'][-1]:.3f}")


if __name__ == "__main__":
    main()
