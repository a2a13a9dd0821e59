"""The objective hooks of the trainer core (train/loop.py's Trainer): what an objective (SFT, DPO, ORPO, KTO, GRPO,
...) overrides, with SFT's behaviour as the defaults. The loop calls nothing else of an objective; see loop.py's
docstring for the contract."""
from __future__ import annotations

import math

import torch

from fasttune.data.collate import collate, count_targets


class ObjectiveHooks:
    """Mixin of Trainer: the objective hooks and their defaults (examples {"input_ids", "labels"}, the summed
    target-token cross-entropy). The trainer provides `model`, `args`, `dist`, `train_examples` and `pad_id`."""

    trains_classifiers: bool = False
    """Whether this objective trains a sequence classifier (models/sequence_classification.py): RewardTrainer. The
    others need the LM head, and a classifier is a ConfigError for them."""
    supports_packing: bool = True
    """Whether packing=True may pack this objective's examples into shared rows (pack_examples). An objective whose
    examples are not {"input_ids", "labels"} sets False, and packing=True is then a ConfigError (packing_refusal)."""
    packing_refusal: str = "packing=True does not apply to {method}; set packing=False."
    """The ConfigError message of packing=True where supports_packing is False; {method} is the objective's
    `method` (its class name without one)."""
    supports_cuda_graphs: bool = False
    """Whether args.cuda_graphs may replay this objective's micro-batches as CUDA graphs (train/cuda_graphs.py):
    only where micro_batch_loss is the plain SFT loss of {"input_ids", "attention_mask", "labels"}."""
    evaluates: bool = True
    """Whether evaluate() has a loss to report (GRPO: not yet)."""
    step_fillers: int = 0
    """Under FSDP, how many micro-batches this rank's share of the current step is short of the busiest rank's
    (set by the loop before prepare_step; see there)."""

    def prepare(self, dataset) -> list[dict]:
        """Rows (datasets.Dataset, list of dicts or a file path) -> this objective's examples (dicts of token ids
        and whatever collate_batch needs). Required; raises ConfigError / DataError for data that does not fit."""
        raise NotImplementedError

    def shard_companions(self) -> None:
        """Under FSDP, shard the other models this objective runs beside the policy (a distillation teacher), as the
        loop starts training, right after the policy: none by default."""

    def filler_loss(self, num_items: int) -> torch.Tensor:
        """A loss of value 0 (on the device) whose backward the loop runs on a rank short of micro-batches in a step
        under FSDP: its forward and backward join every sharded layer's collectives, as the busiest rank's passes do,
        and leave the gradients unchanged. This one: micro_batch_loss of the first training example, times 0."""
        batch = self.to_device(self.collate_batch([self.train_examples[0]]))
        return self.micro_batch_loss(batch, num_items)[0] * 0.0

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The loss of one micro-batch (on the device). Returns (loss to backprop, already divided by num_items;
        unnormalised loss sum for logging). The sum may stay a tensor on the device: the loop reads the step's sums
        once, after the last micro-batch (host_values)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], num_items_in_batch=num_items, return_logits=False,
                         **self.model_inputs(batch), **self.loss_kwargs())
        if getattr(out, "token_stats", None) is not None:
            self.record_token_stats(out.token_stats, out.target_count)
        if getattr(out, "aux_loss", None) is None:
            return out.loss, out.loss_sum.detach()
        # The model adds the MoE load-balancing loss whole to each micro-batch's loss (as transformers' models do);
        # TRL's SFTTrainer averages it over the step's micro-batches
        weighted = self.aux_loss_share(out.aux_loss.to(out.loss_sum.device))
        return out.loss_sum / num_items + weighted, out.loss_sum.detach() + weighted.detach() * num_items

    def aux_loss_share(self, aux: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """`weight` (default: the model config's router_aux_loss_coef) x a micro-batch's MoE load-balancing loss
        `aux` (() tensor), as TRL's trainers add it: in training divided by the step's micro-batches over all ranks
        (transformers' Trainer divides each micro-batch's loss by the accumulation steps and DDP averages the ranks,
        where fasttune sums them), whole in evaluation. Returns an fp32 () tensor."""
        steps = getattr(self, "step_micro_batches", 1) if self.model.training else 1
        return (aux_weight(self.model) if weight is None else weight) * aux.float() / max(1, steps)

    def model_inputs(self, batch: dict) -> dict:
        """The batch's further model inputs in micro_batch_loss: packed rows' position_ids / segment_ids (SFT on a
        vision-language model: its images)."""
        return {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}

    def loss_kwargs(self) -> dict:
        """Further keywords of the model call in micro_batch_loss (SFT: return_token_stats on fasttune's model)."""
        return {}

    def step_reads(self) -> list:
        """Device tensors the objective wants read with the step's one device read (after its last micro-batch);
        step_read gets their host values (lists of floats)."""
        return []

    def step_read(self, values: list) -> None:
        """The host values of step_reads' tensors, in order; called after every training step on every rank (so it
        may run a host collective), with [] when there was nothing to read."""

    def record_token_stats(self, stats: torch.Tensor, targets: torch.Tensor) -> None:
        """A micro-batch's CausalLMOutput.token_stats and target_count (device tensors, not read here), from
        micro_batch_loss or a CUDA-graph replay; objectives that log token metrics keep them (SFT)."""

    def prepare_step(self, group: list[dict], across_ranks: bool) -> None:
        """Called with this rank's micro-batches of one optimizer step before any forward, as collated (on the
        host, so reading them costs no device sync), with across_ranks=True: objectives whose loss needs statistics
        of the whole accumulated batch (ORPO's token count, KTO's KL estimate) take them here, summed over the ranks
        when across_ranks. An objective may call it itself with across_ranks=False (e.g. per eval batch).
        Under FSDP one whose statistics need forward passes runs `self.step_fillers` more of them (this rank's share
        of the step is that many micro-batches short of the busiest rank's; every sharded forward needs all ranks)."""

    def collate_batch(self, examples: list[dict]) -> dict:
        """Examples -> one micro-batch of tensors (on the CPU; the loop moves it to the device)."""
        return collate(examples, self.pad_id)

    def count_items(self, batch: dict) -> int:
        """What this micro-batch adds to the accumulated batch's loss normaliser (SFT: target tokens). Called on the
        batch as collated, on the host."""
        return count_targets(batch["labels"])

    def batch_tokens(self, batch: dict) -> int:
        """Tokens this micro-batch runs through the model (for tokens/s). Called on the batch as collated, on the
        host."""
        return int(batch["attention_mask"].sum())

    def example_tokens(self, example: dict) -> int:
        """Tokens one example puts through the model (sizes the automatic gradient-checkpointing choice)."""
        return len(example["input_ids"])

    def eval_batch_loss(self, batch: dict) -> tuple[float, int]:
        """(loss sum, count_items) of one eval batch, under torch.no_grad."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         return_logits=False)
        return float(out.loss_sum), out.num_targets

    def step_metrics(self) -> dict:
        """Extra metrics for the log entry of a logging step (averaged since the last one); resets them."""
        return {}

    def eval_metrics(self) -> dict:
        """Extra metrics of the last evaluate() pass, merged into its result; resets them."""
        return {}

    def objective_state(self) -> dict:
        """JSON-serialisable state of the objective that a checkpoint keeps and a resume restores (none for SFT)."""
        return {}

    def load_objective_state(self, state: dict) -> None:
        """Restore what `objective_state` returned when the checkpoint was saved ({} from older checkpoints)."""

    def objective_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of the objective that a checkpoint keeps (objective.safetensors; gathered under FSDP) and a resume
        restores: {} by default (TR-DPO's synced reference, reference_sync.py)."""
        return {}

    def load_objective_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore what `objective_tensors` returned, from the checkpoint of optimizer step `step` ({} from a
        checkpoint without them)."""

    def epoch_order(self, epoch: int) -> list[int]:
        """The training examples' indices in the order epoch `epoch` visits them (seeded by args.data_seed, else
        args.seed, + epoch when args.shuffle). With args.group_by_length, transformers' LengthGroupedSampler order
        (its get_length_grouped_indices on that generator): a random permutation cut into blocks of up to 50
        optimizer steps, each block sorted longest first (example_tokens), so a step's rows have similar lengths and
        pad less; the longest example comes first, so memory runs out at once if it will. GRPO keeps each prompt's
        copies together."""
        n = len(self.train_examples)
        if not self.args.shuffle:
            return list(range(n))
        if self.args.group_by_length:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            step_rows = self.micro_batch_rows * self.args.gradient_accumulation_steps * self.dist.world
            lengths = [self.example_tokens(ex) for ex in self.train_examples]
            return [int(i) for i in get_length_grouped_indices(lengths, step_rows,
                                                               generator=self.data_generator(epoch))]
        return torch.randperm(n, generator=self.data_generator(epoch)).tolist()

    def data_generator(self, epoch: int) -> torch.Generator:
        """The generator that shuffles epoch `epoch`: seeded by args.data_seed (else args.seed) + epoch."""
        seed = self.args.seed if getattr(self.args, "data_seed", None) is None else self.args.data_seed
        return torch.Generator().manual_seed(seed + epoch)

    @property
    def micro_batch_rows(self) -> int:
        """Examples a micro-batch holds: per_device_train_batch_size (online DPO: two completions per prompt)."""
        return self.args.per_device_train_batch_size

    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch, all ranks' micro-batches together."""
        micro = math.ceil(len(self.train_examples) / self.micro_batch_rows)
        return math.ceil(micro / (self.args.gradient_accumulation_steps * self.dist.world))

    def step_groups(self, start_epoch: int, start_micro: int):
        """Yields (epoch, next micro index, [example indices per micro-batch]) per optimizer step, all ranks'
        micro-batches included; epochs repeat until the caller stops."""
        ga = self.args.gradient_accumulation_steps * self.dist.world
        epoch, micro = start_epoch, start_micro
        while True:
            batches = self._micro_batches(epoch)
            while micro < len(batches):
                group = batches[micro:micro + ga]
                micro += len(group)
                yield epoch, micro, group
            epoch, micro = epoch + 1, 0

    def step_batches(self, start_epoch: int, start_micro: int):
        """Yields (epoch, next micro index, [batches as collated, on the host]) per optimizer step, all ranks'
        micro-batches included, from (start_epoch, start_micro) on (a resume's position). The loop trains on
        what this yields: GRPO samples and scores its completions here."""
        for epoch, micro, group in self.step_groups(start_epoch, start_micro):
            yield epoch, micro, [self.collate_batch([self.train_examples[i] for i in ids]) for ids in group]

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors moved to the model's device; other values (plain numbers) as they are."""
        dev = self.model.device
        return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def aux_weight(model) -> float:
    """The weight of the MoE load-balancing loss: model.config.router_aux_loss_coef (0 when absent)."""
    return float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)


def logged_sum(model, out, n) -> torch.Tensor:
    """An evaluation batch's loss sum, times its normaliser n: the target-token loss sum, plus, when the MoE
    load-balancing loss is on (out.aux_loss), its weighted term x n, as transformers' eval loss includes it."""
    if getattr(out, "aux_loss", None) is None:
        return out.loss_sum.detach()
    aux = out.aux_loss.detach().to(out.loss_sum.device, torch.float32)
    return out.loss_sum.detach() + aux_weight(model) * aux * n
