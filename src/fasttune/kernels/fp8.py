"""FP8 (e4m3) matrix products with row-wise scales, for frozen weights stored in FP8 (quant/fp8_rows.py).

A weight W (N, K) is stored as Wq (float8_e4m3fn) and one fp32 scale per row (W ~= diag(ws) Wq). The forward
product x @ W^T quantises x per row (per token) the same way and runs one FP8 GEMM with both sets of scales applied
to its fp32 accumulators (torch._scaled_mm's row-wise scaling, cuBLAS / CUTLASS on compute capability >= 8.9):

    y = diag(xs) (xq @ Wq^T) diag(ws)

The input gradient dx = g @ W = (g diag(ws)) @ Wq: the weight's row scales lie along the contraction, so they are
folded into g before g is quantised per row, and Wq is multiplied unscaled. FP8 GEMMs on Hopper take both operands
K-major, so backward reads a transposed copy of Wq made for the call (one byte in and out per weight).

This is the recipe of torchao's float8 "rowwise" training and of DeepSeek-V3's FP8 GEMMs with per-token activation
scales (there with 1 x 128 / 128 x 128 blocks): e4m3 for activations, weights and gradients, the scale of a row its
absolute maximum / 448 (e4m3's largest finite value). Values are rounded to nearest (torch's cast after clamping).

`quantize_rows` has a Triton kernel (one pass for the maximum, one to scale and cast; fp32 arithmetic) beside its
torch reference `quantize_rows_reference`. Products of few rows (decode steps, short prefills: `few_rows_pay`) run in
a Triton kernel that reads each weight row once per block of rows; cuBLAS' FP8 GEMM, whose tiles are 128 rows, ran
below the 16-bit GEMV's speed at one row and at the 16-bit GEMM's at 64. Where the FP8
GEMM cannot run (a CPU, a GPU below compute capability 8.9, sizes not multiples of 16) the products are computed
from the same quantised values in fp32
(`scaled_mm_reference`), so the numbers differ from the GPU's only by the order of the sums.
"""
from __future__ import annotations

import functools

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton
from fasttune.kernels.transpose import swap_outer

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_TINY = 1e-12  # the smallest row maximum scaled by: an all-zero row gets zeros, not NaN


def quantize_rows_reference(x: torch.Tensor, col_scale: torch.Tensor | None = None):
    """x (M, K) (any float dtype), col_scale (K,) fp32 or None -> (q (M, K) float8_e4m3fn, s (M, 1) fp32) with
    q * s ~= x * col_scale: for each row v (fp32), s = max|v| / 448 and q = v * (448 / max|v|) rounded to the
    nearest e4m3 value (ties to even)."""
    v = x.float() if col_scale is None else x.float() * col_scale.float()
    amax = v.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY)
    top = torch.full_like(amax, FP8_MAX)  # tensor by tensor: torch divides a scalar by multiplying its reciprocal
    return (v * (top / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8), amax / top


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_e4m3(v):
        """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still fp32: adding and subtracting
        1.5 x 2^(23 + step exponent) makes fp32's own rounding drop the bits below the step (2^(e - 3) for a
        binade 2^e, 2^-9 below e4m3's smallest normal 2^-6). The cast of the exact result is then exact everywhere
        (Triton's interpreter rounds some values that cross a binade to the wrong power of two)."""
        a = tl.abs(v)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step = tl.maximum(e, -6) - 3
        magic = ((step + 23 + 127) << 23 | 0x400000).to(tl.float32, bitcast=True)
        r = (a + magic) - magic
        bits = v.to(tl.int32, bitcast=True)  # v's sign bit onto r: -0.0 stays -0.0 as torch casts it
        return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, c_ptr, q_ptr, s_ptr, K, stride_x, HAS_COL: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """Program (row): the row's maximum |x * c|, then x * c * (448 / maximum) as e4m3 (fp32 arithmetic,
        correctly rounded divisions as torch's)."""
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride_x
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(base + offs, mask=offs < K, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(c_ptr + offs, mask=offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        top = tl.maximum(tl.max(amax, axis=0), 1e-12)
        tl.store(s_ptr + row, tl.div_rn(top, 448.0))
        inv = tl.div_rn(448.0, top)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(base + offs, mask=offs < K, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(c_ptr + offs, mask=offs < K, other=0.0)
            v = _round_e4m3(tl.minimum(tl.maximum(v * inv, -448.0), 448.0))
            tl.store(q_ptr + row * K + offs, v.to(q_ptr.dtype.element_ty), mask=offs < K)


    @triton.jit
    def _few_rows_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN: tl.constexpr, PROMOTE: tl.constexpr):
        """Program (block of BLOCK_N weight rows, block of BLOCK_M rows of x): y[m, n] = xs[m] ws[n] sum_k xq[m, k]
        wq[n, k]. On the GPU an FP8 tl.dot: Hopper's FP8 MMA sums in fewer bits than fp32, so its partial sums
        join the fp32 accumulator every PROMOTE products along K (128 = DeepSeek-V3's promotion interval N_C,
        four MMA instructions; Triton's default never promotes, measured 1.5% off at K = 14,336). WIDEN (the CPU
        interpreter): the values as fp32, exact."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :],
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            if WIDEN:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc, max_num_imprecise_acc=PROMOTE)
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        acc = acc * xs[:, None] * ws[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def _one_row_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (block of BLOCK_N weight rows): _few_rows_kernel for one row of x, as products and sums in
        registers (kernels/gemv.py's layout): a dot of 16-row tiles idled most of its lanes there."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :],
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0).to(tl.float32)
            acc += w * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(xs_ptr) * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


FEW_ROWS = 128  # up to this many rows of x (64 for weights of 8,192 rows or more), fp8_linear reads the weight once
# per block of rows in its own kernel (decode steps, short prefills); beyond, cuBLAS' FP8 GEMM


def few_rows_pay(m: int, n: int) -> bool:
    """Whether _few_rows beats torch._scaled_mm for m rows of x and n weight rows: on an H200 up to 64 rows for
    every 8B-shape weight, up to 128 for those of fewer than 8,192 rows (gate/up_proj's 14336 x 4096 at 128 rows:
    25.8 us against cuBLAS' 19.7)."""
    return m <= (FEW_ROWS if n < 8192 else 64)


def few_rows_blocks(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages) of _few_rows_kernel for m rows (2..FEW_ROWS) and n weight rows:
    the fastest of sweeps on an H200 over the 8B shape's four weight sizes at 16, 32, 64 and 128 rows (num_warps
    4). Up to 2,048 weight rows (k/v_proj) blocks of 16 give the card enough programs."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    if n <= 2048:
        return bm, 16 if m > 16 else 32, 256, 4
    if n < 8192:
        return bm, 32, 256, 4
    return (bm, 64, 256, 3) if m > 32 else (bm, 64, 256, 4)


def _few_rows(xq, xs, wq, ws, out_dtype, blocks: tuple[int, int, int, int] | None = None, promote: int = 128):
    """fp8_linear for x of at most FEW_ROWS rows, one Triton launch that reads each weight row once per block of x
    rows. M = 1: 2 rows x 1,024 columns, 2 warps (5.2 us for 4096 x 4096 where torch._scaled_mm took 13.2 and a
    bf16 GEMM 10.4; on the CPU interpreter, which runs programs one by one, 32 rows); else `blocks` or
    few_rows_blocks, the FP8 MMA's partial sums promoted every `promote` products (a multiple of 32, at most
    BLOCK_K). At 64 rows on an H200: 19.2 us for gate_proj's 14336 x 4096 (torch._scaled_mm 23.2, bf16 33.2),
    30.3 for down_proj (36.8, 36.4), 9.2 for k_proj's 1024 x 4096 (13.0, 8.4)."""
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 1:
        bn = 2 if xq.is_cuda else 32
        _one_row_kernel[(triton.cdiv(n, bn),)](xq, xs, wq, ws, y, n, k, BLOCK_N=bn, BLOCK_K=1024, num_warps=2)
    else:
        bm, bn, bk, stages = blocks or few_rows_blocks(m, n)
        _few_rows_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
            xq, xs, wq, ws, y, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            WIDEN=not xq.is_cuda, PROMOTE=promote, num_warps=4, num_stages=stages)
    return y


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None):
    """`quantize_rows_reference`'s (q, s) for x (M, K) with unit stride along K; the Triton kernel where
    use_triton(x)."""
    if not use_triton(x) or x.stride(-1) != 1:
        return quantize_rows_reference(x, col_scale)
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=FP8)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m:
        _quantize_rows_kernel[(m,)](x, x if col_scale is None else col_scale, q, s, k, x.stride(0),
                                    HAS_COL=col_scale is not None, BLOCK_K=min(2048, next_pow2(k)), num_warps=4)
    return q, s


def scaled_mm_reference(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """(a * sa) @ (b * sb) in fp32, cast to out_dtype: a (M, K) float8 with sa (M, 1); b (K, N) float8 with sb
    (1, N). What torch._scaled_mm computes with row-wise scales, up to the order of the sums."""
    return ((a.float() * sa) @ (b.float() * sb)).to(out_dtype)


def fp8_gemm_runs(x: torch.Tensor, *dims: int) -> bool:
    """Whether torch._scaled_mm runs for x's device and these inner / outer sizes: CUDA with compute capability
    >= 8.9 (Ada, Hopper, Blackwell), every size a multiple of 16."""
    if not x.is_cuda or any(d % 16 for d in dims):
        return False
    return _fp8_capable(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _fp8_capable(index: int) -> bool:
    """Compute capability >= 8.9 for CUDA device `index` (read once: this is asked for every FP8 product)."""
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _scaled_mm(a, sa, b, sb, out_dtype):
    """torch._scaled_mm with row-wise scales: a (M, K) row-major, b (K, N) column-major; bf16 out (the only
    output row-wise scaling gives), cast to out_dtype."""
    out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def fp8_linear(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """x @ W^T for x = xq * xs (M, K) and W = ws * wq (N, K): (M, N) in out_dtype. ws (N,) fp32."""
    n, k = wq.shape
    # (16-bit outputs only: the block shapes were chosen for those; fp32 models keep the GEMM's path)
    if few_rows_pay(xq.shape[0], n) and use_triton(xq) and out_dtype != torch.float32:
        return _few_rows(xq.contiguous(), xs.contiguous(), wq, ws, out_dtype)
    if fp8_gemm_runs(xq, n, k):
        return _scaled_mm(xq, xs, wq.t(), ws.view(1, n), out_dtype)
    return scaled_mm_reference(xq, xs, wq.t(), ws.view(1, n), out_dtype)


def fp8_linear_grad(gq: torch.Tensor, gs: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(gq * gs) @ wq: the input gradient of fp8_linear when g was quantised with col_scale=ws. gq (M, N), wq (N, K)
    -> (M, K) in out_dtype. On the GPU wq is first transposed to (K, N) (the GEMM reads both operands K-major)."""
    n, k = wq.shape
    ones = _unit_scales(k, gq.device)
    if fp8_gemm_runs(gq, n, k):
        wt = swap_outer(wq.view(torch.uint8).view(n, 1, k), torch.uint8).view(k, n).view(FP8)
        return _scaled_mm(gq, gs, wt.t(), ones, out_dtype)
    return scaled_mm_reference(gq, gs, wq, ones, out_dtype)


@functools.lru_cache(maxsize=64)
def _unit_scales(k: int, device: torch.device) -> torch.Tensor:
    """ones (1, k) fp32 on `device`: the unscaled weight's column scales, made once per width (backward asks for
    them per projection, and on a GPU every new tensor is a launch)."""
    return torch.ones(1, k, device=device, dtype=torch.float32)


def fp8_input_grad(g: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """g (M, N) @ W for W = ws * wq (N, K): g scaled by ws along N, quantised per row, one FP8 GEMM -> (M, K) in
    g's dtype."""
    gq, gs = quantize_rows(g, ws)
    return fp8_linear_grad(gq, gs, wq, g.dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, ws):
        """x (..., K) -> (..., N) in x's dtype; nothing of x is kept (the weight is frozen)."""
        ctx.save_for_backward(wq, ws)
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_rows(x2)
        return fp8_linear(xq, xs, wq, ws, x.dtype).view(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, grad):
        """grad (..., N) -> d(x) (..., K); the weight and its scales get none."""
        if not ctx.needs_input_grad[0]:
            return None, None, None
        wq, ws = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        return fp8_input_grad(g2, wq, ws).view(*grad.shape[:-1], wq.shape[1]), None, None


def fp8_matmul(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ W^T for the frozen W = ws * wq (wq (N, K) float8_e4m3fn, ws (N,) fp32) -> (..., N) in x's dtype,
    x quantised per row in forward and the gradient per row in backward (module docstring). Differentiable in x."""
    return _FP8Linear.apply(x, wq, ws)
