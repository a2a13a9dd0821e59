"""xIELU, the learnable activation of Apertus' ungated MLP (Huang et al., "Deriving Activation Functions Using
Integration", arXiv:2411.13010), computed as transformers' XIELUActivation computes it in Python:

    xielu(x) = alpha_p * x^2 + beta * x                              for x > 0
             = (expm1(min(x, eps)) - x) * alpha_n + beta * x          otherwise

with alpha_p = softplus(a_p) and alpha_n = beta + softplus(a_n), a_p and a_n learnable scalars per layer. Parameter
and buffer names (`alpha_p`, `alpha_n`, `beta`, `eps`) are transformers', so checkpoints load as they are. Plain torch
operations: an elementwise step beside the MLP's GEMMs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class XIELU(nn.Module):
    """xIELU with transformers' defaults (alpha_p 0.8, alpha_n 0.8, beta 0.5, eps -1e-6) until a checkpoint loads.
    alpha_p / alpha_n: (1,) parameters before softplus; beta / eps: 0-d buffers."""

    def __init__(self, alpha_p: float = 0.8, alpha_n: float = 0.8, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor([math.log(math.expm1(alpha_p))]))
        self.alpha_n = nn.Parameter(torch.tensor([math.log(math.expm1(alpha_n - beta))]))
        self.register_buffer("beta", torch.tensor(beta))
        self.register_buffer("eps", torch.tensor(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (...) -> xielu(x), same shape and dtype."""
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x)
