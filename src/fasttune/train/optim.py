"""Optimizer param groups (embedding_learning_rate) and HF-equivalent LR schedules."""
from __future__ import annotations

import math
import re

import torch

from fasttune.errors import ConfigError

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
    # "adamw" on a GPU takes torch's fused kernel (transformers' default, adamw_torch_fused): the same update in
    # one launch instead of ~10 ms of foreach kernels per step at 8B LoRA; "adamw_torch" keeps the foreach one.
    fused = cfg.optim in ("adamw", "adamw_torch_fused") and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             weight_decay=cfg.weight_decay, fused=fused or None)


# transformers' Trainer.get_decay_parameter_names (5.x): no decay for parameters inside an nn.LayerNorm, nor for
# (lower-cased) names that match one of these.
NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that weight decay applies to, by transformers' Trainer rule: every parameter but
    biases and norm weights (those of nn.LayerNorm modules, and names with 'layernorm', 'rmsnorm', a 'norm' or
    '*_norm' component). LoRA A/B and trainable embedding copies are decayed; norms kept trainable are not."""
    in_layernorm = {n for m_name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
                    for n, _ in m.named_parameters(prefix=m_name)}
    return {n for n, _ in model.named_parameters()
            if n not in in_layernorm and not NO_DECAY_NAMES.search(n.lower())}


# transformers' names for bitsandbytes' 8-bit AdamW (block-wise quantised moments; tensors under 4096 values keep
# 32-bit moments, bitsandbytes' min_8bit_size), which Unsloth's notebooks pick.
EIGHT_BIT = {"adamw_8bit": "AdamW8bit", "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def _bnb_adamw(cfg, groups) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"optim='{cfg.optim}' is bitsandbytes' 8-bit AdamW: `pip install bitsandbytes`, or use "
                          f"optim='adamw' (full-precision moments).") from None
    cls = getattr(bnb.optim, EIGHT_BIT[cfg.optim])
    return cls(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def lr_lambda(kind: str, warmup: int, total: int):
    """The LR multiplier step -> float of transformers' schedules (optimization.py): linear warmup over `warmup`
    steps (none for "constant"), then "linear" decay to 0 at `total`, half-cosine ("cosine"), or 1.0
    ("constant", "constant_with_warmup")."""
    def f(step: int) -> float:
        """The multiplier at optimizer step `step` (0-based, as LambdaLR counts)."""
        if kind != "constant" and step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

    return f


def warmup_count(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps as transformers counts them: warmup_steps if > 0, else ceil(warmup_ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def build_scheduler(optimizer, cfg, total_steps: int):
    """A LambdaLR over `optimizer` with cfg.lr_scheduler_type and its warmup (see warmup_count, lr_lambda)."""
    warmup = warmup_count(cfg.warmup_steps, cfg.warmup_ratio, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_steps))


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
