"""Two GPUs (NCCL; skipped with fewer): the trainer's host-value sums (stop flag, token and item counts, the loss)
travel through a gloo group, so they do not wait for the device's queued work."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_host_sums_do_not_wait_for_the_gpu():
    worker = str(Path(__file__).with_name("host_sum_worker.py"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           worker], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for row in rows:
        assert row["total"] == 3.0 and row["any"] is True
        assert row["gpu_still_busy"], row  # answered before the queued device work finished
