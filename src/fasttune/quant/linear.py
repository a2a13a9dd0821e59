"""QuantLinear: a frozen Linear whose weight lives in NF4 or int8 (bitsandbytes layouts) or FP8 with row scales.
NF4 / int8: forward and backward dequantise the weight into a temporary and multiply in the compute dtype; nothing
weight-sized is kept for backward (autograd of a plain dequantise + matmul would save the 16-bit weight of every
layer). FP8: forward and backward multiply in FP8 (kernels/fp8.py), the activations and gradients quantised per row.

`state_dict()` writes bitsandbytes' keys, so a model saved with NF4 / int8 layers loads in transformers +
bitsandbytes as a "bnb-4bit" / "bnb-8bit" checkpoint, and such checkpoints load here; FP8 layers write
compressed-tensors' channel-wise keys (quant/fp8_rows.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from fasttune.kernels.fp8 import FP8
from fasttune.quant import fp8_rows, int8, nf4

QUANT_TYPES = ("nf4", "int8", "fp8")


class _DequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        """x (..., in_features) @ the layer's dequantised (out_features, in_features) weight^T -> (..., out_features)
        in x's dtype; only the layer is kept for backward (not the 16-bit weight)."""
        ctx.layer = layer
        return x @ layer.dequantized_weight(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        """grad (..., out_features) -> (d(x) (..., in_features) from a freshly dequantised weight, None)."""
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class ByteHeldFP8:
    """Mixin for a module whose FP8 weights `qweight` are held as their bytes, a uint8 tensor of the same shape
    (FSDP shards integer parameters as they are and would cast a floating one): reading `qweight` gives the FP8 view
    of those bytes (no copy); a sharded parameter (outside FSDP's forward) reads as it is held. Only the modules
    hold_fp8_as_bytes converts take it, so no other module pays for the attribute hook."""

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if name == "qweight" and value.dtype == torch.uint8 and not hasattr(value, "device_mesh"):
            return value.view(FP8)
        return value


@functools.lru_cache(maxsize=None)
def _byte_held(cls: type) -> type:
    """`cls` with ByteHeldFP8 in front (one class per quantised module class)."""
    return type(f"ByteHeld{cls.__name__}", (ByteHeldFP8, cls), {})


def hold_fp8_as_bytes(module: nn.Module) -> None:
    """Make FP8 `module`'s (QuantLinear, QuantExpertWeight) `qweight` buffer a frozen uint8 Parameter of its bytes,
    in place, read back as FP8 (ByteHeldFP8, the module's class swapped for a subclass with it, as fully_shard swaps
    a module's class for its FSDP one). Used by train/fsdp.py's shardable_quant_storage."""
    weight = module._buffers.pop("qweight")
    module.__class__ = _byte_held(type(module))
    module.register_parameter("qweight", nn.Parameter(weight.view(torch.uint8), requires_grad=False))


class QuantLinear(nn.Module):
    """A frozen Linear (bias optional) whose weight is an NF4State or Int8State, dequantised to `compute_dtype`
    on each use, or an FP8State, multiplied in FP8. x (..., in_features) -> (..., out_features) in x's dtype. The
    bias is not trained."""

    def __init__(self, state, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.compute_dtype = compute_dtype or state.dtype  # what `.weight` dequantises to
        self.quant_type = state.quant_type
        self.out_features, self.in_features = state.shape
        self.orig_dtype = state.dtype
        if self.quant_type == "nf4":
            hold_nf4(self, state)
        elif self.quant_type == "fp8":
            self.register_buffer("qweight", state.weight)
            self.register_buffer("weight_scale", state.scale)
        else:
            self.register_buffer("qweight", state.weight)
            self.register_buffer("scb", state.scb)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str) -> "QuantLinear":
        """`linear` quantised to quant_type ("nf4", "int8" or "fp8"), computing in its weight's dtype. Raises
        ValueError for another quant_type."""
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(quantize(linear.weight, quant_type), bias, linear.weight.dtype)

    @property
    def state(self):
        """The layer's buffers as an Int8State, FP8State or NF4State (the same tensors, not copies)."""
        if self.quant_type == "fp8":
            return fp8_rows.FP8State(self.qweight, self.weight_scale, self.orig_dtype)
        if self.quant_type == "int8":
            return int8.Int8State(self.qweight, self.scb, self.orig_dtype)
        return nf4.NF4State(self.packed, self.absmax, (self.out_features, self.in_features), self.orig_dtype,
                            self.blocksize, self.nested_absmax, self.nested_code, self.nested_blocksize, self.offset,
                            self.code)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a new tensor each call), for code that reads `.weight` (merging, export)."""
        return self.dequantized_weight()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in `dtype` (default: compute_dtype); NF4 goes through
        kernels/nf4.py's dequantize_nf4."""
        dtype = dtype or self.compute_dtype
        if self.quant_type == "fp8":
            return fp8_rows.dequantize_fp8_rows(self.state, dtype)
        if self.quant_type == "int8":
            return int8.dequantize_int8(self.state, dtype)
        from fasttune.kernels.nf4 import dequantize_nf4

        return dequantize_nf4(self.state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T (+ bias) in x's dtype; backward recomputes the dequantised weight instead of saving it (FP8: both
        multiply in FP8, kernels/fp8.py)."""
        if self.quant_type == "fp8":
            from fasttune.kernels.fp8 import fp8_matmul

            out = fp8_matmul(x, self.qweight, self.weight_scale)
        else:
            out = _DequantMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _apply(self, fn, recurse=True):
        move_storage(self, super()._apply, fn, recurse)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        return self

    def nbytes(self) -> int:
        """Bytes of the quantised storage (see the states' nbytes); the bias is not counted."""
        return self.state.nbytes()

    def extra_repr(self) -> str:
        """Shown in print(model): the shape and quant_type."""
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_type={self.quant_type}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' names instead of our buffer names, so saved models are bnb checkpoints.
        if self.quant_type == "nf4":
            destination.update(nf4.state_to_tensors(self.state, prefix + "weight"))
        elif self.quant_type == "fp8":
            destination.update(fp8_rows.state_to_tensors(self.state, prefix))
        else:
            destination.update(int8.state_to_tensors(self.state, prefix))
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def hold_nf4(module: nn.Module, state: nf4.NF4State):
    """Register an NF4State's tensors as `module`'s buffers (packed, absmax, code, nested_absmax, nested_code) and
    its settings as attributes (blocksize, nested_blocksize, offset), the layout `state` properties rebuild."""
    module.blocksize, module.nested_blocksize, module.offset = state.blocksize, state.nested_blocksize, state.offset
    for name in ("packed", "absmax", "code", "nested_absmax", "nested_code"):
        module.register_buffer(name, getattr(state, name))


def move_storage(module: nn.Module, apply, fn, recurse: bool = True):
    """`apply(fn, recurse)` (the module's nn.Module._apply) for a module holding quantised storage as buffers:
    model.to(dtype) must move the storage but never cast it (int codes, fp32 scales), so each buffer keeps its
    original dtype and takes only the device of the result."""
    before = dict(module._buffers)
    apply(fn, recurse)
    for name, orig in before.items():
        new = module._buffers[name]
        if orig is not None and new.dtype != orig.dtype:
            module._buffers[name] = orig.to(new.device)


def quantize(weight: torch.Tensor, quant_type: str):
    """`weight` (out, in) as an NF4State ("nf4": blocksize 64, double-quantised), Int8State ("int8") or FP8State
    ("fp8": row scales). Raises ValueError for another quant_type."""
    if quant_type == "fp8":
        return fp8_rows.quantize_fp8_rows(weight)
    if quant_type == "nf4":
        return nf4.quantize_nf4(weight)
    if quant_type == "int8":
        return int8.quantize_int8(weight)
    raise ValueError(f"unknown quant_type {quant_type!r}; use one of {QUANT_TYPES}")
