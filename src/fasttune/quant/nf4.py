"""NF4 storage of frozen weights in bitsandbytes' layout, so that "bnb-4bit" checkpoints load directly and what we
quantise is what bitsandbytes would have written, byte for byte.

Layout (bitsandbytes `quantize_4bit(quant_type="nf4", compress_statistics=True)`):
- the weight is flattened row-major and cut into blocks of `blocksize` (64) values; each block is scaled by its
  absolute maximum and every value becomes the index of the nearest of the 16 NF4 levels;
- two indices per byte, the first value in the high nibble;
- double quantisation: the per-block absmax (fp32) minus its mean (`offset`) is quantised again to uint8 with
  bitsandbytes' signed dynamic 8-bit map, in blocks of 256, each with an fp32 absmax (`nested_absmax`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA paper, appendix E).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


@lru_cache(maxsize=None)
def _dynamic_map_values() -> tuple[float, ...]:
    """bitsandbytes' signed dynamic 8-bit map: for exponent e = 0..6, 2**e evenly spaced means in (0.1, 1)
    scaled by 10**(e-6), both signs, plus 0 and 1; sorted. Built in fp32 as bitsandbytes builds it."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()  # fp32 products
    return tuple(sorted(values))


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted fp32 values in [-1, 1]; its create_dynamic_map), the
    code of the double-quantised absmax."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32, device=device)


def nf4_levels(device=None) -> torch.Tensor:
    """The 16 NF4 levels (NF4_LEVELS) as an fp32 tensor."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _nearest(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    # Exact nearest level, a tie going to the lower one (bitsandbytes' torch backend). bitsandbytes' CPU C library
    # uses an approximate binary search for the 8-bit map that picks the farther level in ~0.15% of near-ties.
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True)


def _blockwise(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled values in [-1, 1] and per-block absmax; a short last block keeps its own absmax."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


@dataclass
class NF4State:
    """One NF4-quantised matrix. `absmax` is uint8 when double-quantised (then `nested_*` and `offset` are set),
    else fp32."""
    packed: torch.Tensor          # uint8, (numel + 1) // 2
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype            # the dtype it was quantised from (bitsandbytes' "dtype")
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: float = 0.0
    code: torch.Tensor | None = None   # the 16 levels (stored in checkpoints as quant_map)

    quant_type = "nf4"  # a class attribute, not a field

    @property
    def nested(self) -> bool:
        """Whether the absmax is double-quantised."""
        return self.nested_absmax is not None

    def to(self, device) -> "NF4State":
        """A copy of the state with its tensors on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4State(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                        move(self.nested_absmax), move(self.nested_code), self.nested_blocksize, self.offset,
                        move(self.code))

    def nbytes(self) -> int:
        """Bytes of all the state's tensors (packed weight, absmax, nested statistics and codes)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax, self.nested_absmax,
                                                           self.nested_code, self.code) if t is not None)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """`weight` (any shape, quantised in fp32) as NF4 in the layout above, as bitsandbytes' quantize_4bit writes
    it (QLoRA, Dettmers et al. 2023). Raises ValueError for a blocksize outside BLOCKSIZES."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {BLOCKSIZES}, not {blocksize}")
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _blockwise(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # the spare nibble holds the code of 0.0, as in bnb
    idx = _nearest(scaled, nf4_levels(flat.device)).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    state = NF4State(packed, absmax, tuple(weight.shape), weight.dtype, blocksize, code=nf4_levels(flat.device))
    if double_quant:
        offset = absmax.mean()
        code2 = dynamic_map(flat.device)
        scaled2, nested_absmax = _blockwise(absmax - offset, 256)
        state.absmax = _nearest(scaled2, code2).to(torch.uint8)
        # (a shape-only quantisation on the meta device has no offset to read: the loading rank sends it, FSDP's
        # train/fsdp.py fill)
        state.nested_absmax, state.nested_code = nested_absmax, code2
        state.offset = 0.0 if offset.is_meta else float(offset)
    return state


def block_absmax(state: NF4State) -> torch.Tensor:
    """The fp32 absmax of every 4-bit block (undoing the double quantisation)."""
    if not state.nested:
        return state.absmax.float()
    n = state.absmax.numel()
    per = state.nested_code[state.absmax.long()]
    scale = state.nested_absmax.repeat_interleave(state.nested_blocksize)[:n]
    return per * scale + torch.tensor(state.offset, dtype=torch.float32)


def dequantize_nf4_reference(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch dequantisation (the reference for the Triton kernel in kernels/nf4.py)."""
    numel = 1
    for s in state.shape:
        numel *= s
    idx = torch.stack([state.packed >> 4, state.packed & 0xF], dim=1).reshape(-1)[:numel].long()
    values = state.code[idx]
    scale = block_absmax(state).repeat_interleave(state.blocksize)[:numel]
    return (values * scale).view(state.shape).to(dtype or state.dtype)


# --- bitsandbytes' serialisation: `<module>.weight` + `<module>.weight.<suffix>` tensors --------------------------
def state_to_tensors(state: NF4State, key: str) -> dict[str, torch.Tensor]:
    """Tensors as bitsandbytes' Linear4bit writes them, `key` being e.g. 'model.layers.0.mlp.down_proj.weight'."""
    meta = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": str(state.dtype).removeprefix("torch."),
            "shape": list(state.shape)}
    out = {key: state.packed.view(-1, 1), f"{key}.absmax": state.absmax, f"{key}.quant_map": state.code}
    if state.nested:
        meta.update(nested_blocksize=state.nested_blocksize, nested_dtype="float32", nested_offset=state.offset)
        out[f"{key}.nested_absmax"] = state.nested_absmax
        out[f"{key}.nested_quant_map"] = state.nested_code
    out[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def quant_state_meta(packed: torch.Tensor, where: str) -> dict:
    """The JSON metadata bitsandbytes packs into a `quant_state.bitsandbytes__nf4` uint8 tensor; damaged metadata
    raises ModelLoadError naming `where`."""
    from fasttune.errors import ModelLoadError

    try:
        meta = json.loads(bytes(packed.reshape(-1).tolist()).decode())
    except (ValueError, TypeError, OverflowError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        meta = e
    if not isinstance(meta, dict) or not {"shape", "dtype", "blocksize"} <= set(meta):
        raise ModelLoadError(f"{where}: the 4-bit quantisation metadata (quant_state) is damaged or incomplete "
                             f"({str(meta)[:100]}). Re-download the checkpoint or quantise the model again.")
    return meta


def state_from_tensors(parts: dict[str, torch.Tensor], where: str) -> NF4State:
    """Inverse of state_to_tensors; `parts` maps '' (the packed weight) and the suffixes to tensors."""
    from fasttune.errors import ModelLoadError

    packed_meta = parts.get("quant_state.bitsandbytes__nf4")
    if packed_meta is None:
        other = [k for k in parts if k.startswith("quant_state.")]
        kind = other[0].rsplit("__", 1)[-1] if other else "unknown"
        raise ModelLoadError(f"{where}: 4-bit weights of type '{kind}' are not supported; only NF4 "
                             f"(bnb_4bit_quant_type='nf4') checkpoints load.")
    meta = quant_state_meta(packed_meta, where)
    missing = [s for s in ("", "absmax", "quant_map") if s not in parts]
    if "nested_offset" in meta:
        missing += [s for s in ("nested_absmax", "nested_quant_map") if s not in parts]
    if missing:
        raise ModelLoadError(f"{where}: the 4-bit weight lacks {', '.join(s or 'weight' for s in missing)}; "
                             f"the checkpoint is incomplete.")
    state = NF4State(parts[""].reshape(-1).to(torch.uint8), parts["absmax"], tuple(meta["shape"]),
                     getattr(torch, meta["dtype"]), int(meta["blocksize"]), code=parts["quant_map"].float())
    if "nested_offset" in meta:
        state.nested_absmax, state.nested_code = parts["nested_absmax"].float(), parts["nested_quant_map"].float()
        state.nested_blocksize, state.offset = int(meta["nested_blocksize"]), float(meta["nested_offset"])
    else:
        state.absmax = state.absmax.float()
    return state
