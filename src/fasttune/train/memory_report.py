"""Peak GPU memory per phase of a training step (forward+backward, optimizer), for the trainer's log."""
from __future__ import annotations

import torch


class PhaseMemory:
    """Peak torch.cuda.max_memory_allocated per named phase on `device`; a no-op on other devices."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on = device.type == "cuda"
        self.peaks: dict[str, int] = {}
        if self.on:
            torch.cuda.reset_peak_memory_stats(device)

    def mark(self, phase: str):
        """Close `phase`: record the peak allocated since the previous mark, then start a new window."""
        if not self.on:
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    def report(self) -> dict:
        """Peaks (GiB) since the last report, plus what the caching allocator holds; empty on a CPU."""
        if not self.on:
            return {}
        out = {f"memory/{phase}_peak_gib": round(b / 2**30, 3) for phase, b in self.peaks.items()}
        out["memory/reserved_gib"] = round(torch.cuda.memory_reserved(self.device) / 2**30, 3)
        self.peaks = {}
        return out
