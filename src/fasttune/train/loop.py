"""The one trainer core: batching, gradient accumulation normalised by the target tokens of the whole accumulated
batch, AdamW param groups, LR schedule, clipping, non-finite-step skipping, logging, checkpoints and resume.

Objectives (SFT, DPO, ORPO, KTO, GRPO) subclass Trainer. The contract between them and the loop is the objective
hooks (train/objective_hooks.py, a mixin of Trainer), and nothing else:

- data: `prepare` (rows -> examples; required), `supports_packing` (False: packing=True is a ConfigError),
  `collate_batch`, `example_tokens`;
- the step's batches: `epoch_order`, `steps_per_epoch`, `step_groups`, `step_batches` (GRPO samples there);
- counts, on the host: `count_items` (the normaliser of the accumulated batch: target tokens for SFT, pairs for
  DPO, ...), `batch_tokens`;
- the loss: `prepare_step` (statistics of the whole accumulated batch), `micro_batch_loss`, `eval_batch_loss`,
  `model_inputs` and `loss_kwargs` (what the default micro_batch_loss passes the model besides ids, mask and labels);
- metrics: `step_metrics`, `eval_metrics`;
- resume: `objective_state`, `load_objective_state` (what a checkpoint keeps beyond weights, optimizer and data
  position, e.g. GRPO's adaptive entropy coefficient);
- a helper objectives call: `to_device`.

The defaults are SFT's (examples {"input_ids", "labels"}); the other methods are private to the loop.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fasttune.errors import ConfigError, FastTuneError, write_error
from fasttune.wording import plural
from fasttune.train.callbacks import CallbackMethods, TrainerCallbacks
from fasttune.train.cuda_graphs import cuda_graph_step_for
from fasttune.train.objective_hooks import ObjectiveHooks
from fasttune.train.trainer_api import TrainerMethods, TrainResult
from fasttune.train.args_from import config_from, legacy_trainer_args
from fasttune.train.host_reads import host_values
from fasttune.train.checkpoint import check_schedule, load_checkpoint, save_checkpoint, schedule_settings
from fasttune.train.run_folder import prepare_output_dir, resolve_resume
from fasttune.train.memory_report import PhaseMemory
from fasttune.train.neftune import neftune_noise
from fasttune.train.optim import build_optimizer, build_scheduler, given_optimizers
from fasttune.train.reporters import open_reporters
from fasttune.train.config import steps_every
from fasttune.train.distributed import Dist
from fasttune.train.fsdp import check_fsdp, full_tensor, is_sharded, shard_model
from fasttune.train.signals import GracefulStop
from fasttune.train.trl_args import add_peft_config, check_trainer_kwargs, disable_dropout

LOG_FILE = "log_history.jsonl"
# Example fields that hold token ids (SFT, preference pairs, unpaired rows, GRPO prompts).
ID_FIELDS = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")


class NonFiniteLossError(FastTuneError):
    """max_nonfinite_steps optimizer steps in a row had a NaN/inf loss or gradient norm."""


@dataclass
class _Run:
    """The state of one Trainer.train call: what its step loop reads and advances."""
    out_dir: Path
    total: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    schedule: dict
    step: int = 0
    epoch: int = 0
    micro: int = 0
    lr: float = 0.0
    grad_norm: float = 0.0
    tokens_done: int = 0  # trained by this call (tokens/s)
    tokens_before: int = 0  # trained before a resume's checkpoint
    bad_in_row: int = 0
    every: dict = field(default_factory=dict)  # logging/eval/save intervals in steps (steps_every)
    skipped: int = 0
    losses: list = field(default_factory=list)
    window: list = field(default_factory=list)
    evaluated: tuple = (None, None)  # (step, metrics) of the last eval
    saved: Path | None = None  # the last checkpoint written
    t0: float = 0.0
    bar: object = None
    batches: object = None
    memory: object = None

    @property
    def tokens_seen(self) -> int:
        """Tokens trained since the run's start, across resumes (transformers' num_input_tokens_seen)."""
        return self.tokens_before + self.tokens_done


class Trainer(ObjectiveHooks, CallbackMethods, TrainerMethods):
    """The training loop shared by every objective (see the module docstring for its hooks). model: a fasttune
    model (or the transformers fallback); tokenizer / processing_class; train_dataset (required) and eval_dataset:
    rows as `prepare` takes them; args: the objective's config (config_cls() when None); callbacks: transformers
    TrainerCallbacks (train/callbacks.py); optimizers: transformers' (optimizer, lr_scheduler), either None.
    Raises ConfigError for unknown keyword arguments, a missing train_dataset, FSDP settings that do not fit,
    callbacks or optimizers it cannot honour, or data that does not fit."""

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args=None, config_cls=None,
                 processing_class=None, peft_config=None, callbacks=None, optimizers=None, **kwargs):
        # older TRL trainers' own settings (SFTTrainer(dataset_text_field=..., max_seq_length=...)) and another
        # config class (transformers' TrainingArguments) become the objective's config (train/args_from.py)
        legacy = legacy_trainer_args(type(self).__name__, kwargs)
        check_trainer_kwargs(type(self).__name__, kwargs)
        self.args = config_from(args, config_cls, legacy) if config_cls is not None else args
        if peft_config is not None:  # TRL's way: the trainer adds the LoRA to a base model
            model = add_peft_config(model, peft_config, self.args)
        if getattr(self.args, "disable_dropout", False):
            disable_dropout(model)
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else processing_class
        self.log_history: list[dict] = []
        self.dist = Dist()  # torchrun: joins the process group; otherwise a single process
        check_fsdp(model, self.args, self.dist.world)
        if getattr(model, "is_sequence_classifier", False) and not self.trains_classifiers:
            raise ConfigError(f"{type(self).__name__} trains language models, and this model is a sequence "
                              f"classifier (a `score` head, no LM head). Train a reward model (num_labels=1) with "
                              f"fasttune's RewardTrainer, and a classifier on labelled rows with its "
                              f"ClassificationTrainer (or transformers.Trainer, which runs it as it is).")
        if getattr(model, "family", None) is not None and not getattr(self, "vision", False):
            raise ConfigError(f"{type(self).__name__} does not train vision-language models yet; SFTTrainer "
                              f"(image + text conversations), DPOTrainer and KTOTrainer (preference rows with "
                              f"images) and GRPOTrainer (prompts with images) do.")
        self._train_source, self._eval_source = train_dataset, eval_dataset
        if train_dataset is None:
            raise ConfigError("train_dataset is required: a datasets.Dataset, a list of dicts or a file path.")
        self.train_examples = self.prepare(train_dataset)
        if self.args.packing:
            self.train_examples = self._pack(self.train_examples)
        self.eval_examples = self.prepare(eval_dataset) if eval_dataset is not None else None
        if getattr(self.args, "eval_on_start", False) and not self.eval_examples:
            raise ConfigError("eval_on_start=True evaluates before the first step and needs an eval_dataset.")
        self._check_ids_fit_model()
        self.pad_id = self._pad_id()
        self._given_optimizers = given_optimizers(optimizers, self.model, self.args)  # transformers' (opt, sched)
        self.callbacks = TrainerCallbacks(self, callbacks)
        self.callbacks.fire("on_init_end")

    # --- batching ----------------------------------------------------------------------------------------------
    def _pack(self, examples: list[dict]) -> list[dict]:
        if not self.supports_packing:
            raise ConfigError(self.packing_refusal.format(method=getattr(self, "method", type(self).__name__)))
        from fasttune.data.packing import pack_examples
        from fasttune.models.causal_lm import CausalLM

        if not isinstance(self.model, CausalLM):
            raise ConfigError("packing=True needs fasttune's own decoder (its attention keeps packed documents "
                              "apart); this model runs through the transformers fallback. Set packing=False.")
        return pack_examples(examples, self.args.max_seq_length)

    def _check_ids_fit_model(self):
        """Token ids past the model's embedding (tokens added to the tokenizer but not to the model) are a
        ConfigError naming the fix, not an IndexError deep in the forward pass. Scans the data only when the
        tokenizer is larger than the embedding."""
        vocab = self.model.arch.vocab_size + self.model.arch.extra_embeddings  # (Llama 3.2 Vision's
        # <|image|> sits in the embedding's rows past the vocabulary)
        if self.tokenizer is None or len(self.tokenizer) <= vocab:
            return
        for examples in (self.train_examples, self.eval_examples or []):
            for ex in examples:
                top = max((max(ex[k], default=-1) for k in ID_FIELDS if k in ex), default=-1)
                if top >= vocab:
                    raise ConfigError(
                        f"The data holds token id {top}, but the model's embedding has {vocab} rows: the tokenizer "
                        f"({len(self.tokenizer)} tokens) has tokens the model lacks. Grow the model first with "
                        f"model.resize_token_embeddings(len(tokenizer)), or add tokens with "
                        f"FastLanguageModel.add_new_tokens(model, tokenizer, [...]) (and train the new rows with "
                        f"modules_to_save=['embed_tokens', 'lm_head']).")

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return tok.pad_token_id
        pad = self.model.arch.pad_token_id
        return pad if isinstance(pad, int) else 0

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        order, bs = self.epoch_order(epoch), self.micro_batch_rows
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def total_steps(self) -> int:
        """Optimizer steps of the run: max_steps when set (> 0), else num_train_epochs x steps_per_epoch (>= 1)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * self.steps_per_epoch()))

    # --- training ----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None) -> TrainResult:
        """Train to max_steps / num_train_epochs; returns the run's metrics (train_loss, global_step, tokens/s,
        first/last step loss, eval_loss with an eval set): a dict that also reads as transformers' TrainOutput
        (.metrics, .global_step, .training_loss). SIGINT/SIGTERM stop after the current step with a
        checkpoint; the metrics then hold `interrupted` and `checkpoint`. transformers' trial (hyperparameter
        search) must be None; ignore_keys_for_eval is accepted (see evaluate). Raises ConfigError for a trial, a
        resume that does not fit, NonFiniteLossError after max_nonfinite_steps bad steps in a row."""
        if trial is not None:
            raise ConfigError("train(trial=...) is transformers' hyperparameter search, which fasttune does not "
                              "implement; run one training per setting instead.")
        with neftune_noise(self.model, getattr(self.args, "neftune_noise_alpha", None)):  # SFT's NEFTune
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint) -> TrainResult:
        run = self._start_run(resume_from_checkpoint)
        self.callbacks.train_begin(run)
        if self.args.eval_on_start and run.step == 0:  # transformers' eval_on_start: a baseline before step 1
            run.evaluated = (0, self.evaluate())
            self._log({"step": 0, **run.evaluated[1]}, run.out_dir / LOG_FILE)
        try:
            with GracefulStop() as stop:
                # one collective a step: a signal, or a callback's should_training_stop, on any rank
                while run.step < run.total and not self.dist.any(bool(stop.requested) or self.callbacks.stop_asked()):
                    run.epoch, run.micro, full_group = next(run.batches)
                    self.callbacks.step_begin(run)
                    if self._train_step(run, full_group):
                        self._after_step(run)
                if run.step < run.total and self.dist.any(bool(stop.requested)):
                    stop.requested = stop.requested or "a signal on another rank"
                    run.saved = self._save(run)
        except BaseException:
            run.bar.close()  # ends the bar's line, so an error message starts on a line of its own
            raise
        return self._finish_run(run, stop.requested)

    def _start_run(self, resume_from_checkpoint) -> "_Run":
        """Seed, shard (FSDP), choose checkpointing, build optimizer/scheduler/scaler, resume, open the loggers."""
        args, model = self.args, self.model
        out_dir = Path(args.output_dir)
        _seed_everything(args.seed)
        _set_tf32(getattr(args, "tf32", None))
        model.train()
        if args.fsdp:
            shard_model(model)  # before the optimizer (it must hold this rank's shards) and the memory estimate
            self.shard_companions()
        else:
            self.dist.same_start(model)  # (DDP: one adapter on every rank; shard_model does it under FSDP)
        self._resolve_auto_checkpointing()
        self._graph_step = cuda_graph_step_for(self) if args.cuda_graphs else None
        optimizer = self.optimizer = self._given_optimizers[0] or build_optimizer(model, args)
        total = self.total_steps()
        # fp16 activations underflow without loss scaling; bf16 and fp32 need none.
        scaler = torch.amp.GradScaler(model.device.type) if model.dtype == torch.float16 else None
        run = _Run(out_dir=out_dir, total=total, optimizer=optimizer, scaler=scaler,
                   scheduler=self._given_optimizers[1] or build_scheduler(optimizer, args, total),
                   schedule=schedule_settings(args, total, self.dist.world),
                   every={k: steps_every(getattr(args, f"{k}_steps"), total) for k in ("logging", "eval", "save")})
        self.callbacks.state.logging_steps, self.callbacks.state.eval_steps, self.callbacks.state.save_steps = (
            run.every["logging"], run.every["eval"], run.every["save"])  # shares resolved, as transformers does
        ckpt = resolve_resume(resume_from_checkpoint, out_dir)
        if self.dist.is_main:
            prepare_output_dir(out_dir, ckpt, args.overwrite_output_dir)
        self.dist.barrier()
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, run.scheduler, scaler, self.run_identity(),
                                    lambda saved: check_schedule(ckpt, saved, run.schedule, args.learning_rate))
            run.step, run.epoch, run.micro = state["step"], state["epoch"], state["micro"]
            run.tokens_before = state.get("tokens_seen", 0)
            self.log_history = state["log_history"]
            self.load_objective_state(state.get("objective") or {})
            self.load_objective_tensors(state["objective_tensors"], run.step)
            if self.dist.is_main:
                done = " (already complete: nothing left to train)" if run.step >= total else ""
                print(f"fasttune: resuming from {ckpt} at step {run.step} of {total}{done}.", file=sys.stderr)
        self._check_precision()
        self._log_rewrite = True  # first write replaces the file (a resumed run's log = the uninterrupted one's)
        # TensorBoard / W&B (report_to), fed by _log, on rank 0 only
        self._reporters = open_reporters(args) if self.dist.is_main else None
        run.bar = tqdm(total=total, initial=run.step, desc="training", unit="step", dynamic_ncols=True,
                       disable=not self.dist.is_main)
        run.batches = self.step_batches(run.epoch, run.micro)
        run.memory = PhaseMemory(model.device)  # peak GiB per phase in the log (GPU only)
        run.t0 = time.perf_counter()
        return run

    def _train_step(self, run: "_Run", full_group: list[list[int]]) -> bool:
        """One optimizer step over all ranks' micro-batches of `full_group`; False when it was skipped (NaN/inf)."""
        args, model, optimizer, scaler = self.args, self.model, run.optimizer, run.scaler
        # The step's counts come from the batches as collated, on the host: no device sync per micro-batch.
        host_group = self.dist.shard(full_group, args.gradient_accumulation_steps)
        # FSDP: every rank must run as many forward/backward passes as the busiest one (each joins the layers'
        # gathers); in an epoch's short last step a rank with fewer batches re-runs one, weighted 0.
        fillers = min(args.gradient_accumulation_steps, len(full_group)) - len(host_group) if is_sharded(model) else 0
        # every rank's micro-batches: TRL divides the MoE load-balancing loss by gradient_accumulation_steps and DDP
        # averages the ranks, where fasttune sums them
        self.step_micro_batches = len(full_group)
        self.step_fillers = fillers
        self.prepare_step(host_group, across_ranks=True)
        total = self.dist.sum(sum(self.count_items(b) for b in host_group))
        num_items = int(total) if float(total).is_integer() else total  # (GRPO's shares of a generation's tokens)
        n_tokens = sum(self.batch_tokens(b) for b in host_group)
        group = [self.to_device(b) for b in host_group]
        run.lr = optimizer.param_groups[0]["lr"]
        if num_items == 0:
            # Nothing to learn (e.g. GRPO with every completion masked): a counted step with loss 0 and zero
            # gradients, as TRL runs it; never re-sampled.
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            step_loss, grad_norm, n_tokens = 0.0, 0.0, 0
        else:
            step_loss, grad_norm = self._guarded_step(group, num_items, scaler, fillers, host_group)
        run.memory.mark("forward_backward")
        run.tokens_done += int(self.dist.sum(n_tokens))
        self.tokens_seen = run.tokens_seen  # (TRL's SFT logs it as num_tokens)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # lowers the scale; an fp16 overflow is not the data's fault
            run.bad_in_row, run.skipped = run.bad_in_row + 1, run.skipped + 1
            if run.bad_in_row >= args.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"The loss or gradients were NaN/inf for {plural(run.bad_in_row, 'step')} in a row (step "
                    f"{run.step + 1}); training stopped. Lower the learning rate, use bf16 instead of fp16, or check "
                    f"the data.")
            return False
        run.bad_in_row = 0
        self.callbacks.fire("on_pre_optimizer_step")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.callbacks.fire("on_optimizer_step")
        run.scheduler.step()
        # cuda_graphs: the graphs accumulate into these very tensors; zeroing in place keeps them attached
        optimizer.zero_grad(set_to_none=getattr(self, "_graph_step", None) is None)
        run.memory.mark("optimizer")
        run.step += 1
        run.losses.append(step_loss)
        run.window.append(step_loss)
        run.grad_norm = grad_norm
        return True

    def _after_step(self, run: "_Run"):
        """Progress bar, on_step_end, then the log entry, eval and checkpoint that fall on this step (by the
        *_steps settings, or asked for by a callback's control)."""
        step = run.step
        elapsed = time.perf_counter() - run.t0
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{run.losses[-1]:.4f}", tok_s=f"{run.tokens_done / max(elapsed, 1e-9):,.0f}")
        control = self.callbacks.step_end(run)
        every = run.every
        first = step == 1 and self.args.logging_first_step  # transformers' logging_first_step
        if step % every["logging"] == 0 or step == run.total or control.should_log or first:
            self._log({"step": step, "epoch": round(self.epoch_progress(run), 4),
                       "loss": sum(run.window) / len(run.window), "learning_rate": run.lr,
                       "grad_norm": run.grad_norm, "tokens_per_second": run.tokens_done / max(elapsed, 1e-9),
                       **self.step_metrics(), **run.memory.report()}, run.out_dir / LOG_FILE)
            run.window = []
        if self.eval_examples is not None and (every["eval"] and step % every["eval"] == 0 or
                                               control.should_evaluate):
            run.evaluated = (step, self.evaluate())
            self._log({"step": step, **run.evaluated[1]}, run.out_dir / LOG_FILE)
        if every["save"] and (step % every["save"] == 0 or step == run.total) or control.should_save:
            run.saved = self._save(run)  # the last step too, on a multiple or not, as transformers saves it

    def epoch_progress(self, run: "_Run") -> float:
        """Epochs done as a float: the run's epoch plus the share of its micro-batches already trained."""
        return run.epoch + run.micro / math.ceil(len(self.train_examples) / self.micro_batch_rows)

    def _save(self, run: "_Run") -> Path:
        """checkpoint-<step> (see train/checkpoint.py); under FSDP every rank joins the gathers, rank 0 writes."""
        state = {"step": run.step, "epoch": run.epoch, "micro": run.micro, "log_history": self.log_history,
                 "identity": self.run_identity(), "schedule": run.schedule, "config": asdict(self.args),
                 "tokens_seen": run.tokens_seen, "objective": self.objective_state()}
        path = run.out_dir / f"checkpoint-{run.step}"
        if self.dist.is_main or is_sharded(self.model):
            path = save_checkpoint(run.out_dir, run.step, self.model, run.optimizer, run.scheduler, run.scaler,
                                   state, self.args.save_total_limit, write=self.dist.is_main,
                                   tensors=self.objective_tensors())
        self.dist.barrier()
        self.callbacks.fire("on_save")
        return path

    def _finish_run(self, run: "_Run", stopped_by) -> TrainResult:
        """Close the bar, the final eval (unless this step's ran) and the reporters; the run's metrics."""
        run.bar.close()
        runtime, losses, step, total = time.perf_counter() - run.t0, run.losses, run.step, run.total
        metrics = TrainResult({
            "train_runtime": runtime, "train_loss": sum(losses) / max(1, len(losses)), "global_step": step,
            "train_steps_per_second": len(losses) / max(runtime, 1e-9),
            "train_tokens_per_second": run.tokens_done / max(runtime, 1e-9), "skipped_steps": run.skipped,
            "interrupted": bool(stopped_by and step < total),
            "first_step_loss": losses[0] if losses else None, "last_step_loss": losses[-1] if losses else None})
        if metrics["interrupted"]:
            metrics["checkpoint"] = str(run.saved)
            print(f"fasttune: stopped by {stopped_by} at step {step}/{total}; checkpoint saved to {run.saved}. "
                  f"Resume with trainer.train(resume_from_checkpoint=True) or `fasttune train <same options> --resume`.",
                  file=sys.stderr)
        elif self.eval_examples is not None:
            if run.evaluated[0] != step:  # not evaluated at this step yet (eval_steps need not divide the total)
                run.evaluated = (step, self.evaluate())
                self._log({"step": step, **run.evaluated[1]}, run.out_dir / LOG_FILE)
            metrics.update(run.evaluated[1])
        if self._reporters is not None:
            self._reporters.close()
        self.callbacks.train_end(run, stopped_early=step < total and not stopped_by)
        self.model.eval()
        return metrics

    def _guarded_step(self, group: list[dict], num_items: int, scaler, fillers: int = 0,
                      host_group: list[dict] | None = None) -> tuple[float, float]:
        """Forward/backward over the accumulated micro-batches, then unscale and clip; (step loss, grad-norm). CUDA
        OOM becomes advice. `fillers`: zero-weight passes that only join the FSDP collectives (a rank short of
        batches). `host_group`: the same batches on the host (cuda_graphs reads their masks there)."""
        try:
            parts = []  # each micro-batch's loss sum, left on the device until the step's one read
            for _ in range(fillers):
                self.filler_loss(num_items).backward()
            if fillers:
                self.step_reads()  # (drops what the fillers recorded: they are not the step's batches)
            for i, b in enumerate(group):
                if self._graph_replayable(b, host_group[i] if host_group is not None else None):
                    parts.append(self._graph_step.run(b, num_items, self.loss_kwargs()))
                    if self._graph_step.token_stats is not None:
                        self.record_token_stats(*self._graph_step.token_stats)
                else:
                    loss, part = self.micro_batch_loss(b, num_items)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    parts.append(part)
                if i < len(group) - 1:  # transformers: after each accumulation micro-batch but the step's last
                    self.callbacks.fire("on_substep_end")
            if not is_sharded(self.model):  # FSDP reduce-scatters the gradients itself during backward
                self.dist.sum_grads([p for p in self.model.parameters() if p.requires_grad])
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            # The step's one wait for the device: the loss sums and the grad-norm in one read, which the
            # non-finite check needs before the optimizer steps. Summed on the host, in order, as floats.
            # (with the objective's step_reads: SFT's token metrics)
            reads = self.step_reads()
            values = host_values([*parts, self._clip(self.model), *reads])
            kept = len(values) - len(reads)
            self.step_read(values[kept:])  # on every rank, also with nothing to read (it may gather)
            *parts, grad_norm = values[:kept]
            return self.dist.sum(sum(parts)) / num_items, grad_norm
        except torch.OutOfMemoryError:
            raise self._oom_error(group) from None

    def _oom_error(self, group) -> FastTuneError:
        a, model = self.args, self.model
        seq = max(b["input_ids"].shape[1] if "input_ids" in b else 0 for b in group)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        for p in model.parameters():
            p.grad = None
        mode = getattr(model, "gradient_checkpointing", False)
        advice = [f"lower per_device_train_batch_size (now {a.per_device_train_batch_size}) and raise "
                  f"gradient_accumulation_steps (now {a.gradient_accumulation_steps}) to keep the global batch",
                  f"lower max_seq_length (now {a.max_seq_length}; this batch is {seq} tokens long)"]
        if mode is not True and mode != "offload":
            advice.insert(0, "turn on gradient checkpointing (use_gradient_checkpointing=True or 'offload')")
        elif getattr(model, "recompute_layers", None) is not None:
            advice.insert(0, f"recompute every layer (use_gradient_checkpointing=True; 'auto' recomputed only the "
                             f"first {model.recompute_layers} and kept the later layers' activations)")
        return FastTuneError(f"CUDA ran out of memory at batch size {a.per_device_train_batch_size} x {seq} tokens "
                             f"with gradient checkpointing {mode!r} (peak {peak:.1f} GiB allocated). To fit: "
                             + "; or ".join(advice) + ".")

    def _graph_replayable(self, batch: dict, host_batch: dict | None) -> bool:
        if getattr(self, "_graph_step", None) is None or host_batch is None:
            return False
        from fasttune.models.masks import right_padded

        mask = host_batch.get("attention_mask")
        return self._graph_step.accepts(batch, mask is None or right_padded(mask))

    def _resolve_auto_checkpointing(self):
        forced = self.args.lean_saves  # (None: "auto" decides below)
        if forced is not None and hasattr(self.model, "lean_saves"):
            self.model.lean_saves = forced
        mode = self.model.gradient_checkpointing
        if mode != "auto" and (mode not in (True, "offload") or self.model.device.type != "cuda"):
            return  # (nothing to pick, and no hint to give: the examples are not scanned)
        from fasttune.train.memory_policy import (agreed_pick, apply_pick, choose_checkpointing, most_media_tokens,
                                                 peak_estimate, recompute_hint)

        bs = self.micro_batch_rows
        longest = max(self.example_tokens(ex) for ex in self.train_examples)
        media = bs * most_media_tokens(self.train_examples, self.tokenizer) if getattr(self.model, "family", None) \
            else 0
        if mode != "auto":
            hint = recompute_hint(self.model, bs * longest, media)
            if hint is not None and self.dist.is_main:
                print(f"fasttune: {hint}", file=sys.stderr)
            return
        # (no lean saves under FSDP: a rebuild reads the norm's weight in backward, which FSDP frees between the
        # passes; untested there, so the memory is found by recomputing instead)
        lean_ok = not self.args.fsdp and forced is not False
        mode, why, recomputed, lean = choose_checkpointing(self.model, bs * longest, media, lean_ok=lean_ok,
                                                           offload_ok=not self.args.cuda_graphs)
        picks = self.dist.gather((mode, recomputed, lean))
        if len(set(picks)) > 1:  # every rank must recompute the same layers (see agreed_pick)
            need, _ = peak_estimate(self.model, bs * longest, media, lean_ok)
            mode, recomputed, lean = agreed_pick(picks, self.model.arch.num_layers, need)
            why += f"; the ranks differ, so all take the most memory-saving pick ({mode!r}, recompute_layers " \
                   f"{recomputed}, lean saves {lean})"
        apply_pick(self.model, mode, recomputed, lean if forced is None else forced)
        self._auto_offload = mode == "offload"
        print(f"fasttune: {why}", file=sys.stderr)

    def run_identity(self) -> dict:
        """What a checkpoint must agree on to be resumed into this trainer."""
        c, lora = self.model.arch, self.model.lora_settings
        return {"architecture": [c.model_type, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
                                 c.num_kv_heads, c.intermediate_size],
                "base": self.model.name_or_path, "lora": lora.to_dict() if lora else None}

    def _clip(self, model) -> torch.Tensor:
        """Clip the gradients to max_grad_norm; their total norm before clipping, on the device (not read)."""
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        # Sharded grads (DTensors): the norm is the full one, and the same on every rank.
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _check_precision(self):
        dtype = self.model.dtype
        if self.args.fp16 and dtype == torch.float32 and self.model.device.type == "cpu":
            # the notebooks' `fp16=not is_bf16_supported()` on a machine without a GPU: transformers' and TRL's
            # trainers accept it there and train in fp32, and so does this one
            if self.dist.is_main:
                print("fasttune: fp16=True has no effect on the CPU; training in float32.", file=sys.stderr)
            return
        if self.args.bf16 and dtype != torch.bfloat16 or self.args.fp16 and dtype != torch.float16:
            want = "bfloat16" if self.args.bf16 else "float16"
            raise ConfigError(f"The config asks for {want} training but the model was loaded in {dtype}. Load it with "
                              f"FastLanguageModel.from_pretrained(..., dtype='{want}'), or leave bf16/fp16 unset.")

    def _log(self, entry: dict, path: Path):
        self.log_history.append(entry)
        self.callbacks.fire("on_log", logs=dict(entry))  # a copy: callbacks may pop keys (PrinterCallback does)
        if not self.dist.is_main:
            return  # every rank keeps log_history; only rank 0 writes
        if getattr(self, "_reporters", None) is not None:
            self._reporters.log(entry)
        lines = self.log_history if self._log_rewrite else [entry]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w" if self._log_rewrite else "a") as f:
                f.write("".join(json.dumps(h) + "\n" for h in lines))
        except OSError as e:
            raise write_error(e, "the training log", path) from None
        self._log_rewrite = False


def _set_tf32(tf32: bool | None):
    """transformers' `tf32`: allow (True) or forbid (False) TF32 in CUDA fp32 matmuls and cuDNN convolutions, as
    TrainingArguments does; None leaves torch's settings. Without CUDA there is nothing to set."""
    if tf32 is None or not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

