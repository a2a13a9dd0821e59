"""The trainer's per-phase memory report measures what each phase allocated (skipped without CUDA)."""
import pytest
import torch

from fasttune.train.memory_report import PhaseMemory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_peaks_per_phase():
    dev = torch.device("cuda")
    mem = PhaseMemory(dev)
    base = torch.cuda.memory_allocated(dev)
    big = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev)  # 0.5 GiB during "forward_backward"
    del big
    mem.mark("forward_backward")
    small = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)  # 64 MiB during "optimizer"
    del small
    mem.mark("optimizer")
    r = mem.report()
    assert abs(r["memory/forward_backward_peak_gib"] - (base / 2**30 + 0.5)) < 0.01
    assert abs(r["memory/optimizer_peak_gib"] - (base / 2**30 + 1 / 16)) < 0.01
    assert r["memory/reserved_gib"] >= 0.5 and mem.report() == {"memory/reserved_gib": r["memory/reserved_gib"]}


def test_cpu_reports_nothing():
    assert PhaseMemory(torch.device("cpu")).report() == {}
