"""torch.distributed on CPU (torchrun, gloo): the CLI's --gpus launch, a dead rank ending the job, the exit barrier.
That two DDP processes equal one process with the same global batch (losses and adapter) is the "ddp" case of
tests/train/test_fsdp.py::test_two_processes_equal_one, which shares the FSDP cases' two launches."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_env import worker_env

WORKER = str(Path(__file__).with_name("ddp_worker.py"))


def test_cli_gpus_flag_relaunches_under_torchrun(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"row {i} abc abc"}) for i in range(16)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fasttune.cli", "train", "--gpus", "2", "--model",
                           str(tiny_model_dir("llama")), "--data", str(data), "--output-dir", str(out),
                           "--max-steps", "2", "--no-sample", "--lora-r", "4"], capture_output=True, text=True,
                          env=worker_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert proc.stderr.count("gradient checkpointing auto") == 2  # two processes trained


def test_a_dead_rank_ends_the_job(tiny_model_dir, tmp_path):
    """Rank 1 dies mid-step while rank 0 waits in a collective: torchrun stops the job with an error naming the
    failed rank within its grace period; nothing hangs until the 10-minute collective timeout."""
    import time

    folder = str(tiny_model_dir("llama"))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           WORKER, folder, str(tmp_path / "out"), "1", "1"], capture_output=True, text=True,
                          env=worker_env(), timeout=240)
    assert proc.returncode != 0
    assert "exitcode  : 3" in proc.stderr and "rank      : 1" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 180
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("failed", [False, True])
def test_exit_meets_peers_in_a_barrier_unless_this_rank_failed(tmp_path, monkeypatch, failed):
    """At exit the group is destroyed while Python is alive; a normal exit first waits for the peers (no collective
    still in flight while a peer closes its connections), a failed one does not wait for peers stuck in training."""
    import torch.distributed as dist

    from fasttune.train import distributed

    monkeypatch.setattr(distributed, "_failed", [])
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1) or real_barrier(*a, **k))
    if failed:
        distributed.note_failure()
    distributed._destroy_process_group()
    assert not dist.is_initialized()
    assert barriers == ([] if failed else [1])
    distributed._destroy_process_group()  # a second call (atexit after an explicit one) is a no-op
