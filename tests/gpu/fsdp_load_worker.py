"""Run by tests/gpu/test_gpu_fsdp_loading.py under torchrun with one process (a one-rank NCCL group, which
shard_model needs and the trainer's fsdp=True refuses): a tiny NF4 model loaded with from_pretrained(fsdp=True) and
sharded by shard_model against the same model loaded on the GPU as usual.

argv: model_dir. Prints one JSON line: the tensors left off the GPU after sharding, GPU bytes held after the load,
the largest logits and LoRA-gradient differences from the usual load.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fasttune import FastLanguageModel
from fasttune.train.fsdp import shard_model


def main(model_dir):
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    kw = dict(dtype=torch.bfloat16, load_in_4bit=True)
    before = torch.cuda.memory_allocated()
    staged, _ = FastLanguageModel.from_pretrained(model_dir, fsdp=True, **kw)
    held_after_load = torch.cuda.memory_allocated() - before
    staged = FastLanguageModel.get_peft_model(staged, r=4, use_gradient_checkpointing=False)
    plain, _ = FastLanguageModel.from_pretrained(model_dir, **kw)
    plain = FastLanguageModel.get_peft_model(plain, r=4, use_gradient_checkpointing=False)
    shard_model(staged)
    tensors = {**dict(staged.named_parameters()), **dict(staged.named_buffers())}
    off_gpu = [n for n, t in tensors.items() if (t.to_local() if isinstance(t, DTensor) else t).device.type != "cuda"]
    ids = torch.randint(3, 250, (2, 24), device="cuda")
    out = {}
    for name, model in (("staged", staged), ("plain", plain)):
        model.train()
        with torch.no_grad():
            logits = model(ids).logits.float().cpu()
        model(ids, labels=ids).loss.backward()  # (with labels the loss is fused: no logits)
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float().cpu()
                 for n, p in model.named_parameters() if p.requires_grad}
        out[name] = (logits, grads)
    logit_diff = (out["staged"][0] - out["plain"][0]).abs().max().item()
    grad_diff = max((out["staged"][1][n] - g).abs().max().item() for n, g in out["plain"][1].items())
    print(json.dumps({"off_gpu": off_gpu, "held_after_load": held_after_load, "logit_diff": logit_diff,
                      "grad_diff": grad_diff, "grads": len(out["plain"][1]),
                      "grad_names_equal": sorted(out["plain"][1]) == sorted(out["staged"][1])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
