"""LoRA / rsLoRA on our decoder's linear layers, and modules_to_save (trainable embed_tokens / lm_head).

A wrapped layer keeps the frozen base Linear as `base_layer` and adds `lora_A` (r x in) and `lora_B` (out x r),
as PEFT does, so adapters map one-to-one onto PEFT's key names. Trainable weights are kept in fp32 (master
weights) and cast to the activation dtype in forward.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from fasttune.errors import ConfigError
from fasttune.kernels.lora import fused_lora_enabled, lora_group

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3 stores q/k/v and gate/up fused; PEFT targets the fused layers by these names.
FUSED_TARGETS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
SAVABLE_MODULES = ("embed_tokens", "lm_head")


@dataclass
class LoraSettings:
    """A LoRA adapter's settings, meaning what the same fields of PEFT's LoraConfig mean (r, lora_alpha, lora_dropout,
    target_modules: layer-name suffixes, a regex string or "all-linear", use_rslora, modules_to_save: "embed_tokens" /
    "lm_head", bias); the defaults are fasttune's (r=16, lora_alpha=16, the seven attention and MLP projections).
    Checked by validate_settings."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    modules_to_save: list = field(default_factory=list)
    bias: str = "none"
    # The names asked for when they were widened onto fused layers (Phi-3's q_proj -> qkv_proj); target_modules
    # then holds the applied names, as the saved adapter_config.json does.
    requested_target_modules: list | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))  # order carries no meaning; keeps configs equal

    @property
    def scaling(self) -> float:
        """The factor on B @ A: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (PEFT's LoRA / rsLoRA
        scaling)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        """The settings as a plain dict (requested_target_modules only when it was recorded)."""
        d = asdict(self)
        if d["requested_target_modules"] is None:
            del d["requested_target_modules"]
        return d


class LoraLinear(nn.Module):
    """A frozen base Linear (or QuantLinear) plus a trainable low-rank update, as PEFT's lora.Linear: y = base(x) +
    scaling * dropout(x) @ A^T @ B^T, with lora_A (r, in_features) and lora_B (out_features, r) fp32 master weights cast
    to x's dtype. `disabled` turns the update off (set_adapters_enabled)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base  # nn.Linear, or a QuantLinear (NF4 / int8 storage)
        self.r, self.scaling = r, scaling
        device = next(base.buffers()).device if is_quantized(base) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (out_features, in_features) weight, without the LoRA update (dequantised, a new tensor, for
        a QuantLinear base)."""
        return self.base_layer.weight

    def reset_parameters(self):
        """PEFT's default init: lora_A kaiming-uniform (a=sqrt(5)), lora_B zeros, so the layer starts equal to its base.
        Draws from torch's global generator."""
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so the adapter starts as the identity.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scaling * (lora_B @ lora_A): the (out_features, in_features) update to the base weight, in the adapter's
        dtype (fp32)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in the base output's dtype: base(x) plus the LoRA update unless
        disabled; through kernels/lora.py's fused function when can_fuse allows it."""
        if not self.disabled and can_fuse(x, (self,)):
            return lora_group(x, (self,))[0]  # hand-derived backward (kernels/lora.py)
        out = self.base_layer(x)
        if self.disabled:
            return out
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        xa = (self.lora_dropout(x) @ a.t()).flatten(0, -2)
        # One GEMM adds the scaled low-rank product into the base output (no separate scale and add passes).
        return torch.addmm(out.flatten(0, -2), xa, b.t(), alpha=self.scaling).view(out.shape)


def can_fuse(x: torch.Tensor, layers) -> bool:
    """True when `layers` are all plain (not subclassed), enabled LoRA layers with a frozen base and the fused
    kernel path (kernels/lora.py) is on for `x`."""
    if not fused_lora_enabled(x):
        return False
    return all(type(layer) is LoraLinear and not layer.disabled and not _base_trains(layer) for layer in layers)


def _base_trains(layer) -> bool:
    base = layer.base_layer
    return any(p.requires_grad for p in base.parameters(recurse=False))


def project(x: torch.Tensor, *layers, values_unused: bool = False) -> tuple:
    """(layer(x) for layer in layers), fused when they are all plain enabled LoRA layers and the path is on."""
    if can_fuse(x, layers):
        return lora_group(x, layers, values_unused)
    return tuple(layer(x) for layer in layers)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a QuantLinear (NF4 or int8 storage; quant/linear.py)."""
    from fasttune.quant.linear import QuantLinear

    return isinstance(module, QuantLinear)


def validate_settings(s: LoraSettings) -> LoraSettings:
    """Return `s` unchanged when usable. Raises ConfigError for r not a positive int, lora_alpha missing or <= 0,
    lora_dropout outside [0, 1), bias other than "none", or modules_to_save outside SAVABLE_MODULES."""
    if not isinstance(s.r, int) or s.r <= 0:
        raise ConfigError(f"LoRA rank r={s.r!r} is invalid: use a positive integer such as 8, 16 or 64.")
    if s.lora_alpha is None or s.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha={s.lora_alpha!r} is invalid: use a positive number (commonly equal to r).")
    if not 0.0 <= s.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout={s.lora_dropout!r} is invalid: use a value in [0, 1).")
    if s.bias != "none":
        raise ConfigError(f"bias='{s.bias}' is not supported yet: only bias='none' (biases stay frozen).")
    bad = [m for m in s.modules_to_save if m not in SAVABLE_MODULES]
    if bad:
        raise ConfigError(f"modules_to_save={bad} is not supported: choose from {list(SAVABLE_MODULES)}.")
    return s


def _resolve_targets(model: nn.Module, targets) -> list[str]:
    """Names of the Linear layers to wrap. `targets`: list of suffixes, a regex string, or 'all-linear'."""
    linears = [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_quantized(m)) and n != "lm_head"]
    if targets == "all-linear":
        return linears
    if isinstance(targets, str):
        # A regex names modules as PEFT sees them: a vision-language model's checkpoint names (models/vision.py)
        hf_name = getattr(model, "checkpoint_name", None) if getattr(model, "family", None) else None
        return [n for n in linears if re.fullmatch(targets, hf_name(n) if hf_name else n)]
    fused = any(n.endswith(("qkv_proj", "gate_up_proj")) for n in linears)
    wanted = {FUSED_TARGETS.get(t, t) if fused else t for t in targets}
    if fused:
        _warn_widened(targets)
    chosen = [n for n in linears if n.rsplit(".", 1)[-1] in wanted or n in wanted]
    found = {n.rsplit(".", 1)[-1] for n in chosen}
    unknown = sorted(t for t in wanted if t not in found and t not in chosen)
    if unknown:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(f"target_modules {unknown} match no layer of this model. Its linear layers are: {names}.")
    return chosen


MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def _drop_expert_targets(model: nn.Module, settings: LoraSettings) -> None:
    """MoE models (Qwen3-MoE, Mixtral): remove gate_proj/up_proj/down_proj from settings.target_modules, with a
    warning. PEFT on transformers 5 reads these names on such a model as the stacked experts (target_parameters),
    which fasttune does not adapt yet; keeping them out of the saved adapter_config keeps PEFT's model equal to
    ours. Raises ConfigError for a string target_modules (regex / "all-linear"), which PEFT resolves onto the
    experts too, and when nothing is left."""
    if not getattr(getattr(model, "arch", None), "num_experts", 0):
        return
    targets = settings.target_modules
    if isinstance(targets, str):
        raise ConfigError(f"target_modules={targets!r}: on this mixture-of-experts model pass a list of attention "
                          f"projections, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj'] (LoRA on the experts is "
                          f"not supported yet).")
    dropped = [t for t in targets if t in MLP_TARGETS]
    if not dropped:
        return
    settings.target_modules = [t for t in targets if t not in MLP_TARGETS]
    if not settings.target_modules:
        raise ConfigError(f"target_modules={dropped}: LoRA on the experts of this mixture-of-experts model is not "
                          f"supported yet; target the attention projections ['q_proj', 'k_proj', 'v_proj', "
                          f"'o_proj'].")
    warnings.warn(f"target_modules {dropped} left out: LoRA on this model's MoE experts is not supported yet, so "
                  f"LoRA goes on {settings.target_modules} (the experts and any dense MLP layers stay frozen).",
                  stacklevel=4)


class FusedTargetsWarning(UserWarning):
    """LoRA was asked for part of a fused projection (Phi-3's qkv_proj / gate_up_proj) and covers all of it."""


def _warn_widened(targets) -> None:
    """Warn when the names cover only part of a fused layer: LoRA on it adapts its other projections too."""
    asked = set(targets)
    for fused in sorted(set(FUSED_TARGETS.values())):
        parts = sorted((t for t, f in FUSED_TARGETS.items() if f == fused), key=DEFAULT_TARGETS.index)
        given = [t for t in parts if t in asked]
        if given and len(given) < len(parts):
            others = [t for t in parts if t not in asked]
            warnings.warn(
                f"This model fuses {'/'.join(parts)} into one layer, {fused}: target_modules {given} were applied "
                f"as {fused!r}, so {'/'.join(others)} get{'s' if len(others) == 1 else ''} LoRA too (PEFT refuses "
                f"these names on such a model). Pass {fused!r} in target_modules to ask for it directly.",
                FusedTargetsWarning, stacklevel=5)


def _record_applied(settings: LoraSettings, names: list[str]) -> None:
    """target_modules becomes the applied layer names when fused layers stood in for the asked ones."""
    if not isinstance(settings.target_modules, list):
        return
    applied = sorted({n.rsplit(".", 1)[-1] for n in names})
    asked = settings.target_modules
    if any(t in FUSED_TARGETS for t in asked) and any(t in FUSED_TARGETS.values() for t in applied):
        settings.requested_target_modules, settings.target_modules = asked, applied


def apply_lora(model: nn.Module, settings: LoraSettings, seed: int | None = 3407) -> list[str]:
    """Freeze the base, wrap the target layers with LoRA, make modules_to_save trainable. Returns wrapped names."""
    validate_settings(settings)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("This model already has LoRA adapters; call get_peft_model once per model.")
    model.requires_grad_(False)
    _drop_expert_targets(model, settings)
    names = _resolve_targets(model, settings.target_modules)
    if not names:
        raise ConfigError(f"target_modules={settings.target_modules!r} selects no layer of this model.")
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lora = LoraLinear(getattr(parent, attr), settings.r, settings.scaling, settings.lora_dropout)
            lora.reset_parameters()
            setattr(parent, attr, lora)
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    _make_savable_trainable(model, settings.modules_to_save)
    _record_applied(settings, names)
    return names


def _make_savable_trainable(model: nn.Module, modules: list[str]):
    if not modules:
        return
    cfg = model.arch
    if cfg.tie_embeddings:
        # Like PEFT: a module to save gets its own trainable copy, which unties lm_head from embed_tokens.
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
        cfg.tie_embeddings = False
        model.config.tie_word_embeddings = False
    for m in modules:
        module = model.model.embed_tokens if m == "embed_tokens" else model.lm_head
        module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=True)


def lora_layers(model: nn.Module):
    """[(module name, LoraLinear)] of `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def set_adapters_enabled(model: nn.Module, enabled: bool):
    """Turn every LoraLinear's update on or off (the base layers alone compute when off); the adapter weights are
    kept."""
    for _, m in lora_layers(model):
        m.disabled = not enabled
