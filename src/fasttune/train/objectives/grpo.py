"""GRPO over the one trainer core: each optimizer step samples num_generations completions per prompt with the
KV-cache generate(), scores them with the reward functions, normalises the rewards per group into advantages, and
runs the clipped objective (optional KL to the reference = the policy as handed to the trainer, as in TRL) over
micro-batches.

The loop stays the core's (accumulation, clipping, schedule, checkpoints, logging); this class supplies the step's
micro-batches (`step_batches`) and the loss of one (`micro_batch_loss`). The math is in grpo_loss.py.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fasttune.constants import IMAGE_KEYS
from fasttune.data.formats import row_label
from fasttune.data.prompts import encode_prompt
from fasttune.data.sources import load_rows, source_name
from fasttune.data.vision_prompts import (encode_vision_prompt, has_images, prompt_media, require_processor,
                                         row_images, with_image_payloads)
from fasttune.errors import ConfigError, DataError
from fasttune.generate import left_pad, stop_token_ids
from fasttune.train.host_reads import host_values
from fasttune.train.loop import Trainer
from fasttune.train.trl_args import load_named_model, router_aux_loss_weight
from fasttune.train.objectives.grpo_config import GRPOConfig, generation_layout
from fasttune.train.objectives.grpo_loss import (clip_stats, entropy_bonus, group_advantages, high_entropy_mask,
                                                 off_policy_mask, per_token_loss, reduce_loss, vespo_weights)
from fasttune.train.objectives.grpo_rewards import NoRewardError, RewardScoring, metric_windows
from fasttune.train.objectives.reference import ReferencePolicy, model_token_logprobs, reference_policy, score_positions
from fasttune.train.reward_models import trainer_reward_funcs
from fasttune.train.rewards import required_columns, reward_name

__all__ = ["GRPOTrainer", "GRPOConfig", "NoRewardError"]


# Under torchrun each rank samples its own share of a step: with its own seed, so that a group split over ranks
# does not draw the same completions twice
RANK_SEED_STRIDE = 104_729


def _copies(examples: list[dict]) -> int:
    """How many times each example repeats in a row (a group's completions share one example object), when every
    run has the same length; else 1."""
    runs, start = [], 0
    for i in range(1, len(examples) + 1):
        if i == len(examples) or examples[i] is not examples[start]:
            runs.append(i - start)
            start = i
    return runs[0] if runs and len(set(runs)) == 1 else 1


def _fp32_head(model, name: str) -> None:
    """TRL's cast_lm_head_to_fp32 (ScaleRL): the model's logits and log-probs (sampling, old / reference / policy
    log-probs) from the LM head's product in fp32; the weights stay 16-bit (CausalLM.fp32_head). Raises ConfigError on
    the transformers fallback and with offload_lm_head."""
    from fasttune.models.causal_lm import CausalLM
    from fasttune.models.host_head import host_head

    if not isinstance(model, CausalLM):
        raise ConfigError(f"{name}: cast_lm_head_to_fp32=True needs a model on fasttune's decoder; this one runs on "
                          f"the transformers fallback. Leave cast_lm_head_to_fp32=False.")
    if host_head(model) is not None:
        raise ConfigError(f"{name}: cast_lm_head_to_fp32=True is not implemented with offload_lm_head=True (the "
                          f"streamed head computes 16-bit logits). Load the model without offload_lm_head, or leave "
                          f"cast_lm_head_to_fp32=False.")
    model.fp32_head = True


class GRPOTrainer(RewardScoring, Trainer):
    """GRPO (Shao et al. 2024) as TRL's GRPOTrainer computes it, on rows with a `prompt`. reward_funcs: callables
    and/or built-in names (see fasttune.train.rewards), default GRPOConfig.reward_funcs. Raises ConfigError for
    args that are not a GRPOConfig, no tokenizer, a reward_weights length that does not match, completions per
    step (or per eval batch) that are not whole groups of num_generations (num_generations_eval), or beta > 0 on a
    model without LoRA adapters (full fine-tuning). An eval_dataset is evaluated as TRL evaluates one
    (evaluation_pass).

    With beta > 0 the KL reference is the policy as handed to the trainer, as TRL 1.16's GRPOTrainer takes a PEFT
    model: a fresh adapter (LoRA B zero) is the base with the adapters off; an adapter loaded from a folder, already
    trained, or with modules_to_save is kept as a frozen copy (ReferencePolicy). With beta == 0 there is no
    reference and no copy.

    On a vision-language model (FastVisionModel, with its processor as processing_class) rows may hold images, as
    TRL 1.16's GRPOTrainer reads them: an `image` or `images` column and a chat-message `prompt` whose image items
    take them (data/vision_prompts.py). Each completion is sampled and scored with its prompt's images merged in;
    the reward functions get the prompts as TRL's (image items carrying their images) and the `image` / `images`
    column with the other columns.

    A reward function may be a reward model (an nn.Module sequence classifier, e.g. one trained with RewardTrainer)
    with its tokenizer in reward_processing_classes (one entry per reward function, None for plain functions), as
    in TRL: see train/reward_models.py."""

    supports_packing = False
    packing_refusal = "packing does not apply to GRPO; set packing=False."
    config_cls = GRPOConfig
    uses_rewards = True  # (on-policy distillation samples and trains without reward functions)

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with the reference policy (a KL term: beta > 0)."""
        return self.args.beta != 0.0

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, tokenizer=None, reward_processing_classes=None, **kwargs):
        name, config = type(self).__name__, self.config_cls.__name__
        args = args if args is not None else self.config_cls()
        if not isinstance(args, self.config_cls):
            raise ConfigError(f"{name} needs args={config}(...), got {type(args).__name__}.")
        model, tok = load_named_model(model, tokenizer if tokenizer is not None else processing_class)
        if tok is None:
            raise ConfigError(f"{name} needs a tokenizer (tokenizer=... or processing_class=...) to encode "
                              "prompts and decode completions for the reward functions.")
        self.vision = getattr(model, "family", None) is not None  # a vision-language model: prompts may hold images
        if self.vision:
            require_processor(tok, name)
        given = reward_funcs is not None
        self.reward_funcs = trainer_reward_funcs(
            reward_funcs if given else args.reward_funcs, reward_processing_classes,
            "reward_funcs" if given else f"{config}.reward_funcs", args.max_completion_length,
            args.per_device_train_batch_size, model, args.chat_template_kwargs) if self.uses_rewards else []
        self.reward_names = [reward_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(weights)} values but there are {len(self.reward_funcs)} "
                              f"reward functions ({', '.join(self.reward_names)}); give one weight per function.")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        if args.chat_template:
            from fasttune.data.templates import resolve_chat_template

            tok.chat_template = resolve_chat_template(args.chat_template)  # kept on the tokenizer saved later
        super().__init__(model, tok, train_dataset, eval_dataset, args, config_cls=self.config_cls, **kwargs)
        a = self.args
        per_eval = a.per_device_eval_batch_size * self.dist.world
        if self.eval_examples is not None and per_eval % self.eval_generations:
            raise ConfigError(f"Each evaluation batch samples per_device_eval_batch_size x ranks = {per_eval} "
                              f"completions, which must hold whole groups of num_generations_eval="
                              f"{self.eval_generations}. Make it a multiple (as in TRL).")
        completions_per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * self.dist.world
        self.generation_steps, self.generations_per_step = generation_layout(a, self.dist.world)
        if completions_per_step % a.num_generations:
            raise ConfigError(
                f"Each step samples per_device_train_batch_size x gradient_accumulation_steps x ranks = "
                f"{completions_per_step} completions, which must hold whole groups of num_generations="
                f"{a.num_generations}. Make that product a multiple of num_generations (as in TRL).")
        if getattr(a, "cast_lm_head_to_fp32", False):
            _fp32_head(self.model, name)
        # TRL's MoE load-balancing loss on the policy's forward (GRPO / RLOO; on by default with the config's weight)
        self.aux_weight = router_aux_loss_weight(self.model, a.router_aux_loss_coef) \
            if hasattr(a, "router_aux_loss_coef") else 0.0
        # The reference is taken now, from the model as handed over (before any step), as TRL copies its "ref".
        self.reference: ReferencePolicy | None = None
        if self.uses_reference:
            self.reference = reference_policy(self.model, f"{name.removesuffix('Trainer')} with beta > 0",
                                              "Add LoRA with get_peft_model, or set beta=0.")
        self.eps_low = a.epsilon
        self.eps_high = a.epsilon_high if a.epsilon_high is not None else a.epsilon
        # the entropy controller's state (use_adaptive_entropy): the coefficient, the last step's mean entropy (inf
        # before the first: no bonus in the first step, as TRL) and the running (sum, count) of this step's entropies
        self._entropy_coef = getattr(a, "entropy_coef", 0.0)  # (RLOOConfig has no entropy bonus)
        self._last_entropy, self._window_entropy = float("inf"), [0.0, 0.0]
        self.start_metrics()

    # --- data --------------------------------------------------------------------------------------------------
    def prepare(self, dataset) -> list[dict]:
        """Rows with `prompt` (a string or a message list, encoded by data.prompts.encode_prompt; on a
        vision-language model a message list, with its images, by data.vision_prompts.encode_vision_prompt) and any
        columns the reward functions read. Returns each prompt num_generations times in a row (the groups), so the
        core's batch counting holds. Raises DataError naming the row for a bad prompt, a missing reward column, a
        prompt too long for max_seq_length (unless drop_long), or images on a model that reads text only."""
        a, tok = self.args, self.tokenizer
        rows, name = load_rows(dataset), source_name(dataset)
        base_dir = Path(dataset).expanduser().resolve().parent if isinstance(dataset, (str, os.PathLike)) else None
        model_limit = self.model.max_seq_length or a.max_seq_length
        limit = min(a.max_seq_length, model_limit) - a.max_completion_length
        if limit < 1:
            raise ConfigError(f"max_completion_length={a.max_completion_length} leaves no room for the prompt within "
                              f"max_seq_length={min(a.max_seq_length, model_limit)}; lower max_completion_length.")
        needed = sorted({c for f in self.reward_funcs for c in required_columns(f)})
        examples = []
        for i, row in enumerate(rows):
            where = row_label(i, name)
            prompt, sources = row.get("prompt"), []
            if has_images(row) and not self.vision:
                raise DataError(f"{where}: the row has images, but {type(self.model).__name__} reads text only. Load "
                                f"a vision-language model with FastVisionModel.from_pretrained, or drop the images.")
            if self.vision and (isinstance(prompt, list) or has_images(row)):
                laid_out = encode_vision_prompt(prompt, row_images(row), tok, where, base_dir,
                                                **(a.chat_template_kwargs or {}))
                ids, sources = laid_out.ids, laid_out.sources
                prompt = with_image_payloads(laid_out)  # what TRL's reward functions get
            else:
                prompt, ids = encode_prompt(prompt, tok, where, **(a.chat_template_kwargs or {}))
            for col in needed:
                if row.get(col) is None:
                    users = [n for f, n in zip(self.reward_funcs, self.reward_names) if col in required_columns(f)]
                    raise DataError(f"{where}: field '{col}' is missing or null; the reward function "
                                    f"{', '.join(users)} compares each completion with it. Give every row '{col}'.")
            if len(ids) > limit:
                if a.drop_long:
                    continue
                raise DataError(f"{where}: field 'prompt' is {len(ids)} tokens; with max_completion_length="
                                f"{a.max_completion_length} at most {limit} fit in max_seq_length. Shorten it, raise "
                                f"max_seq_length, or set drop_long=True to skip such rows.")
            columns = {k: v for k, v in row.items() if k != "prompt"}
            examples.append({"prompt": prompt, "prompt_ids": ids, "input_ids": ids, "columns": columns,
                             "images": sources})
        if not examples:
            raise DataError("No usable prompts: every row was longer than the prompt limit and drop_long=True.")
        return [ex for ex in examples for _ in range(a.num_generations)]

    def epoch_order(self, epoch: int) -> list[int]:
        """Prompts in random order (data_generator's), each prompt's num_generations copies kept together."""
        g = self.args.num_generations
        n = len(self.train_examples) // g
        order = list(range(n))
        if self.args.shuffle:
            order = torch.randperm(n, generator=self.data_generator(epoch)).tolist()
        return [p * g + j for p in order for j in range(g)]

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: each sampled batch is trained on num_iterations times."""
        return super().steps_per_epoch() * self.args.num_iterations  # each sampled batch is used num_iterations times

    def example_tokens(self, example: dict) -> int:
        """Prompt tokens plus max_completion_length (the longest a sampled row can be)."""
        return len(example["prompt_ids"]) + self.args.max_completion_length

    def count_items(self, batch: dict) -> int | float:
        """Completion tokens: the normaliser of token-level losses (dapo) over the whole accumulated batch (a share
        of the generation batch's tokens when one feeds several steps, see _share_items)."""
        return batch["items_share"] if "items_share" in batch else int(batch["completion_mask"].sum())

    # --- sampling and scoring, once per optimizer step ---------------------------------------------------------
    def step_batches(self, start_epoch: int, start_micro: int):
        """Per optimizer step, the group's prompts sampled and scored once (rollout, seeded by epoch and micro so
        that a resume samples the same), yielded num_iterations times as (epoch, next micro index, micro-batches)."""
        ga, rank = self.args.gradient_accumulation_steps, self.dist.rank
        groups = self.step_groups(start_epoch, start_micro)
        if self.generations_per_step > 1:
            yield from self._split_step_batches(groups)
            return
        while True:
            # One generation batch feeds generation_steps optimizer steps (TRL's steps_per_generation), each reused
            # num_iterations times over (TRL's order: the generation's steps, then again).
            chunk = [next(groups) for _ in range(self.generation_steps)]
            epoch, micro = chunk[0][:2]
            # Under torchrun each rank samples and scores only its own micro-batches (the loop trains this rank's
            # share of each step's list; the other ranks' places stay None); rewards are gathered for the advantages.
            owns = [self.dist.shard(group, ga) for _, _, group in chunk]
            seed = self.args.seed + 1_000_003 * epoch + micro + RANK_SEED_STRIDE * rank  # the same after a resume
            batches = self.rollout([self.train_examples[i] for own in owns for ids in own for i in ids],
                                   [len(ids) for own in owns for ids in own], seed, across_ranks=True)
            if len(chunk) > 1:
                self._share_items(batches, sum(len(group) for _, _, group in chunk))
            steps, start = [], 0
            for (epoch, micro, group), own in zip(chunk, owns):
                step = [None] * len(group)
                step[rank * ga:rank * ga + len(own)] = batches[start:start + len(own)]
                for b in step[rank * ga:rank * ga + len(own)]:
                    b["steps"] = len(group)  # the step's micro-batches over all ranks (a plain int)
                start += len(own)
                steps.append((epoch, micro, step))
            for _ in range(self.args.num_iterations):
                yield from steps

    def _split_step_batches(self, groups):
        """step_batches when one optimizer step holds several generation batches (steps_per_generation below
        gradient_accumulation_steps): each rank's micro-batches of the step are sampled and scored in runs of
        steps_per_generation (every rank the same number of runs, some maybe empty, since scoring gathers rewards),
        each run's token-level losses normalised by its own completion tokens (all ranks) x the step's micro-batches a
        rank / steps_per_generation, as TRL normalises dapo (and cispo, vespo) then."""
        ga, rank, runs = self.args.gradient_accumulation_steps, self.dist.rank, self.generations_per_step
        spg = ga // runs
        for epoch, micro, group in groups:
            own = self.dist.shard(group, ga)
            batches = []
            for k in range(runs):
                part = own[k * spg:(k + 1) * spg]
                seed = self.args.seed + 1_000_003 * epoch + micro + k * spg + RANK_SEED_STRIDE * rank
                run = self.rollout([self.train_examples[i] for ids in part for i in ids], [len(ids) for ids in part],
                                   seed, across_ranks=True)
                tokens = self.dist.sum(sum(float(b["completion_mask"].sum()) for b in run))
                per_rank = -(-len(group) // self.dist.world)  # (TRL's current gradient_accumulation_steps)
                for b in run:
                    b["normalizer"] = tokens * per_rank / spg
                batches += run
            step = [None] * len(group)
            step[rank * ga:rank * ga + len(own)] = batches
            for b in batches:
                b["steps"] = len(group)  # the step's micro-batches over all ranks (a plain int)
            yield epoch, micro, step

    def _share_items(self, batches: list[dict], micro_batches: int):
        """A generation batch over several optimizer steps: each micro-batch counts the generation's completion tokens
        (all ranks) / its micro-batches (all ranks), so a step's loss normaliser is the generation's tokens x
        gradient_accumulation_steps / steps_per_generation, as TRL normalises dapo (and cispo) then."""
        tokens = self.dist.sum(sum(float(b["completion_mask"].sum()) for b in batches))
        for b in batches:
            b["items_share"] = tokens / micro_batches

    @torch.no_grad()
    def rollout(self, examples: list[dict], sizes: list[int], seed: int, group: int | None = None,
                across_ranks: bool = False) -> list[dict]:
        """Sample a completion for each example (consecutive copies of a prompt form a group of `group`, default
        num_generations), score, and return the micro-batches (`sizes` completions each). across_ranks: the
        examples are this rank's share of a step whose groups may span ranks (rewards gathered, see score)."""
        completion_ids, truncated = self.sample(examples, seed) if examples else ([], [])
        return self.score(examples, completion_ids, truncated, sizes, group, across_ranks)

    def sample(self, examples: list[dict], seed: int, model=None) -> tuple[list[list[int]], list[bool]]:
        """One completion per example from model.generate (temperature, top_p, top_k; seeded; `model`: the policy
        unless given, e.g. GKD's teacher): (token ids up to and including the first stop token, whether each hit
        max_completion_length without one)."""
        a, model = self.args, self.model if model is None else model
        stops = stop_token_ids(self.tokenizer, model)
        media = {}
        if self.vision:
            # A group's prompt and its images run once (its copies are one object): num_return_sequences.
            copies = _copies(examples)
            examples = examples[::copies]
            # A sampled image / video / audio placeholder would have no features to merge when scored: never
            # sampled (TRL suppresses the image token likewise).
            from transformers import SuppressTokensLogitsProcessor

            placeholders = [t for t in (model.image_token_id, model.video_token_id, model.audio_token_id)
                            if t is not None]
            media = {**prompt_media(examples, self.tokenizer), "num_return_sequences": copies,
                     "logits_processor": [SuppressTokensLogitsProcessor(placeholders, device=model.device)]}
        ids, mask = left_pad([ex["prompt_ids"] for ex in examples], self.pad_id)
        # TRL's sampling settings, then its generation_kwargs over them
        options = dict(max_new_tokens=a.max_completion_length, do_sample=True, temperature=a.temperature,
                       top_p=a.top_p, top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                       eos_token_id=stops, pad_token_id=self.pad_id, seed=seed)
        options.update(a.generation_kwargs or {})
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), **{**options, **media})
        completions, truncated = [], []
        for row in out[:, ids.shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            completions.append(row if end is None else row[:end + 1])  # the stop token is kept and trained, as TRL
            truncated.append(end is None)
        return completions, truncated

    def score(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
              sizes: list[int], group: int | None = None, across_ranks: bool = False) -> list[dict]:
        """Rewards -> group advantages (groups of `group` completions, default num_generations; across_ranks: over
        every rank's completions, gathered in rank order) -> micro-batches with (optional) old and reference
        log-probs."""
        a = self.args
        rollout = self.gather_rollout(self.compute_rewards(examples, completion_ids), completion_ids, truncated,
                                      across_ranks)
        self._check_unrewarded(rollout.rewards_per_func)
        advantages, rewards, std = group_advantages(rollout.rewards_per_func, self.reward_weights,
                                                    group or a.num_generations, a.scale_rewards,
                                                    a.multi_objective_aggregation)
        self._record_rollout(rollout, rewards, std)
        self.keep_completions(rollout, advantages, across_ranks)
        return self.micro_batches(examples, completion_ids, truncated, rollout.mine(advantages), sizes)

    def micro_batches(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
                      advantages: torch.Tensor, sizes: list[int]) -> list[dict]:
        """The scored completions cut into micro-batches of `sizes` completions (_micro_batch each), each counting
        len(sizes) micro-batches in its step (step_batches sets the training step's count over all ranks)."""
        batches, start = [], 0
        for n in sizes:
            part = slice(start, start + n)
            start += n
            b = self._micro_batch(examples[part], completion_ids[part], truncated[part], advantages[part])
            b["steps"] = len(sizes)  # a plain int: the loop moves only tensors to the device
            batches.append(b)
        return batches

    @torch.no_grad()  # the old and reference log-probs are constants of the loss (also when score() is called alone)
    def _micro_batch(self, examples, completion_ids, truncated, advantages) -> dict:
        prompt_ids, prompt_mask = left_pad([ex["prompt_ids"] for ex in examples], self.pad_id)
        width = max(len(c) for c in completion_ids)
        comp = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        comp_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for r, c in enumerate(completion_ids):
            comp[r, :len(c)] = torch.tensor(c)
            keep = not (self.args.mask_truncated_completions and truncated[r])
            comp_mask[r, :len(c)] = int(keep)
        input_ids = torch.cat([prompt_ids, comp], dim=1)
        attention_mask = torch.cat([prompt_mask, comp_mask], dim=1)
        b = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": comp_mask,
             "advantages": advantages.float(), "completion_positions": score_positions(comp_mask)}
        media = prompt_media(examples, self.tokenizer) if self.vision else {}
        b.update(media)
        # The log-probs stay on the device (the loop's move is then a no-op): copying them back would wait for the
        # device once per micro-batch.
        dev = self.to_device({k: b[k] for k in ("input_ids", "attention_mask", "completion_positions", *media)})
        args = (dev["input_ids"], dev["attention_mask"], width, dev["completion_positions"],
                {k: dev[k] for k in media})
        if self.keeps_old_logps:  # e.g. later iterations reuse this batch: the sampling policy's log-probs
            b["old_logps"] = self.completion_logps(*args)
        if self.reference is not None:  # at sampling time, before the policy's forward (the swap is in place)
            with self.reference.active():
                b["ref_logps"] = self.completion_logps(*args)
        return b

    @property
    def keeps_old_logps(self) -> bool:
        """Whether a micro-batch keeps the sampling policy's log-probs (num_iterations > 1, or a generation batch over
        several optimizer steps: the policy moves before some micro-batches are trained); else the ratio is 1 and the
        policy's own detached log-probs stand in for them."""
        return self.reuses_samples

    @property
    def reuses_samples(self) -> bool:
        """Whether the policy may change between sampling a completion and training on it."""
        return self.args.num_iterations > 1 or self.generation_steps > 1

    # --- evaluation, as TRL's: eval prompts sampled and scored, the loss without gradients -----------------------
    @property
    def eval_generations(self) -> int:
        """Completions sampled per eval prompt: num_generations_eval, else num_generations (TRL's rule)."""
        return self.args.num_generations_eval or self.args.num_generations

    @torch.no_grad()
    def evaluation_pass(self, dataset=None, metric_key_prefix: str = "eval") -> dict:
        """Each eval prompt sampled eval_generations times and scored as in training, per_device_eval_batch_size
        completions a batch: {"eval_loss": the mean of the batches' losses (no gradients), plus TRL's metrics of
        those rollouts (eval_reward, eval_rewards/<name>/mean, eval_completions/mean_length, ...)}, keys prefixed
        metric_key_prefix. Sampling is seeded (args.seed and the batch), so every evaluation draws alike. Raises
        ConfigError without an eval set. Fires on_prediction_step after each batch."""
        examples = self.eval_examples if dataset is None else self.prepare(dataset)
        if not examples:
            raise ConfigError("evaluate() needs an eval_dataset (given to the trainer, or to evaluate()).")
        n = self.eval_generations
        prompts = examples[::self.args.num_generations]  # prepare() repeats each prompt num_generations times
        per_batch = max(1, self.args.per_device_eval_batch_size // n)
        train_metrics, train_ratios = self._metrics, self._ratios  # the training log window, kept aside
        self._metrics, self._ratios = metric_windows()
        was_training = self.model.training
        self.model.eval()
        losses = []
        try:
            # under torchrun each rank samples every world-th batch; losses and metrics are gathered
            for i in range(per_batch * self.dist.rank, len(prompts), per_batch * self.dist.world):
                group = [ex for ex in prompts[i:i + per_batch] for _ in range(n)]
                batch = self.rollout(group, [len(group)], self.args.seed + 7_000_003 + i, n)[0]
                batch = self.to_device(batch)
                loss, _ = self.micro_batch_loss(batch, self.count_items(batch))
                losses.append(loss)
                self.callbacks.fire("on_prediction_step")
            rollouts = self.step_metrics(across_ranks=True)
        finally:
            self.model.train(was_training)
            self._metrics, self._ratios = train_metrics, train_ratios
        losses = [x for part in self.dist.gather(host_values(losses)) for x in part]
        metrics = {"loss": float(sum(losses)) / len(losses), **rollouts}
        return {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}

    # --- the loss ----------------------------------------------------------------------------------------------
    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, float]:
        """The clipped surrogate (+ beta x KL) of this micro-batch reduced by loss_type (grpo_loss.py), minus
        entropy_coef x the mean entropy when set, plus the MoE load-balancing loss's share when on (with_aux_loss);
        records TRL's metrics (entropy, clip ratios, kl when beta > 0, policy_loss / entropy_coef with an entropy
        bonus, vespo/phi_seq_mean, aux_loss)."""
        a = self.args
        mask = batch["completion_mask"]
        logps, entropies, aux = self.policy_logps(batch)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old  # one iteration: the ratio is 1 with the policy's gradient
        adv = batch["advantages"]
        keep = None
        if a.top_entropy_quantile < 1.0:
            # The policy term on the highest-entropy tokens only; the threshold over all ranks' micro-batch when the
            # ranks run their micro-batches in lockstep (training steps with as many on every rank; evaluation
            # splits its batches unevenly, so there each rank's own tokens set it).
            lockstep = self.dist.active and self.model.training and getattr(self, "_lockstep", False)
            keep = high_entropy_mask(entropies.detach(), mask, 1.0 - a.top_entropy_quantile,
                                     self._all_ranks if lockstep else None)
        policy_keep = keep
        if getattr(a, "off_policy_mask_threshold", None) is not None:  # (RLOOConfig has none)
            drift = off_policy_mask(adv, logps, old, mask, a.off_policy_mask_threshold)
            policy_keep = drift if keep is None else keep * drift
        vespo = (a.vespo_k_pos, a.vespo_lambda_pos, a.vespo_k_neg, a.vespo_lambda_neg)
        token_loss, ratio, kl = per_token_loss(logps, old, adv, self.eps_low, self.eps_high, a.beta,
                                               batch.get("ref_logps"), a.use_bias_correction_kl, mask,
                                               a.importance_sampling_level, a.loss_type, a.delta,
                                               (a.sapo_temperature_pos, a.sapo_temperature_neg), vespo, policy_keep)
        steps = int(batch["steps"])
        # (a run of several generation batches in one step: each one's own normaliser, see _split_step_batches)
        items = batch["normalizer"] if "normalizer" in batch and self.model.training else num_items
        loss = reduce_loss(token_loss, mask, a.loss_type, items, steps, a.max_completion_length)
        if self._entropy_bonus:
            loss = self._with_entropy_bonus(loss, entropies, mask if keep is None else mask * keep, steps)
        loss = self.with_aux_loss(loss, aux)
        with torch.no_grad():  # the metric sums stay on the device until step_metrics reads them
            m = mask.float()
            self._add_ratio("entropy", (entropies.detach() * m).sum(), m.sum())
            if kl is not None:
                self._add_ratio("kl", (kl * m).sum(), m.sum())
            for name, (s, n) in clip_stats(ratio, adv, mask, self.eps_low, self.eps_high, a.loss_type).items():
                self._add_ratio(name, s, n)
            if a.loss_type == "vespo":
                phi = vespo_weights(logps.detach() - old, mask, adv, *vespo)
                self._add_ratio("vespo/phi_seq_mean", phi.sum(), phi.shape[0])
        self._step_end()
        # The core logs sum(part) / num_items as the step loss: report this micro-batch's share of it (in float64,
        # as float(loss) * num_items; the core reads it once per step).
        return loss, loss.detach().to(torch.float64) * num_items

    def policy_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The policy's (log-probs, entropies) (B, n) float32 of the batch's completion tokens (completion_logps)
        and, when the MoE load-balancing loss is on (aux_weight), that forward's load-balancing loss (() tensor,
        unweighted, over the rows' real tokens: transformers' load_balancing_loss_func), else None."""
        mask = batch["completion_mask"]
        media = {k: batch[k] for k in IMAGE_KEYS if k in batch}
        aux = [] if self.aux_weight else None
        logps, entropies = self.completion_logps(batch["input_ids"], batch["attention_mask"], mask.shape[1],
                                                 batch.get("completion_positions"), media, entropy=True,
                                                 aux_out=aux)
        return logps, entropies, aux[0] if aux else None

    def with_aux_loss(self, loss: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """loss plus the policy forward's load-balancing loss `aux` (None: loss as it is) weighted by
        router_aux_loss_coef as TRL adds it (aux_loss_share); records TRL's `aux_loss` metric (the micro-batches'
        mean)."""
        if aux is None:
            return loss
        self._add_ratio("aux_loss", aux.detach().float(), 1)
        return loss + self.aux_loss_share(aux, self.aux_weight).to(loss.device, loss.dtype)

    # --- the entropy bonus (TRL 1.16's entropy_coef, use_adaptive_entropy) -----------------------------------
    @property
    def _entropy_bonus(self) -> bool:
        """Whether the loss carries an entropy bonus: a nonzero entropy_coef, or the adaptive controller (which may
        bring a zero coefficient up)."""
        return getattr(self.args, "entropy_coef", 0.0) != 0.0 or getattr(self.args, "use_adaptive_entropy", False)

    def _with_entropy_bonus(self, loss: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor,
                            steps: int) -> torch.Tensor:
        """loss - coef x the mean entropy over `mask`'s tokens (/ the step's micro-batches over all ranks in
        training, as TRL divides by gradient_accumulation_steps under DDP's averaging). Adaptive: the coefficient of
        the last step boundary, applied while the last step's mean entropy was <= entropy_target (TRL's gating).
        Records policy_loss (the loss without the bonus, at TRL's scale) and, in training, the entropy sums the
        controller reads at the step's end."""
        a, training = self.args, self.model.training
        coef = self._entropy_coef
        if a.use_adaptive_entropy and not self._last_entropy <= a.entropy_target:
            coef = 0.0
        bonus = entropy_bonus(entropies, mask) / (steps if training else 1)
        # TRL's policy_loss is a rank's loss before its division by gradient_accumulation_steps (the per-completion
        # means) or, for the token-sum types normalised by the whole batch's tokens, the rank's loss (DDP averages
        # ranks where fasttune sums them): fasttune's loss x the step's micro-batches / x ranks.
        scale = 1 if not training else self.dist.world if a.loss_type in ("dapo", "cispo", "vespo") else steps
        self._add_ratio("policy_loss", loss.detach() * scale, 1)
        if training and a.use_adaptive_entropy:
            with torch.no_grad():
                m = mask.float()
                self._window_entropy = [self._window_entropy[0] + (entropies.detach() * m).sum(),
                                        self._window_entropy[1] + m.sum()]
        return loss - coef * bonus

    def objective_state(self) -> dict:
        """The adaptive entropy controller's coefficient and last step's mean entropy (None before the first step),
        so a resumed run continues it (TRL keeps them in entropy_ctrl_state.json); {} without the controller."""
        if not getattr(self.args, "use_adaptive_entropy", False):
            return {}
        last = self._last_entropy
        return {"entropy_coef": self._entropy_coef, "last_entropy": None if math.isinf(last) else last}

    def load_objective_state(self, state: dict) -> None:
        """Restore objective_state's {"entropy_coef": float, "last_entropy": float nats or None} from a checkpoint
        (ignored without use_adaptive_entropy, or when the checkpoint has none: an older one, or a run without the
        controller)."""
        if "entropy_coef" in state and getattr(self.args, "use_adaptive_entropy", False):
            last = state["last_entropy"]
            self._entropy_coef, self._last_entropy = state["entropy_coef"], float("inf") if last is None else last

    def prepare_step(self, group: list[dict], across_ranks: bool) -> None:
        """Counts this rank's micro-batches of the optimizer step, so the entropy controller updates after the last
        (_step_end); with top_entropy_quantile under torchrun, whether every rank runs as many (then the entropy
        threshold is taken over all ranks' tokens, a collective per micro-batch)."""
        super().prepare_step(group, across_ranks)
        self._micro_left = len(group) if across_ranks else 0
        if across_ranks and self.dist.active and getattr(self.args, "top_entropy_quantile", 1.0) < 1.0:
            self._lockstep = self.dist.sum(len(group)) == len(group) * self.dist.world

    def _step_end(self):
        """After each training micro-batch: at the step's last one, with an entropy bonus, log entropy_coef and
        (adaptive) move it by entropy_coef_delta towards keeping the step's mean entropy (all ranks) at
        entropy_target."""
        if not self.model.training or getattr(self, "_micro_left", 0) <= 0:
            return
        self._micro_left -= 1
        if self._micro_left or not self._entropy_bonus:
            return
        a = self.args
        if a.use_adaptive_entropy:
            s, n = (self.dist.sum(v) for v in host_values(self._window_entropy))
            self._last_entropy = s / max(n, 1.0)
            if self._last_entropy <= a.entropy_target:
                self._entropy_coef = min(self._entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
            else:
                self._entropy_coef = max(self._entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
            self._window_entropy = [0.0, 0.0]
        self._metrics["entropy_coef"].append(self._entropy_coef)

    def _all_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values`, concatenated in rank order, on this rank's device."""
        return torch.cat([t for t in self.dist.gather(values.cpu())]).to(values.device)

    def completion_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                         positions: torch.Tensor | None = None, media: dict | None = None, entropy: bool = False,
                         aux_out: list | None = None):
        """fp32 log-probs (B, n) of the last n tokens of each row at the sampling temperature; 0 where masked
        (reference.model_token_logprobs). Positions come from the attention mask, as in generation (Qwen-VL's
        multimodal positions from the model, which reads the mask too). `positions`: score_positions of
        attention_mask[:, -n:], to select the completion tokens without a device sync. media: the rows' image
        inputs (prompt_media) on a vision-language model. entropy=True: (log-probs, entropies (B, n)) (0 where
        masked). aux_out: a list that gets the forward's MoE load-balancing loss (model_token_logprobs)."""
        return model_token_logprobs(self.model, input_ids, attention_mask, attention_mask, positions, last=n,
                                    position_ids=self.sampling_positions(attention_mask, media),
                                    temperature=self.args.temperature, media=media or None, entropy=entropy,
                                    aux_out=aux_out, output_router_logits=aux_out is not None)

    def sampling_positions(self, attention_mask: torch.Tensor, media: dict | None) -> torch.Tensor | None:
        """Position ids (B, T) int64 of left-padded rows as generation gives them (attention_mask.cumsum - 1); None
        for a Qwen-VL model's rows with images (its own 3-axis positions, the left padding skipped as generate()
        does)."""
        if media and self.model.family.mrope:
            return None
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)
