"""Gated MLP activations: SwiGLU (silu) and GeGLU (exact or tanh gelu)."""
import torch
import torch.nn.functional as F


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(gate) * up
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh") * up
    if act == "gelu":
        return F.gelu(gate) * up
    raise ValueError(f"unsupported activation {act}")
