"""LoRA / rsLoRA on our decoder's linear layers, on the stacked MoE experts and router, and modules_to_save
(trainable embed_tokens / lm_head).

A wrapped layer keeps the frozen base Linear as `base_layer` and adds `lora_A` (r x in) and `lora_B` (out x r),
as PEFT does, so adapters map one-to-one onto PEFT's key names. A stacked expert weight (E, out, in) gets an
ExpertLora with PEFT's ParamWrapper layout (`target_parameters`). Trainable weights are kept in fp32 (master
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
from fasttune.kernels.gemv import gemv, one_row_linears
from fasttune.kernels.lora import lora_group
from fasttune.kernels.transpose import swap_outer
from fasttune.peft.dora import DoraLinear
from fasttune.peft.lora_layer import LoraLinear, can_fuse, init_lora_A, is_quantized  # noqa: F401 - re-exported

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen3.5's linear-attention (gated DeltaNet) projections that the defaults and the attention switch add where a
# model has such layers: its q|k|v, its output gate and its output (not the per-head decay / beta scalars)
LINEAR_ATTENTION_TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj"]
FUSED_LINEAR_ATTENTION_TARGETS = ["in_proj_qkvz", "out_proj"]  # Qwen3-Next's fused q/k/v/z projection
SHORT_CONV_TARGETS = ["in_proj", "out_proj"]  # LFM2's short-convolution layers
# Families PEFT calls Mamba-based (peft.tuners.tuners_utils): it refuses LoRA on their out_proj and conv1d, whose fused
# kernels (mamba_ssm's) read the weight directly, so an adapter with them would not load in PEFT
PEFT_MAMBA_FAMILIES = ("nemotron_h", "falcon_h1")
PEFT_MAMBA_REFUSED = ("out_proj", "conv1d")

# Phi-3 stores q/k/v and gate/up fused, GLM-4 gate/up; PEFT targets the fused layers by these names.
FUSED_TARGETS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
SAVABLE_MODULES = ("embed_tokens", "lm_head", "score")  # score: a sequence classifier's head
# PEFT's names for a classifier's head: its SEQ_CLS task adds both to modules_to_save; our decoders' head is `score`
CLASSIFIER_HEADS = ("classifier", "score")


@dataclass
class LoraSettings:
    """A LoRA adapter's settings, meaning what the same fields of PEFT's LoraConfig mean (r, lora_alpha, lora_dropout,
    target_modules: layer-name suffixes, a regex string or "all-linear", use_rslora, modules_to_save: "embed_tokens" /
    "lm_head", bias, target_parameters: MoE parameter names such as "mlp.experts.gate_up_proj", rank_pattern /
    alpha_pattern, use_dora); the defaults are fasttune's (r=16, lora_alpha=16, the seven attention and MLP
    projections). Checked by validate_settings."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    modules_to_save: list = field(default_factory=list)
    bias: str = "none"
    # The names asked for when they were widened onto fused layers (Phi-3's q_proj -> qkv_proj) or mapped onto the
    # experts of an MoE model; target_modules then holds the applied names, as the saved adapter_config.json does.
    requested_target_modules: list | None = None
    # PEFT's target_parameters (stacked MoE weights, the router weight) and per-target rank / alpha overrides
    # (regex -> value, PEFT's rank_pattern / alpha_pattern matching).
    target_parameters: list = field(default_factory=list)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False  # DoRA on the wrapped layers (peft/dora.py)

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))  # order carries no meaning; keeps configs equal
        params = self.target_parameters or []
        self.target_parameters = sorted({params} if isinstance(params, str) else set(params))

    @property
    def scaling(self) -> float:
        """The factor on B @ A: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (PEFT's LoRA / rsLoRA
        scaling)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, lora_alpha) for the layer or parameter `name` (e.g. "model.layers.1.mlp.experts.gate_up_proj"): the
        first rank_pattern / alpha_pattern key (a regex) that matches the end of `name` at a dot boundary, as PEFT's
        get_pattern_key picks it, else r / lora_alpha."""
        def pick(pattern: dict, default):
            """The value of the first key of `pattern` that matches `name`, else `default`."""
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
            return default

        return pick(self.rank_pattern, self.r), pick(self.alpha_pattern, self.lora_alpha)

    def scaling_for(self, name: str) -> float:
        """The scaling of layer / parameter `name` with its rank_alpha."""
        r, alpha = self.rank_alpha(name)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict:
        """The settings as a plain dict (requested_target_modules, target_parameters and the patterns only when
        set, so settings recorded before they existed compare equal)."""
        d = asdict(self)
        for k in ("requested_target_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
            if not d[k]:
                del d[k]
        return d


def project(x: torch.Tensor, *layers, values_unused: bool = False) -> tuple:
    """(layer(x) for layer in layers), fused when they are all plain enabled LoRA layers and the path is on; for
    one row without autograd (a batch-1 decode step) over plain Linears, one matrix-vector launch (kernels/gemv.py)."""
    if can_fuse(x, layers):
        return lora_group(x, layers, values_unused)
    if one_row_linears(x, layers):
        return gemv(x, [m.weight for m in layers], [m.bias for m in layers])
    return tuple(layer(x) for layer in layers)


class ExpertLora(nn.Module):
    """LoRA on one stacked expert weight W (E, out, in) (Experts.gate_up_proj / down_proj), as PEFT's ParamWrapper
    adapts a 3-d parameter named in target_parameters: expert e's weight acts as W_e + scaling * B_e @ A_e.

    Parameters in PEFT's layout, so the adapter file holds them as they are: lora_A (E*r, in), rows e*r + j =
    A_e[j]; lora_B (out, r*E), column j*E + e = B_e[:, j] (PEFT reshapes B to (out, r, E)). fp32 master weights,
    cast to the activation dtype in `factors`. `disabled` turns the update off (set_adapters_enabled).
    transposed: W is stored (E, in, out) (gpt-oss's experts, which PEFT reads so by their `is_transposed`); the
    factors are the same, `delta_weight` comes in W's layout."""

    def __init__(self, weight: torch.Tensor, r: int, scaling: float, transposed: bool = False):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = weight.shape
        if transposed:
            self.in_features, self.out_features = self.out_features, self.in_features
        self.r, self.scaling, self.transposed = r, scaling, transposed
        e, device = self.num_experts, weight.device
        self.lora_A = nn.Parameter(torch.empty(e * r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r * e, device=device, dtype=torch.float32))
        self.disabled = False

    def reset_parameters(self):
        """PEFT's default init of the (E*r, in) lora_A: kaiming-uniform (a=sqrt(5)); lora_B zeros. Draws from torch's
        global generator."""
        init_lora_A(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(a (E, in, r), b (E, r, out), scaling) in `dtype`, differentiable: x_e @ a_e @ b_e * scaling is expert
        e's LoRA output for rows x_e (models/moe.py's experts_forward). `a` is a view of lora_A; `b` a small copy
        (PEFT's expert-minor column order is not a strided view grouped GEMMs take), cast and transposed in one
        pass (kernels/transpose.py)."""
        e, r = self.num_experts, self.r
        a = self.lora_A.to(dtype).view(e, r, self.in_features).transpose(1, 2)
        b = swap_outer(self.lora_B.view(self.out_features, r, e), dtype)
        return a, b, self.scaling

    def delta_weight(self, expert: int | None = None) -> torch.Tensor:
        """scaling * B_e @ A_e for every expert: the (E, out, in) fp32 update to the stacked weight ((E, in, out)
        when `transposed`; PEFT's ParamWrapper.get_delta_weight); for one `expert` only its (out, in) slice
        ((in, out) when transposed), without forming the others."""
        e, r = self.num_experts, self.r
        a = self.lora_A.view(e, r, self.in_features)
        b = self.lora_B.view(self.out_features, r, e)
        if expert is not None:
            delta = (b[:, :, expert] @ a[expert]) * self.scaling
            return delta.t() if self.transposed else delta
        return torch.einsum("ore,eri->eio" if self.transposed else "ore,eri->eoi", b, a) * self.scaling


def validate_settings(s: LoraSettings) -> LoraSettings:
    """Return `s` unchanged when usable. Raises ConfigError for r not a positive int, lora_alpha missing or <= 0,
    lora_dropout outside [0, 1), bias other than "none", modules_to_save outside SAVABLE_MODULES, or
    target_parameters that are not names."""
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
    if not all(isinstance(t, str) for t in s.target_parameters):
        raise ConfigError(f"target_parameters={s.target_parameters!r} is invalid: use parameter names such as "
                          f"{list(SUPPORTED_PARAMETERS)}.")
    if s.use_dora and s.target_parameters:
        raise ConfigError(f"use_dora=True with LoRA on the MoE experts / router (target_parameters "
                          f"{s.target_parameters}): DoRA applies to linear layers only, and PEFT refuses it on "
                          f"parameters too. Target the attention layers only, or use plain LoRA.")
    return s


def _resolve_targets(model: nn.Module, targets) -> list[str]:
    """Names of the Linear layers to wrap. `targets`: list of suffixes, a regex string, or 'all-linear'."""
    linears = _linear_names(model)
    arch = getattr(model, "arch", None)
    if getattr(arch, "model_type", None) in PEFT_MAMBA_FAMILIES:  # (PEFT refuses these there)
        linears = [n for n in linears if n.rsplit(".", 1)[-1] not in PEFT_MAMBA_REFUSED]
        asked = [t for t in ([targets] if isinstance(targets, str) else targets) if t in PEFT_MAMBA_REFUSED]
        if asked:
            raise ConfigError(f"target_modules {asked}: PEFT refuses LoRA on a Mamba layer's {' / '.join(asked)} in "
                              f"{arch.model_type} models (mamba_ssm's fused kernels read those weights directly), so "
                              f"the adapter would not load in PEFT. Leave them out; in_proj adapts the Mamba layers.")
    if targets == "all-linear":
        return linears
    if isinstance(targets, str):
        # A regex names modules as PEFT sees them: a vision-language model's checkpoint names (models/vision.py)
        hf_name = getattr(model, "checkpoint_name", None) if getattr(model, "family", None) else None
        return [n for n in linears if re.fullmatch(targets, hf_name(n) if hf_name else n)]
    # Each name moves onto its fused layer where the model has one (Phi-3: both; GLM-4: gate_up_proj only).
    present = {n.rsplit(".", 1)[-1] for n in linears} & set(FUSED_TARGETS.values())
    wanted = {FUSED_TARGETS[t] if FUSED_TARGETS.get(t) in present else t for t in targets}
    if present:
        _warn_widened(targets, present)
    # PEFT's rule: a name selects the modules it equals or ends ("." + name), so "shared_mlp.input_linear" works too
    chosen = [n for n in linears if any(_suffix_of(n, t) for t in wanted)]
    unknown = sorted(t for t in wanted if not any(_suffix_of(n, t) for n in chosen))
    # The seven Llama names notebooks pass to every model (the peer's Granite 4.0 notebook: gate_proj, up_proj and
    # down_proj beside shared_mlp's) are skipped where the model lacks them, as PEFT skips them; other names that
    # match nothing are typos and raise.
    skipped = [t for t in unknown if t in DEFAULT_TARGETS] if chosen else []
    unknown = [t for t in unknown if t not in skipped]
    if unknown:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(f"target_modules {unknown} match no layer of this model. Its linear layers are: {names}.")
    if skipped:
        warnings.warn(f"target_modules {skipped} match no layer of this model and are skipped (as PEFT skips "
                      f"them); LoRA goes on the {len(chosen)} layers the other names select.", stacklevel=4)
    return chosen


def _suffix_of(name: str, target: str) -> bool:
    """Whether module `name` is selected by target_modules entry `target` (PEFT: equal, or ending in "." + it)."""
    return name == target or name.endswith("." + target)


# The parameters target_parameters can name: Experts' stacked weights (in their registration order, which is the
# order PEFT nests its ParamWrappers in, so the adapter keys depend on it: adapter_io.expert_adapter_keys) and the
# router's weight.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
UNGATED_EXPERT_PARAMETERS = ("up_proj", "down_proj")  # Nemotron 3's ungated experts (models/moe.py's Experts)
ROUTER_PARAMETER = "mlp.gate.weight"
GPT_OSS_ROUTER = "mlp.router.weight"  # refused: not in SUPPORTED_PARAMETERS
# The stacked experts under PEFT's target_parameters names (rank r each): what a vision-language MoE model's language
# MLP switch and Qwen3.5-MoE's defaults adapt (api.py)
EXPERT_TARGET_PARAMETERS = tuple(f"mlp.experts.{p}" for p in EXPERT_PARAMETERS)
# (Gemma 4 keeps its experts beside the MLP, as layers.N.experts: the suffix without "mlp." covers both)
SUPPORTED_PARAMETERS = tuple(f"experts.{p}" for p in EXPERT_PARAMETERS) + (ROUTER_PARAMETER, "experts.up_proj")
# target_modules names that PEFT on transformers 5 reads as parameters of an MoE model (PEFT's
# _MOE_TARGET_MODULE_MAPPING); Mixtral's checkpoint names w1/w3/w2 there too. The first two of each fused pair
# are one stacked weight, so PEFT requires both.
MOE_TARGET_NAMES = {"gate": ROUTER_PARAMETER, "gate_proj": "mlp.experts.gate_up_proj",
                    "up_proj": "mlp.experts.gate_up_proj", "down_proj": "mlp.experts.down_proj"}
MIXTRAL_TARGET_NAMES = {"w1": "mlp.experts.gate_up_proj", "w3": "mlp.experts.gate_up_proj",
                        "w2": "mlp.experts.down_proj"}
FUSED_EXPERT_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))
# PEFT's rank / alpha pattern key for a gate_up_proj fused from two rank-r targets (rank 2r, alpha 2 * alpha).
GATE_UP_PATTERN = r".*\.gate_up_proj"


# MoE families with a shared expert that PEFT maps as Qwen2-MoE (its _MODEL_TO_CONVERSION_PATTERN): the MLP names
# mean the routed experts there
PEFT_MAPS_EXPERTS = ("qwen3_next", "glm4_moe", "glm4_moe_lite", "deepseek_v3", "deepseek_v2", "ernie4_5_moe")
# MoE families without a shared expert whose MLP names PEFT maps to nothing (transformers has no conversion pattern
# for them): the names adapt the dense feed-forwards, the experts come as target_parameters
PEFT_MAPS_NO_EXPERTS = ("lfm2_moe", "granitemoehybrid", "nemotron_h")


def expert_target_parameters(arch) -> list[str]:
    """The target_parameters naming an MoE model's stacked experts (PEFT's names): `mlp.experts.*`, or Gemma 4's
    `experts.*` beside its dense MLP."""
    if getattr(arch, "moe_block", None) == "gemma4":
        return [f"experts.{p}" for p in EXPERT_PARAMETERS]
    if arch is not None and arch.moe_name != "mlp":  # (LFM2-MoE: feed_forward.experts.*; Granite 4.0: block_sparse_moe;
        # Nemotron 3: mixer.experts.up_proj / down_proj)
        return [f"{arch.moe_name}.experts.{p}"
                for p in (EXPERT_PARAMETERS if arch.experts_gated else UNGATED_EXPERT_PARAMETERS)]
    return list(EXPERT_TARGET_PARAMETERS)


def experts_by_parameters(arch) -> bool:
    """Whether PEFT leaves an MoE model's MLP names to its layers (Qwen3.5-MoE's shared expert), so that its routed
    experts are adapted only as target_parameters: models with a shared expert but those PEFT maps as Qwen2-MoE
    (PEFT_MAPS_EXPERTS: the MLP names mean the experts; the shared experts and dense MLP layers stay frozen)."""
    if getattr(arch, "moe_block", None) == "gemma4":  # the MLP names are its dense MLP's, beside the experts
        return True
    if not getattr(arch, "num_experts", 0):  # (Granite 4.0's dense models)
        return False
    if getattr(arch, "model_type", None) in PEFT_MAPS_NO_EXPERTS:
        return True
    return bool(getattr(arch, "shared_expert_size", 0)) and getattr(arch, "model_type", None) not in PEFT_MAPS_EXPERTS


def _map_moe_targets(model: nn.Module, settings: LoraSettings) -> None:
    """MoE models (Qwen3-MoE, Mixtral, Qwen3-Next): rewrite settings as PEFT on transformers 5 rewrites the same
    LoraConfig (peft.utils.transformers_weight_conversion._convert_peft_config_moe), so that the same call trains the same
    adapter and the saved adapter_config.json is what PEFT builds its model from:
    gate_proj + up_proj (Mixtral also w1 + w3) -> target_parameters "mlp.experts.gate_up_proj" with rank 2r and
    alpha 2 * lora_alpha (rank_pattern / alpha_pattern; alpha / r is kept), down_proj (w2) ->
    "mlp.experts.down_proj", gate -> the router "mlp.gate.weight"; the names leave target_modules (recorded in
    requested_target_modules), so dense MLP layers of the model (Qwen3-MoE's mlp_only_layers) stay frozen, as
    with PEFT. "all-linear" means every linear layer, the experts and the router.
    gpt-oss (which PEFT does not map) gets the same expert mapping, without a router name (its router takes no
    LoRA here). Raises ConfigError for another string target_modules (a regex) and for gate_proj without up_proj
    (or w1 without w3), which PEFT refuses too: they are one stacked weight."""
    arch = getattr(model, "arch", None)
    if not getattr(arch, "num_experts", 0) or experts_by_parameters(arch):
        # (Qwen3.5-MoE: PEFT maps no names there, so the MLP names adapt its shared expert's layers, and the routed
        # experts are target_parameters)
        return
    names = {**MOE_TARGET_NAMES, **(MIXTRAL_TARGET_NAMES if arch.model_type == "mixtral" else {})}
    if arch.moe_block == "gpt_oss":
        names.pop("gate")
    asked = targets = settings.target_modules
    if isinstance(targets, str) and targets != "all-linear" and getattr(model, "family", None) is not None:
        return  # a vision-language model's layer-group regex: layers only (its experts come as target_parameters)
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ConfigError(f"target_modules={targets!r}: on this mixture-of-experts model pass a list of layer "
                              f"names, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', "
                              f"'down_proj'] (the MLP names adapt the experts), or 'all-linear'.")
        targets = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)} | (set(names) & set(MOE_TARGET_NAMES)))
    mapped = [t for t in targets if t in names]
    if not mapped and targets is asked:
        return
    for pair in FUSED_EXPERT_PAIRS:
        given = [t for t in pair if t in targets]
        if len(given) == 1:
            other = pair[1] if given[0] == pair[0] else pair[0]
            raise ConfigError(f"target_modules has {given[0]!r} without {other!r}: on this mixture-of-experts model "
                              f"both are one stacked weight, experts.gate_up_proj (E, 2I, H), which LoRA adapts as a "
                              f"whole. Target both (or neither), as PEFT requires too.")
    if any(all(t in targets for t in pair) for pair in FUSED_EXPERT_PAIRS):
        # PEFT: two rank-r LoRAs fused into one gate_up_proj LoRA of rank 2r, alpha doubled to keep alpha / r.
        settings.rank_pattern = {**settings.rank_pattern, GATE_UP_PATTERN: 2 * settings.r}
        settings.alpha_pattern = {**settings.alpha_pattern, GATE_UP_PATTERN: 2 * settings.lora_alpha}
    settings.requested_target_modules = asked if isinstance(asked, str) else list(asked)
    settings.target_modules = sorted(t for t in targets if t not in names)
    settings.target_parameters = sorted(set(settings.target_parameters) | {names[t] for t in mapped})


def default_targets(model: nn.Module) -> list[str]:
    """DEFAULT_TARGETS (under the family's names: LFM2's out_proj, w1, w3, w2) less the names a dense model has no
    layer for (Arcee has no gate_proj), as PEFT applies a list that matches some layers, plus
    linear_attention_targets in a model with linear layers (Qwen3.5, Qwen3-Next, LFM2: so every layer's token mixer
    is adapted). MoE models keep all seven: their MLP names stand for the
    stacked experts (Qwen3.5-MoE: for its shared expert; api.get_peft_model adds its routed experts). Multi-head latent
    attention takes its projections' names instead of q/k/v (q_a_proj, q_b_proj or q_proj, kv_a_proj_with_mqa,
    kv_b_proj)."""
    from fasttune.models.config import ModelConfig

    arch = getattr(model, "arch", None)
    if not isinstance(arch, ModelConfig):  # the fallback picks its own (fallback.add_lora)
        return list(DEFAULT_TARGETS)
    if arch.kv_lora_rank:  # multi-head latent attention (models/mla.py) has no k_proj / v_proj
        return latent_attention_targets(arch) + ["o_proj", "gate_proj", "up_proj", "down_proj"]
    if arch.num_experts:  # (LFM2-MoE: under LFM2's names)
        return list(dict.fromkeys([arch.module_name(t) for t in DEFAULT_TARGETS] + linear_attention_targets(arch)))
    named = [arch.module_name(t) for t in DEFAULT_TARGETS]  # LFM2: out_proj, w1, w3, w2
    return list(dict.fromkeys(present_targets(model, named) + linear_attention_targets(arch)))


def present_targets(model: nn.Module, names: list[str]) -> list[str]:
    """The target_modules `names` this model has a layer for (itself or the fused layer it belongs to: Phi-3's
    qkv_proj), in order; all of them when it has none (the resolution then names the layers there are). Arcee's and
    Nemotron-H's MLPs have no gate_proj: the seven usual names apply as the six they have."""
    leaves = {n.rsplit(".", 1)[-1] for n in _linear_names(model)}
    return [t for t in names if t in leaves or FUSED_TARGETS.get(t) in leaves] or list(names)


def latent_attention_targets(arch) -> list[str]:
    """Multi-head latent attention's projections before o_proj (models/mla.py) for a ModelConfig `arch`: q_a_proj
    and q_b_proj (q_proj without a query latent), kv_a_proj_with_mqa, kv_b_proj; [] for other attention."""
    if not getattr(arch, "kv_lora_rank", 0):
        return []
    return (["q_a_proj", "q_b_proj"] if arch.q_lora_rank else ["q_proj"]) + ["kv_a_proj_with_mqa", "kv_b_proj"]


def linear_attention_targets(arch) -> list[str]:
    """The linear layers' default LoRA names for a ModelConfig `arch`: Qwen3.5's in_proj_qkv, in_proj_z and
    out_proj, Qwen3-Next's in_proj_qkvz and out_proj, or LFM2's short convolution's (and Granite 4.0's Mamba-2
    mixer's) in_proj and out_proj; [] without such layers."""
    if not any(getattr(arch, "linear_layers", None) or ()):  # (granite-4.0-micro: all layers attention)
        return []
    if arch.model_type in PEFT_MAMBA_FAMILIES:  # (PEFT refuses out_proj there: in_proj alone)
        return ["in_proj"]
    if arch.linear_kind in ("short_conv", "mamba2"):  # (Granite 4.0's Mamba-2 mixers: in_proj and out_proj too)
        return list(SHORT_CONV_TARGETS)
    return list(FUSED_LINEAR_ATTENTION_TARGETS if arch.linear_fused_projections else LINEAR_ATTENTION_TARGETS)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_quantized(m))
            and n not in ("lm_head", "score")]  # the heads: trained whole as modules_to_save, never LoRA-wrapped


def matches_parameter(name: str, targets) -> bool:
    """Whether parameter `name` is selected by target_parameters `targets`: equal to an entry or ending in "." plus
    one (PEFT's rule)."""
    return any(name == t or name.endswith("." + t) for t in targets or ())


def _resolve_parameters(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the parameters `targets` (PEFT's target_parameters: a full name or a suffix after a dot) select,
    in model order. Raises ConfigError for an entry that matches nothing, or a parameter other than an MoE
    layer's stacked expert weights or router weight (SUPPORTED_PARAMETERS)."""
    if not targets:
        return []
    names = _parameter_names(model)
    chosen = set()
    for t in targets:
        hits = [n for n in names if matches_parameter(n, (t,))]
        if not hits:
            moe = bool(getattr(getattr(model, "arch", None), "num_experts", 0))
            raise ConfigError(f"target_parameters entry {t!r} matches no parameter of this model. "
                              + (f"Use {list(SUPPORTED_PARAMETERS)}." if moe else
                                 "This model has no mixture-of-experts layers: target_parameters adapts stacked MoE "
                                 "experts and routers only; use target_modules for linear layers."))
        if any(n.endswith(GPT_OSS_ROUTER) for n in hits):
            raise ConfigError(f"target_parameters entry {t!r}: LoRA on gpt-oss's router (a linear layer with bias) "
                              f"is not supported; adapt the experts ('mlp.experts.gate_up_proj', "
                              f"'mlp.experts.down_proj') and attention instead.")
        bad = [n for n in hits if not n.endswith(SUPPORTED_PARAMETERS)]
        if bad:
            raise ConfigError(f"target_parameters entry {t!r} selects {bad[0]!r}: fasttune adapts by parameter only "
                              f"the MoE experts and router {list(SUPPORTED_PARAMETERS)}; name linear layers in "
                              f"target_modules instead.")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _parameter_names(model: nn.Module) -> list[str]:
    """model.named_parameters()'s names in order, with NF4 stacked expert weights (QuantExpertWeight modules, which
    hold buffers) under the parameter name they replace."""
    from fasttune.quant.experts import QuantExpertWeight

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, QuantExpertWeight):
            names.append(module_name)
            continue
        names += [f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)]
    return names


class FusedTargetsWarning(UserWarning):
    """LoRA was asked for part of a fused projection (Phi-3's qkv_proj / gate_up_proj) and covers all of it."""


def _warn_widened(targets, present: set) -> None:
    """Warn when the names cover only part of a fused layer the model has (`present`: qkv_proj / gate_up_proj):
    LoRA on it adapts its other projections too."""
    asked = set(targets)
    for fused in sorted(present):
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
    """Freeze the base, wrap the target layers with LoRA (LoraLinear), add LoRA to the target parameters (stacked
    experts: ExpertLora in Experts.lora; the router weight: a LoraLinear around the router), make modules_to_save
    trainable. On an MoE model the settings are first rewritten as PEFT rewrites them (_map_moe_targets).
    Returns the wrapped layer names and the adapted parameter names. Raises ConfigError for invalid settings,
    targets that select nothing, lora_dropout > 0 with target_parameters (PEFT cannot apply dropout to a
    parameter's update and refuses it too), or a model that already has LoRA."""
    settings.modules_to_save = savable_modules(model, settings.modules_to_save)
    validate_settings(settings)
    if any(isinstance(m, (LoraLinear, ExpertLora)) for m in model.modules()):
        raise ConfigError("This model already has LoRA adapters; call get_peft_model once per model.")
    model.requires_grad_(False)
    _map_moe_targets(model, settings)
    validate_settings(settings)  # again: the MoE names may have become target_parameters (DoRA refuses those)
    if settings.target_parameters and settings.lora_dropout > 0:
        raise ConfigError(f"lora_dropout={settings.lora_dropout} with LoRA on the MoE experts / router "
                          f"(target_parameters {settings.target_parameters}): the update of a stacked weight cannot "
                          f"drop its input per layer, and PEFT refuses this adapter too. Use lora_dropout=0.")
    names = _resolve_targets(model, settings.target_modules)
    params = _resolve_parameters(model, settings.target_parameters)
    if not names and not params:
        raise ConfigError(f"target_modules={settings.target_modules!r} selects no layer of this model.")
    hf_name = getattr(model, "checkpoint_name", None) if getattr(model, "family", None) else None
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for name in names:
            _wrap_linear(model, name, settings, hf_name(name) if hf_name else name)
        for name in params:
            owner, _, attr = name.rpartition(".")
            if attr == "weight":  # the router: a Linear-like module, wrapped as PEFT's keys name it (mlp.gate.lora_A)
                _wrap_linear(model, owner, settings, name)
                continue
            experts = model.get_submodule(owner)
            r, _ = settings.rank_alpha(name)
            adapter = ExpertLora(getattr(experts, attr), r, settings.scaling_for(name),
                                 transposed=getattr(experts, "is_transposed", False))
            reset_on(adapter, getattr(model, "fsdp_device", None))
            experts.lora[attr] = adapter
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    _make_savable_trainable(model, settings.modules_to_save)
    _record_applied(settings, names)
    return names + params


def _wrap_linear(model: nn.Module, name: str, settings: LoraSettings, key: str) -> None:
    """Replace module `name` by a LoraLinear around it, with the rank / alpha settings give `key`."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    r, _ = settings.rank_alpha(key)
    if settings.use_dora:
        lora = DoraLinear(getattr(parent, attr), r, settings.scaling_for(key), settings.lora_dropout)
    else:
        lora = LoraLinear(getattr(parent, attr), r, settings.scaling_for(key), settings.lora_dropout)
    reset_on(lora, getattr(model, "fsdp_device", None))
    setattr(parent, attr, lora)


def reset_on(adapter: nn.Module, device) -> None:
    """adapter.reset_parameters() with lora_A's random draw made on `device` (None: where the adapter is), the
    parameters staying where they are: a model loaded with from_pretrained(fsdp=True) waits in host memory, and its
    adapters start as they would on its GPU (CUDA's generator draws other values than the CPU's). lora_B starts at
    zero, so nothing else depends on the draw (DoRA's magnitude is the base weight's norm)."""
    adapter.reset_parameters()
    a = adapter.lora_A
    if device is not None and not a.is_meta and a.device != torch.device(device):
        # (a rank that receives its weights from rank 0 holds them on the meta device: nothing to draw there)
        a.data.copy_(init_lora_A(torch.empty_like(a, device=device)))


def savable_modules(model: nn.Module, modules) -> list[str]:
    """modules_to_save as this model trains them: on a sequence classifier `score` always (PEFT's SEQ_CLS task
    adds it, as "classifier" and "score"), PEFT's "classifier" dropped (our decoders' head is `score`). Raises
    ConfigError for a classifier head asked of a language model, or lm_head asked of a classifier."""
    modules = list(modules or [])
    if not getattr(model, "is_sequence_classifier", False):
        heads = [m for m in modules if m in CLASSIFIER_HEADS]
        if heads:
            raise ConfigError(f"modules_to_save={heads}: this model is a language model without a classification "
                              f"head; load it with auto_model=AutoModelForSequenceClassification and num_labels to "
                              f"train one.")
        return modules
    if "lm_head" in modules:
        raise ConfigError("modules_to_save=['lm_head']: this model is a sequence classifier, it has no LM head (its "
                          "head, `score`, is trained whole anyway).")
    return [m for m in modules if m not in CLASSIFIER_HEADS] + ["score"]


def _make_savable_trainable(model: nn.Module, modules: list[str]):
    if not modules:
        return
    cfg = model.arch
    from fasttune.models.host_embedding import HostEmbedding

    if "embed_tokens" in modules and isinstance(model.model.embed_tokens, HostEmbedding):
        raise ConfigError("modules_to_save=['embed_tokens'] trains the input embedding, but the model was loaded "
                          "with offload_embedding=True, which keeps it frozen in host memory; load without "
                          "offload_embedding to train it.")
    from fasttune.models.host_head import HostLMHead

    if "lm_head" in modules and isinstance(model.lm_head, HostLMHead):
        raise ConfigError("modules_to_save=['lm_head'] trains the LM head, but the model was loaded with "
                          "offload_lm_head=True, which keeps it frozen in host memory; load without offload_lm_head "
                          "to train it.")
    if cfg.tie_embeddings and model.lm_head is not None and {"embed_tokens", "lm_head"} & set(modules):
        # Like PEFT: a module to save gets its own trainable copy, which unties lm_head from embed_tokens.
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
        cfg.tie_embeddings = False
        model.config.tie_word_embeddings = False
    for m in modules:
        module = model.model.embed_tokens if m == "embed_tokens" else getattr(model, m)
        module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=True)


def lora_layers(model: nn.Module):
    """[(module name, LoraLinear)] of `model`, in module order (routers with LoRA included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def expert_lora_layers(model: nn.Module):
    """[(stacked parameter name, ExpertLora)] of `model` in module order, e.g.
    ("model.layers.1.mlp.experts.gate_up_proj", adapter); within one Experts module in EXPERT_PARAMETERS order."""
    out = []
    for n, m in model.named_modules():
        adapters = getattr(m, "lora", None)
        if isinstance(adapters, nn.ModuleDict):
            out += [(f"{n}.{p}", adapters[p]) for p in ("gate_up_proj", "up_proj", "down_proj") if p in adapters]
    return out


def set_adapters_enabled(model: nn.Module, enabled: bool):
    """Turn every LoRA update (LoraLinear and ExpertLora) on or off (the base weights alone compute when off); the
    adapter weights are kept."""
    for _, m in lora_layers(model) + expert_lora_layers(model):
        m.disabled = not enabled
