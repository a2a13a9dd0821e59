"""RMSNorm. Statistics in fp32; `offset=1.0` gives Gemma's (1 + w) scale.

Only the torch reference exists so far; the Triton kernel lands beside it (speed issue).
"""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        # Gemma scales in fp32 before the cast back (matches transformers' GemmaRMSNorm).
        return (h * (offset + weight.float())).to(x.dtype)
    # Llama casts back first, then scales in the weight's dtype (matches LlamaRMSNorm).
    return weight * h.to(x.dtype)
