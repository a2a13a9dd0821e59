"""from_pretrained(fsdp=True) on a GPU: weights quantised on the GPU, kept in host memory, equal to a usual GPU
load; shard_model moves the model to the GPU as it shards it (one-rank NCCL group), with the usual load's logits and
LoRA gradients; with two GPUs, training loaded so equals training loaded as usual (same losses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttune import FastLanguageModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
TESTS = Path(__file__).parent.parent


def _tensors(model) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("family,quant", [("llama", "nf4"), ("llama", "int8"), ("llama", None),
                                          ("qwen3_moe", "nf4")])
def test_loaded_for_fsdp_waits_on_the_host_equal_to_a_gpu_load(family, quant, tiny_model_dir):
    folder = str(tiny_model_dir(family))
    kw = dict(dtype=torch.bfloat16, load_in_4bit=quant == "nf4", load_in_8bit=quant == "int8")
    plain, _ = FastLanguageModel.from_pretrained(folder, **kw)
    before = torch.cuda.memory_allocated()
    staged, _ = FastLanguageModel.from_pretrained(folder, fsdp=True, **kw)
    assert torch.cuda.memory_allocated() - before < 2**20  # the GPU only quantised (the temporaries are freed)
    assert staged.fsdp_device.type == "cuda"
    want, got = _tensors(plain), _tensors(staged)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].device.type == "cpu", name
        assert got[name].dtype == t.dtype and torch.equal(got[name], t.cpu()), name
    plain = FastLanguageModel.get_peft_model(plain, r=4)
    staged = FastLanguageModel.get_peft_model(staged, r=4)
    lora = {n: p for n, p in staged.named_parameters() if p.requires_grad}
    assert lora and all(p.device.type == "cpu" for p in lora.values())
    for n, p in plain.named_parameters():  # drawn on the GPU as a GPU load's are, kept on the host
        if p.requires_grad:
            assert torch.equal(lora[n], p.cpu()), n


def _torchrun(procs: int, script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(procs), script, *args], capture_output=True, text=True, env=env, timeout=300)


def test_shard_model_moves_a_host_model_to_the_gpu(tiny_model_dir):
    proc = _torchrun(1, str(Path(__file__).with_name("fsdp_load_worker.py")), str(tiny_model_dir("llama")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["off_gpu"] == [] and row["held_after_load"] < 2**20, row
    assert row["grad_names_equal"] and row["grads"] > 0, row
    assert row["logit_diff"] < 2e-2 and row["grad_diff"] < 1e-3, row


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("quant", ["load_in_4bit", "load_in_fp8"])  # (FP8: sharded as uint8 bytes over NCCL)
def test_two_gpus_train_alike_loaded_either_way(quant, tiny_model_dir, tmp_path):
    runs = [(str(tmp_path / name), {"fsdp": True, "grad_accum": 1, quant: True, "dtype": "bfloat16",
                                    "staged": name == "staged"}) for name in ("staged", "plain")]
    proc = _torchrun(2, str(TESTS / "train" / "fsdp_worker.py"), str(tiny_model_dir("llama")), json.dumps(runs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert losses[runs[0][0]] == losses[runs[1][0]], losses
