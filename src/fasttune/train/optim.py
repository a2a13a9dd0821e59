"""Optimizer param groups (embedding_learning_rate), and the LR schedules: transformers' own (get_scheduler)."""
from __future__ import annotations

import math
import re

import torch

from fasttune.errors import ConfigError
from fasttune.train.choices import BORROWED_OPTIMIZERS

def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW (torch's, or bitsandbytes' 8-bit) over the trainable parameters: embeddings at embedding_learning_rate,
    weight decay only where transformers' Trainer applies it (see decay_parameter_names)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("The model has no trainable parameters. Call FastLanguageModel.get_peft_model(model, ...) "
                          "for LoRA, or load with full_finetuning=True.")
    # Each model kind names its embeddings (the fallback per architecture, e.g. GPT-2's wte).
    embed_names = set(model.embedding_param_names)
    embed_lr = cfg.learning_rate if cfg.embedding_learning_rate is None else cfg.embedding_learning_rate
    # Weight decay skips biases and norm weights, as transformers' Trainer does; each learning rate then has a
    # decayed and an undecayed group (one group each when there is no decay, as before).
    decay = decay_parameter_names(model) if cfg.weight_decay else {n for n, _ in trainable}
    groups = []
    for is_embed, lr in ((False, cfg.learning_rate), (True, embed_lr)):
        for decayed in (True, False):
            params = [p for n, p in trainable if (n in embed_names) == is_embed and (n in decay) == decayed]
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decayed else 0.0})
    if cfg.optim in EIGHT_BIT:
        return _bnb_adamw(cfg, groups)
    if cfg.optim in BORROWED_OPTIMIZERS:
        return _transformers_optimizer(cfg, groups)
    # "adamw" on a GPU takes torch's fused kernel (transformers' default, adamw_torch_fused): the same update in
    # one launch instead of ~10 ms of foreach kernels per step at 8B LoRA; "adamw_torch" keeps the foreach one.
    fused = cfg.optim in ("adamw", "adamw_torch_fused") and all(p.is_cuda for g in groups for p in g["params"])
    # lr= sets optimizer.defaults["lr"], which transformers' polynomial and min-lr schedules read, as its Trainer has it
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused or None)


# transformers' Trainer.get_decay_parameter_names (5.x): no decay for parameters inside an nn.LayerNorm, nor for
# (lower-cased) names that match one of these.
NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that weight decay applies to, by transformers' Trainer rule: every parameter but
    biases and norm weights (those of nn.LayerNorm modules, and names with 'layernorm', 'rmsnorm', a 'norm' or
    '*_norm' component). LoRA A/B and trainable embedding copies are decayed; norms kept trainable are not. The
    names are read as the family's checkpoints spell them (Nemotron-H's final norm is norm_f, which the rule decays,
    as transformers' Trainer does)."""
    in_layernorm = {n for m_name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
                    for n, _ in m.named_parameters(prefix=m_name)}
    hf_name = getattr(model, "checkpoint_name", None) or (lambda name: name)
    return {n for n, _ in model.named_parameters()
            if n not in in_layernorm and not NO_DECAY_NAMES.search(hf_name(n).lower())}


# transformers' names for bitsandbytes' 8-bit AdamW (block-wise quantised moments; tensors under 4096 values keep
# 32-bit moments, bitsandbytes' min_8bit_size), which Unsloth's notebooks pick.
EIGHT_BIT = {"adamw_8bit": "AdamW8bit", "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def _transformers_optimizer(cfg, groups) -> torch.optim.Optimizer:
    """cfg.optim (one of BORROWED_OPTIMIZERS) over `groups` with the class and keywords transformers' Trainer picks
    for it (Trainer.get_optimizer_cls_and_kwargs, its own code: e.g. Adafactor with relative_step=False, bitsandbytes'
    Lion with optim_bits 8 and betas (adam_beta1, adam_beta2); cfg.optim_args as it parses them). Raises ConfigError
    when the optimizer's package is not installed."""
    from types import SimpleNamespace

    from transformers import Trainer

    args = SimpleNamespace(optim=cfg.optim, learning_rate=cfg.learning_rate, adam_beta1=cfg.adam_beta1,
                           adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                           optim_args=getattr(cfg, "optim_args", None), optim_target_modules=None)
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as e:
        raise ConfigError(f"optim='{cfg.optim}' needs a package that is not installed ({e}); install it, or use "
                          f"optim='adamw'.") from None
    return cls(groups, **kwargs)


def _bnb_adamw(cfg, groups) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"optim='{cfg.optim}' is bitsandbytes' 8-bit AdamW: `pip install bitsandbytes`, or use "
                          f"optim='adamw' (full-precision moments).") from None
    cls = getattr(bnb.optim, EIGHT_BIT[cfg.optim])
    return cls(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
               weight_decay=cfg.weight_decay)


def lr_lambda(kind: str, warmup: int, total: int, kwargs: dict | None = None, learning_rate: float = 1.0):
    """The LR multiplier step -> float of transformers' schedule `kind` (transformers.get_scheduler: its own code,
    so the values are transformers'), for `warmup` warm-up steps of `total` optimizer steps, `kwargs` its
    lr_scheduler_kwargs (e.g. {"min_lr_rate": 0.1} for cosine_with_min_lr, {"num_cycles": 2} for
    cosine_with_restarts, {"power": 2.0, "lr_end": 1e-7} for polynomial) and `learning_rate` the optimizer's
    default lr (polynomial's lr_end and cosine_with_min_lr's min_lr are absolute). Raises ConfigError naming the
    schedule for keywords it does not take or lacks, or values it refuses."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)
    return _transformers_schedule(optimizer, kind, warmup, total, kwargs).lr_lambdas[0]


def _transformers_schedule(optimizer, kind: str, warmup: int, total: int, kwargs: dict | None):
    from transformers import get_scheduler

    try:
        return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                             scheduler_specific_kwargs=dict(kwargs or {}))
    except (TypeError, ValueError) as e:  # a missing or unknown keyword of that schedule, or a value it refuses
        raise ConfigError(f"lr_scheduler_type='{kind}' with lr_scheduler_kwargs={kwargs or {}!r}: {e}. Give the "
                          f"keywords transformers' {kind} schedule takes (transformers.get_scheduler).") from None


def warmup_count(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps as transformers counts them: warmup_steps if > 0, else ceil(warmup_ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def build_scheduler(optimizer, cfg, total_steps: int):
    """transformers' LambdaLR for cfg.lr_scheduler_type over `optimizer`, with its warmup (warmup_count) and
    cfg.lr_scheduler_kwargs. Raises ConfigError as lr_lambda does."""
    warmup = warmup_count(cfg.warmup_steps, cfg.warmup_ratio, total_steps)
    return _transformers_schedule(optimizer, cfg.lr_scheduler_type, warmup, total_steps,
                                  getattr(cfg, "lr_scheduler_kwargs", None))


def given_optimizers(optimizers, model: torch.nn.Module, cfg) -> tuple:
    """transformers' `optimizers=(optimizer, lr_scheduler)` checked: (a torch Optimizer or None, a scheduler with
    step() / state_dict() or None); None parts are built from the config when training starts (a given optimizer
    gets cfg's schedule). Raises ConfigError for another shape, a scheduler without an optimizer, an optimizer that
    holds none of the model's trainable parameters, or fsdp=True (the optimizer must hold the shards made later)."""
    if optimizers is None:
        return None, None
    if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
        raise ConfigError("optimizers takes a pair (optimizer, lr_scheduler), either of them None, as in "
                          f"transformers' Trainer; got {type(optimizers).__name__}.")
    optimizer, scheduler = optimizers
    if optimizer is None and scheduler is None:
        return None, None
    if optimizer is None:
        raise ConfigError("optimizers=(None, lr_scheduler): a scheduler needs the optimizer it steps; pass "
                          "optimizers=(optimizer, lr_scheduler), or set lr_scheduler_type in the config.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizers[0] must be a torch.optim.Optimizer; got {type(optimizer).__name__}.")
    if scheduler is not None and not (callable(getattr(scheduler, "step", None)) and
                                      callable(getattr(scheduler, "state_dict", None))):
        raise ConfigError(f"optimizers[1] must be a learning-rate scheduler (with step() and state_dict()); got "
                          f"{type(scheduler).__name__}.")
    if getattr(cfg, "fsdp", False):
        raise ConfigError("optimizers=(...) with fsdp=True: FSDP shards the parameters when training starts, after "
                          "your optimizer was built over the whole ones. Leave optimizers unset (the config's AdamW "
                          "is built over the shards) or train without fsdp.")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in model.parameters() if p.requires_grad):
        raise ConfigError("optimizers[0] holds none of the model's trainable parameters: build it from "
                          "[p for p in model.parameters() if p.requires_grad] after adding LoRA (get_peft_model).")
    return optimizer, scheduler
