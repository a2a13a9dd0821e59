"""transformers' Trainer methods that scripts call around training, on fasttune's trainers: evaluate() with its
arguments, save_model, save_state, log_metrics / save_metrics, is_world_process_zero / is_local_process_zero, and
processing_class; push_to_hub is refused (no network at run time). Mixed into train/loop.py's Trainer, whose
attributes (model, tokenizer, args, dist, callbacks, eval_examples, prepare, collate_batch, ...) they use.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fasttune.errors import ConfigError, write_error


class TrainResult(dict):
    """What train() returns: the run's metrics as a dict (train_loss, global_step, train_runtime, ...), which also
    reads as transformers' TrainOutput, as the notebooks use it (`trainer_stats.metrics["train_runtime"]`,
    `.global_step`, `.training_loss`)."""

    @property
    def metrics(self) -> dict:
        """The metrics (a plain copy), TrainOutput.metrics."""
        return dict(self)

    @property
    def global_step(self) -> int:
        """Optimizer steps done, TrainOutput.global_step."""
        return self["global_step"]

    @property
    def training_loss(self) -> float:
        """The mean step loss, TrainOutput.training_loss."""
        return self["train_loss"]


class TrainerMethods:
    """transformers.Trainer's names for evaluation, saving and metrics files (see the module docstring)."""

    @property
    def processing_class(self):
        """The tokenizer (or processor) the trainer was given, under transformers' name for it."""
        return self.tokenizer

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """{"eval_loss": summed eval_batch_loss / its count over the eval set, plus eval_metrics()}, under no_grad
        in eval mode (the training mode is restored); fires on_evaluate. transformers' signature: eval_dataset (rows
        as `prepare` takes them, or a dict of named sets, each evaluated with the prefix eval_<name>) replaces the
        trainer's eval_dataset for this call; metric_key_prefix replaces "eval" in the keys; ignore_keys is accepted
        (only the logits are ever gathered). Raises ConfigError without an eval set, or for a trainer that does not
        evaluate."""
        if isinstance(eval_dataset, dict):  # transformers: each named set in turn
            return {k: v for name, ds in eval_dataset.items()
                    for k, v in self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}").items()}
        metrics = self.evaluation_pass(eval_dataset, metric_key_prefix)
        self.callbacks.fire("on_evaluate", metrics=metrics)
        return metrics

    @torch.no_grad()
    def evaluation_pass(self, dataset=None, metric_key_prefix: str = "eval") -> dict:
        """The loss (and eval_metrics()) over `dataset` (else the trainer's eval set), keys prefixed
        metric_key_prefix; fires on_prediction_step after each batch. Raises as evaluate() does."""
        if not self.evaluates:
            raise ConfigError(f"{type(self).__name__} does not evaluate an eval_dataset yet.")
        examples = self.eval_examples if dataset is None else self.prepare(dataset)
        if not examples:
            raise ConfigError("evaluate() needs an eval_dataset (given to the trainer, or to evaluate()).")
        was_training = self.model.training
        self.model.eval()
        total, count, bs = 0.0, 0, self.args.per_device_eval_batch_size
        try:
            for i in range(0, len(examples), bs):
                part, n = self.eval_batch_loss(self.to_device(self.collate_batch(examples[i:i + bs])))
                total, count = total + part, count + n
                self.callbacks.fire("on_prediction_step")  # transformers: after each evaluation batch
        finally:
            self.model.train(was_training)
        metrics = {"eval_loss": total / max(1, count), **self.eval_metrics()}
        if metric_key_prefix != "eval":
            metrics = {f"{metric_key_prefix}_{k[5:]}" if k.startswith("eval_") else k: v for k, v in metrics.items()}
        return metrics

    def save_model(self, output_dir=None, _internal_call: bool = False):
        """The trained model into output_dir (default args.output_dir), as transformers' Trainer saves it: a LoRA
        model's PEFT adapter, or a fully fine-tuned model's checkpoint, with the tokenizer. Rank 0 writes (under
        FSDP every rank joins the gather). Raises what model.save_pretrained raises (WriteError for a failed write)."""
        from fasttune.sharding import is_sharded

        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if is_sharded(self.model) or self.dist.is_main:
            self.model.save_pretrained(folder, self.tokenizer)

    def save_state(self):
        """transformers' trainer_state.json (the callbacks' TrainerState: log history, global step, ...) in
        args.output_dir, on rank 0. Raises WriteError for a failed write."""
        if self.dist.is_main:
            path = Path(self.args.output_dir) / "trainer_state.json"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.state.save_to_json(str(path))
            except OSError as e:
                raise write_error(e, "the trainer state", path) from None

    def log_metrics(self, split: str, metrics: dict):
        """Print `metrics` of `split` ("train", "eval", ...) as transformers' Trainer does, on rank 0."""
        if not self.dist.is_main:
            return
        print(f"***** {split} metrics *****")
        width = max((len(k) for k in metrics), default=0)
        for key in sorted(metrics):
            value = metrics[key]
            shown = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else value
            print(f"  {key:<{width}} = {shown}")

    def save_metrics(self, split: str, metrics: dict, combined: bool = True):
        """Write `metrics` to args.output_dir/{split}_results.json and, with combined, merge them into
        all_results.json, as transformers' Trainer does, on rank 0. Raises WriteError for a failed write."""
        if not self.dist.is_main:
            return
        folder = Path(self.args.output_dir)
        path = folder / f"{split}_results.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics, indent=4, sort_keys=True))
            if combined:
                path = folder / "all_results.json"
                merged = json.loads(path.read_text()) if path.exists() else {}
                path.write_text(json.dumps({**merged, **metrics}, indent=4, sort_keys=True))
        except OSError as e:
            raise write_error(e, f"the {split} metrics", path) from None

    def is_world_process_zero(self) -> bool:
        """Whether this process is rank 0 of the job (the one that writes files)."""
        return self.dist.is_main

    def is_local_process_zero(self) -> bool:
        """Whether this process is the first on its machine (LOCAL_RANK 0)."""
        import os

        return os.environ.get("LOCAL_RANK", "0") == "0"

    def push_to_hub(self, *args, **kwargs):
        """Refused: fasttune reaches no network at run time. Raises ConfigError naming the way to upload."""
        raise ConfigError("push_to_hub(): fasttune writes local files only; save with trainer.save_model(folder) and "
                          "upload the folder with `huggingface-cli upload`.")
