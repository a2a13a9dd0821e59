"""Collects the pieces of bitsandbytes-quantised Linear weights as a checkpoint streams by (their tensors may come
in any order and from different shards) and turns each complete set into an NF4State / Int8State."""
from __future__ import annotations

import torch

from fasttune.errors import ModelLoadError
from fasttune.quant import int8, nf4


class PendingQuantized:
    """Pieces gathered for the Linear modules named in `linears` (names without ".weight"); `source` names the
    checkpoint in error messages."""

    def __init__(self, linears: set[str], source: str):
        self.linears, self.source = linears, source
        self.parts: dict[str, dict[str, torch.Tensor]] = {}
        self.finished: set[str] = set()

    def _split(self, name: str) -> tuple[str, str] | None:
        """(module, piece) when `name` is a quantisation piece of one of our Linear layers."""
        for marker, cut in ((".weight.", len(".weight.")), (".SCB", 1), (".weight_format", 1)):
            i = name.find(marker)
            if i > 0 and name[:i] in self.linears:
                return name[:i], name[i + cut:]
        return None

    def claims(self, name: str) -> bool:
        """Whether `name` is an extra piece (`.weight.<suffix>`, `.SCB`, `.weight_format`) of one of the Linears;
        the packed `.weight` itself is recognised by `add`, from its dtype."""
        return self._split(name) is not None

    def add(self, name: str, t: torch.Tensor) -> tuple[bool, tuple | None]:
        """Take `name` if it belongs to a quantised weight: (taken, (module, state) once that weight is complete)."""
        module, _, attr = name.rpartition(".")
        if attr == "weight" and module in self.linears and t.dtype in (torch.uint8, torch.int8):
            piece = ""
        else:
            split = self._split(name)
            if split is None:
                return False, None
            module, piece = split
        if piece == "weight_format" and int(t) != 0:
            raise ModelLoadError(f"{self.source}: '{name}' = {int(t)}: only row-major int8 weights load.")
        self.parts.setdefault(module, {})[piece] = t
        return True, self._complete(module)

    def _complete(self, module: str):
        if module in self.finished:
            return None
        p, where = self.parts[module], f"{self.source}: '{module}.weight'"
        if "" not in p:
            return None
        if p[""].dtype == torch.int8:
            if "SCB" not in p:
                return None
            state = int8.state_from_tensors(p[""], p["SCB"], torch.float16, where)
        else:
            if not any(k.startswith("quant_state.") for k in p) or not _nf4_parts_present(p, where):
                return None
            state = nf4.state_from_tensors(p, where)
        self.finished.add(module)
        self.parts[module] = {}
        return module, state

    def check_complete(self):
        """Call when the checkpoint is read: raises ModelLoadError if some layer got pieces but never all of them."""
        broken = [m for m, p in self.parts.items() if p and m not in self.finished]
        if broken:
            have = ", ".join(k or "weight" for k in self.parts[broken[0]])
            raise ModelLoadError(f"{self.source}: the quantised weight of '{broken[0]}' is incomplete (found only: "
                                 f"{have}); {len(broken)} layer(s) affected. Re-download or re-save the checkpoint.")


def _nf4_parts_present(p: dict, where: str) -> bool:
    meta_key = next(k for k in p if k.startswith("quant_state."))
    if not meta_key.endswith("__nf4"):
        return True  # let state_from_tensors name the unsupported type
    meta = nf4.quant_state_meta(p[meta_key], where)
    need = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if "nested_offset" in meta else [])
    return all(k in p for k in need)
