"""FSDP2 on CPU (gloo, 2 processes, fp32): per-step losses and the final adapter equal the 1-process run with the same
global batch, with and without per-layer recompute; checkpoints resume across world sizes and with/without FSDP."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_env import worker_env
from safetensors.torch import load_file

WORKER = str(Path(__file__).with_name("fsdp_worker.py"))
ADAPTER = Path("adapter") / "adapter_model.safetensors"


def _run(model_dir, out: Path, procs: int, **options) -> list[float]:
    cmd = [sys.executable, WORKER] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), WORKER]
    env = worker_env()
    if "kernels" in options:  # "triton": the fused LoRA function; the element-wise Triton kernels stay off
        env["FASTTUNE_KERNELS"] = options.pop("kernels")  # (interpreted they cost a minute; tests/kernels has them)
        env["TRITON_INTERPRET"] = "0"
    proc = subprocess.run(cmd + [str(model_dir), str(out), json.dumps(options)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same_adapter(a_dir: Path, b_dir: Path):
    a, b = load_file(str(a_dir / ADAPTER)), load_file(str(b_dir / ADAPTER))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("options", [
    {"checkpointing": False},
    # recompute inside backward re-runs each sharded layer (its all-gather hooks fire again); trainable
    # embeddings/lm_head live in the root's shard group, whose gradients are reduced at the end of backward
    {"checkpointing": True, "modules_to_save": ["embed_tokens", "lm_head"]},
    # NF4 buffers replicated, the rest sharded; packing leaves the last step short: one rank runs a filler pass
    {"checkpointing": True, "load_in_4bit": True, "packing": True},
    {"checkpointing": True, "method": "dpo"},  # reference pass + policy pass per micro-batch
    # the fused LoRA function (the default on GPUs) with sharded layers: its gradients reach FSDP's reduce-scatter
    {"checkpointing": True, "kernels": "triton"},
], ids=["recompute-off", "recompute-on-modules-to-save", "recompute-on-nf4-packing", "dpo", "fused-kernels"])
def test_fsdp_two_processes_equal_one(tiny_model_dir, tmp_path, options):
    folder = tiny_model_dir("llama")
    one = _run(folder, tmp_path / "one", 1, grad_accum=2, **options)
    two = _run(folder, tmp_path / "two", 2, grad_accum=1, fsdp=True, **options)
    steps = options.get("max_steps", 5)
    assert len(one) == steps and one[-1] < one[0] and len(set(one)) == steps
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    # only rank 0 wrote: one log, one checkpoint with full (gathered) tensors
    assert len((tmp_path / "two" / "log_history.jsonl").read_text().splitlines()) == steps
    _assert_same_adapter(tmp_path / "one" / "checkpoint-3", tmp_path / "two" / "checkpoint-3")


def test_fsdp_checkpoint_resumes_on_another_world_size(tiny_model_dir, tmp_path):
    """The checkpoint holds full LoRA tensors and the full optimizer state: a 2-process FSDP checkpoint resumes in
    one plain process, and a 1-process checkpoint in 2 FSDP processes, each continuing the uninterrupted run."""
    folder, opts = tiny_model_dir("llama"), {"modules_to_save": ["lm_head"]}
    two = _run(folder, tmp_path / "two", 2, grad_accum=1, fsdp=True, **opts)
    (tmp_path / "resumed_one").mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-3", tmp_path / "resumed_one" / "checkpoint-3")
    resumed = _run(folder, tmp_path / "resumed_one", 1, grad_accum=2, resume=True, **opts)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(two), rtol=1e-5, atol=0)
    _assert_same_adapter(tmp_path / "two", tmp_path / "resumed_one")

    one = _run(folder, tmp_path / "one", 1, grad_accum=2, **opts)
    (tmp_path / "resumed_two").mkdir()
    shutil.copytree(tmp_path / "one" / "checkpoint-3", tmp_path / "resumed_two" / "checkpoint-3")
    resumed = _run(folder, tmp_path / "resumed_two", 2, grad_accum=1, fsdp=True, resume=True, **opts)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(one), rtol=1e-5, atol=0)
    _assert_same_adapter(tmp_path / "one", tmp_path / "resumed_two")


def test_cli_gpus_fsdp(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"row {i} abc abc"}) for i in range(16)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fasttune.cli", "train", "--gpus", "2", "--fsdp", "--model",
                           str(tiny_model_dir("llama")), "--data", str(data), "--output-dir", str(out),
                           "--max-steps", "2", "--lora-r", "4"], capture_output=True, text=True, env=worker_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(out / ADAPTER))
    assert saved and all(t.dim() == 2 for t in saved.values())  # full tensors, not shards
    assert (out / "adapter" / "tokenizer_config.json").exists()
    assert proc.stdout.count("Sample after training") == 0  # generation is skipped on sharded models


def test_fsdp_needs_torchrun(tiny_model_dir, tmp_path):
    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
    from fasttune.errors import ConfigError

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    with pytest.raises(ConfigError, match="fsdp=True .* single process"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": "abc"}],
                   args=SFTConfig(output_dir=str(tmp_path), max_steps=1, fsdp=True))
