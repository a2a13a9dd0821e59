"""TR-DPO's reference updates (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"), as
TRL 1.16's `sync_ref_model`, `ref_model_mixup_alpha` and `ref_model_sync_steps` of DPOConfig, KTOConfig, GRPOConfig
and RLOOConfig: after every ref_model_sync_steps-th optimizer step the reference moves towards the policy,

    ref <- alpha x policy + (1 - alpha) x ref

(TRL's SyncRefModelCallback, at on_step_end: before that step's log, evaluation and checkpoint).

TRL syncs only a separate full-size reference model (full fine-tuning, where ours is the same: a copy of every
weight, mixed exactly) and refuses a PEFT model. On LoRA fasttune's reference is the adapter's starting weights
(reference.py; a fresh adapter is the base model), so the mix is of the adapter's trainable parameters: each LoRA A
and B and any modules_to_save, as TRL's PEFT adapter EMA mixes adapters.
- alpha = 1 (the paper's hard update) makes the reference the policy exactly, and so does the mix of
  modules_to_save for any alpha (they are linear in their weights).
- For alpha < 1 the reference's LoRA product B' A' (B' = alpha B + (1 - alpha) B_ref, A' likewise) differs from the
  paper's mix of the weights, alpha B A + (1 - alpha) B_ref A_ref, by -alpha (1 - alpha) (B - B_ref)(A - A_ref): the
  mix of full weights would need a full-size copy, which fasttune does not keep.

The mixed reference weights are part of every checkpoint (objective.safetensors), so a resumed run goes on with the
reference it had.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError
from fasttune.train.objectives.reference import ReferencePolicy

FIELDS = ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")
TENSOR_PREFIX = "reference."


def check_sync_settings(config, no_reference: str | None = None):
    """Raise ConfigError for ref_model_mixup_alpha outside (0, 1] or ref_model_sync_steps not a whole number >= 1
    (checked whether or not sync_ref_model is on, as a typo should not wait for it), and for sync_ref_model=True when
    `no_reference` says why the config takes no reference passes (e.g. "precompute_ref_log_probs=True ...")."""
    alpha, steps = config.ref_model_mixup_alpha, config.ref_model_sync_steps
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ConfigError(f"ref_model_mixup_alpha={alpha!r} is invalid: the policy's share of the reference after a "
                          f"sync, in (0, 1] (TRL's default 0.6; 1 copies the policy).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"ref_model_sync_steps={steps!r} is invalid: the optimizer steps between reference syncs, a "
                          f"whole number >= 1 (TRL's default 512).")
    if config.sync_ref_model and no_reference:
        raise ConfigError(f"sync_ref_model=True moves the reference during training, but {no_reference}. Set "
                          f"sync_ref_model=False, or drop that setting.")


def synced_reference(model, args) -> ReferencePolicy:
    """The reference of DPO, KTO, GRPO with beta > 0, ...: the model as it is now, i.e. as handed to the trainer
    (ReferencePolicy; call it before any training step), kept as a copy of the trainable weights when
    args.sync_ref_model is on (the copy is what the syncs move; a fresh adapter's copy is still the base model).
    Raises ConfigError for full fine-tuning under fsdp=True: every rank would hold a whole copy of the model before
    the sharding."""
    if model.lora_settings is None and getattr(args, "fsdp", False):
        raise ConfigError("A reference for full fine-tuning under fsdp=True is not implemented: the reference is a "
                          "copy of every weight, which each rank would hold whole before sharding. Use LoRA "
                          "(get_peft_model), or reference log-probs computed before training "
                          "(precompute_ref_log_probs=True, DPO / KTO), or train without FSDP.")
    return ReferencePolicy(model, keep_copy=bool(getattr(args, "sync_ref_model", False)))


class ReferenceSync:
    """Mixin of the trainers whose config has sync_ref_model (before Trainer in the bases): the syncs after the
    optimizer steps, and the synced weights in checkpoints. The trainer sets `self.reference` (synced_reference)
    before training whenever sync_ref_model is on; a trainer whose config lacks the field is left alone."""

    def _syncing(self) -> bool:
        return bool(getattr(self.args, "sync_ref_model", False))

    def check_reference_sync(self, method: str, why_none: str):
        """Raise ConfigError when sync_ref_model is on but this trainer kept no reference (`why_none` says why)."""
        if self._syncing() and getattr(self, "reference", None) is None:
            raise ConfigError(f"{method} with sync_ref_model=True needs reference passes to sync, but {why_none}. "
                              f"Set sync_ref_model=False.")

    def _after_step(self, run):
        a = self.args
        if self._syncing() and run.step % a.ref_model_sync_steps == 0:
            self.reference.blend(a.ref_model_mixup_alpha)
        super()._after_step(run)

    def objective_tensors(self) -> dict[str, torch.Tensor]:
        """The synced reference's weights ({"reference.<parameter name>": tensor}), {} without sync_ref_model."""
        tensors = super().objective_tensors()
        if self._syncing():
            tensors.update({TENSOR_PREFIX + n: w for n, w in self.reference.saved.items()})
        return tensors

    def load_objective_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """The reference's weights from a checkpoint of step `step`. Raises ConfigError when sync_ref_model is on
        and a sync already happened by that step but the checkpoint keeps no reference (written with sync off), or
        keeps one for another set of trainable parameters."""
        super().load_objective_tensors(tensors, step)
        if not self._syncing():
            return
        kept = {k.removeprefix(TENSOR_PREFIX): t for k, t in tensors.items() if k.startswith(TENSOR_PREFIX)}
        saved = self.reference.saved
        if not kept:
            if step >= self.args.ref_model_sync_steps:
                raise ConfigError(f"The checkpoint at step {step} keeps no synced reference (it was written with "
                                  f"sync_ref_model=False), and with ref_model_sync_steps="
                                  f"{self.args.ref_model_sync_steps} the reference would have moved by then. Resume "
                                  f"with the settings it was written with, or start a new run.")
            return
        if set(kept) != set(saved):
            raise ConfigError(f"The checkpoint's synced reference has {len(kept)} tensors, this model trains "
                              f"{len(saved)}; resume with the same model, LoRA rank, targets and modules_to_save.")
        with torch.no_grad():
            for n, t in kept.items():
                saved[n] = t.to(device=saved[n].device, dtype=saved[n].dtype)  # FSDP: sharded again when used
