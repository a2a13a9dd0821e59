"""GRPO / RLOO under torchrun (2 CPU processes, gloo): each rank samples and scores only its own completions, the
rewards are gathered so that advantages of groups spanning ranks equal one process's, and evaluation splits its
batches between the ranks with the same metrics on both; on-policy distillation on 2 ranks equals one process;
A2PO's stage 1 samples a share of the prompts on each rank and gathers one process's values."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_env import worker_env
from tiny import hf_model, save_hf

WORKER = str(Path(__file__).with_name("grpo_ddp_worker.py"))


@pytest.fixture(scope="module")
def launched(tiny_tokenizer, tmp_path_factory):
    """One torchrun launch of the worker (GRPO, then RLOO) on the tiny Llama; its folder of per-rank results."""
    out = tmp_path_factory.mktemp("grpo_ddp")
    save_hf(hf_model("llama", seed=0), out / "llama", tiny_tokenizer)
    save_hf(hf_model("llama", seed=1, hidden_size=96), out / "teacher", tiny_tokenizer)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           WORKER, str(out / "llama"), str(out), str(out / "teacher")], capture_output=True, text=True,
                          env=worker_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_groups_spanning_ranks(method, launched):
    r0, r1 = (json.loads((launched / f"{method}_rank{r}.json").read_text()) for r in (0, 1))
    # Fixed completions: the ranks' own advantages, put together, are one process's
    assert r0["whole_groups"] + r1["whole_groups"] == pytest.approx(r0["one_process"], abs=1e-6)
    assert r0["split_group"] + r1["split_group"] == pytest.approx(r0["one_process_split"], abs=1e-6)
    assert len(set(r0["split_group"] + r1["split_group"])) == 4  # not each half normalised on its own
    # Training: 2 completions sampled per rank and step (before: the whole step's 4 on every rank), then the
    # end-of-training evaluation: 3 prompts x 4 completions in batches of one prompt, 2 on rank 0 and 1 on rank 1
    assert r0["train_sampled"] == [2, 2, 4, 4] and r1["train_sampled"] == [2, 2, 4]
    # the step's rollout metrics cover both ranks' completions: the same on both
    steps = [[e for e in r["log"] if "reward" in e] for r in (r0, r1)]
    assert len(steps[0]) == 2
    for a, b in zip(*steps, strict=True):
        # (kl, entropy and the clip ratios: each micro-batch's sums over both ranks, as TRL reduces them)
        for key in ("reward", "reward_std", "completions/mean_length", "frac_reward_zero_std", "kl", "entropy",
                    "clip_ratio/region_mean"):
            assert a[key] == pytest.approx(b[key]), key
    # evaluate() again: split alike, the same metrics on both ranks
    assert r0["sampled"] == [2, 2, 4, 4, 4, 4] and r1["sampled"] == [2, 2, 4, 4]
    assert r0["eval"] == pytest.approx(r1["eval"])
    assert {"eval_loss", "eval_reward", "eval_completions/mean_length"} <= set(r0["eval"])
    if method == "grpo":  # the entropy threshold (median) over both ranks' tokens, not each rank's own
        assert r0["entropy_mask"] == [[False, False, False]] and r1["entropy_mask"] == [[True, True, True]]


def test_distillation_on_two_ranks_equals_one_process(launched):
    """2 ranks of 2 prompts (the divergence summed over both ranks' completion tokens / their count) train as one
    process of 4: the same per-step losses, grad norms and completion metrics on rank 0's log."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    one = worker.distillation_trainer(str(launched / "llama"), str(launched / "teacher"), str(launched / "one"), 4)
    one.train()
    two = json.loads((launched / "distillation_rank0.json").read_text())
    assert len(two) == len(one.log_history) == 2
    for key in ("loss", "grad_norm", "completions/mean_length", "completions/max_length"):
        assert [h[key] for h in two] == pytest.approx([h[key] for h in one.log_history], rel=1e-5), key


def test_a2po_stage1_values_gathered_over_ranks(launched):
    r0, r1 = (json.loads((launched / f"a2po_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["values"] == r1["values"] == pytest.approx(r0["one_process"]) and len(r0["values"]) == 4
    assert r0["kept"] == r1["kept"] and r0["kept"] == [f"question {i} a b" for i in range(3)]  # 3 dropped on both
    assert any("loss" in e for e in r0["log"])
