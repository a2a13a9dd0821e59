"""Gated MLP activations, act(gate) * up: SwiGLU (silu) and GeGLU (exact or tanh gelu).

The Triton path computes in fp32 with one rounding, and saves only gate and up for backward (autograd on the
torch reference also keeps act(gate), a third intermediate-sized tensor).
"""
from functools import partial

import torch
import torch.nn.functional as F

from fasttune.kernels import rebuild
from fasttune.kernels.dispatch import HAVE_TRITON, use_triton

ACT_IDS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu": 2}


def gated_act_reference(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up in torch, for gate and up of the same shape (..., intermediate). act: "silu" (SwiGLU),
    "gelu_pytorch_tanh" / "gelu_tanh" (tanh-approximated GeGLU) or "gelu" (exact erf GeGLU), as transformers'
    ACT2FN names them. Raises ValueError for any other act."""
    if act == "silu":
        return F.silu(gate) * up
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh") * up
    if act == "gelu":
        return F.gelu(gate) * up
    raise ValueError(f"unsupported activation {act}")


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def act_and_grad(g, ACT: tl.constexpr):
        """act(g) and act'(g) in fp32."""
        if ACT == 0:
            s = tl.sigmoid(g)
            return g * s, s + g * s * (1.0 - s)
        elif ACT == 1:
            k: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
            inner = k * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh
            return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 0.134145 * g * g)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            return g * cdf, cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)

    @triton.jit
    def _gated_fwd(g_ptr, u_ptr, y_ptr, n, cols, stride, ACT: tl.constexpr, PACKED: tl.constexpr,
                   BLOCK: tl.constexpr):
        """y (rows, cols) contiguous from gate and up: contiguous tensors, or with PACKED rows `stride` elements
        apart (the two halves of one gate_up tensor; only then the per-element row/column split)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        src = offs
        if PACKED:
            src = (offs // cols) * stride + offs % cols
        g = tl.load(g_ptr + src, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + src, mask=mask, other=0.0).to(tl.float32)
        a, _ = act_and_grad(g, ACT)
        tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, cols, stride, ACT: tl.constexpr, PACKED: tl.constexpr,
                   BLOCK: tl.constexpr):
        """dgate and dup laid out as gate and up (see _gated_fwd) from dy (rows, cols) contiguous."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        src = offs
        if PACKED:
            src = (offs // cols) * stride + offs % cols
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + src, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + src, mask=mask, other=0.0).to(tl.float32)
        a, da = act_and_grad(g, ACT)
        tl.store(dg_ptr + src, (dy * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + src, (dy * a).to(du_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


class _GatedActFunction(torch.autograd.Function):
    """act(gate) * up for two tensors of one shape (made contiguous); saves gate and up for backward."""

    @staticmethod
    def forward(ctx, gate, up, act_id):
        """gate, up (...) same shape, any float dtype; act_id: ACT_IDS value. Returns act(gate) * up like gate."""
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        _gated_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, 1, 1, ACT=act_id, PACKED=False, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.act_id = act_id
        return y

    @staticmethod
    def backward(ctx, dy):
        """dy like the output -> (dgate, dup, None), by the fp32 kernel."""
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _gated_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dg, du, n, 1, 1, ACT=ctx.act_id, PACKED=False,
                                              BLOCK=_BLOCK)
        return dg, du, None


class _PackedGatedActFunction(torch.autograd.Function):
    """act(gate) * up from one (..., 2I) tensor, gate in the first half: no copies of the halves in forward, and
    its gradient comes back as one (..., 2I) tensor (autograd of chunk would concatenate two)."""

    @staticmethod
    def forward(ctx, gate_up, act_id):
        """gate_up (..., 2I) -> (..., I); saves gate_up for backward."""
        gate_up = gate_up.contiguous()
        cols = gate_up.shape[-1] // 2
        y = gate_up.new_empty(*gate_up.shape[:-1], cols)
        n = y.numel()
        _gated_fwd[(triton.cdiv(n, _BLOCK),)](gate_up, gate_up[..., cols:], y, n, cols, 2 * cols, ACT=act_id,
                                              PACKED=True, BLOCK=_BLOCK)
        ctx.save_for_backward(gate_up)
        ctx.act_id = act_id
        return y

    @staticmethod
    def backward(ctx, dy):
        """dy (..., I) -> (d gate_up (..., 2I), None)."""
        (gate_up,) = ctx.saved_tensors
        dy = dy.contiguous()
        cols = gate_up.shape[-1] // 2
        d = torch.empty_like(gate_up)
        n = dy.numel()
        _gated_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate_up, gate_up[..., cols:], d, d[..., cols:], n, cols, 2 * cols,
                                              ACT=ctx.act_id, PACKED=True, BLOCK=_BLOCK)
        return d, None


def _act_again(gate, up, *, act_id):
    """_GatedActFunction's output again from its saved gate and up (kernels/rebuild.py)."""
    y = torch.empty_like(gate)
    n = gate.numel()
    _gated_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, 1, 1, ACT=act_id, PACKED=False, BLOCK=_BLOCK)
    return y


def _packed_act_again(gate_up, *, act_id):
    """_PackedGatedActFunction's output again from its saved gate_up."""
    cols = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], cols)
    n = y.numel()
    _gated_fwd[(triton.cdiv(n, _BLOCK),)](gate_up, gate_up[..., cols:], y, n, cols, 2 * cols, ACT=act_id,
                                          PACKED=True, BLOCK=_BLOCK)
    return y


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, shaped like gate: the Triton kernel where `use_triton(gate)` and the shapes
    match, else `gated_act_reference`. Raises ValueError for an act not listed there."""
    if act not in ACT_IDS:
        raise ValueError(f"unsupported activation {act}")
    if use_triton(gate) and gate.shape == up.shape:
        y = _GatedActFunction.apply(gate, up, ACT_IDS[act])
        if rebuild.active() and gate.is_contiguous() and up.is_contiguous():  # (else the saved ones are copies)
            rebuild.mark(y, partial(_act_again, act_id=ACT_IDS[act]), gate.detach(), up.detach())
        return y
    return gated_act_reference(gate, up, act)


def gated_act_packed(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for gate_up (..., 2I) holding gate in its first half and up in its second (a fused gate_up
    projection's output, transformers' MoE experts layout): (..., I). Equals gated_act(*gate_up.chunk(2, -1), act);
    the Triton path (use_triton) reads the halves in place. Raises ValueError for an act gated_act refuses or an
    odd last dimension."""
    if act not in ACT_IDS:
        raise ValueError(f"unsupported activation {act}")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension {gate_up.shape[-1]} is odd: it must hold gate and up halves")
    if use_triton(gate_up) and gate_up.numel():
        y = _PackedGatedActFunction.apply(gate_up, ACT_IDS[act])
        if rebuild.active() and gate_up.is_contiguous():
            rebuild.mark(y, partial(_packed_act_again, act_id=ACT_IDS[act]), gate_up.detach())
        return y
    return gated_act_reference(*gate_up.chunk(2, dim=-1), act)
