"""GRPO over the one trainer core: each optimizer step samples num_generations completions per prompt with the
KV-cache generate(), scores them with the reward functions, normalises the rewards per group into advantages, and
runs the clipped objective (optional KL to the reference = the policy as handed to the trainer, as in TRL) over
micro-batches.

The loop stays the core's (accumulation, clipping, schedule, checkpoints, logging); this class supplies the step's
micro-batches (`step_batches`, grpo_rollout.py) and the loss of one (`micro_batch_loss`). The math is in grpo_loss.py,
the reward functions' scoring in grpo_rewards.py, the entropy bonus in grpo_entropy.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fasttune.constants import MEDIA_KEYS
from fasttune.data.formats import row_label
from fasttune.data.prompts import encode_prompt
from fasttune.data.sources import load_rows, source_name
from fasttune.data.vision_prompts import (encode_vision_prompt, has_images, prompt_media, require_processor,
                                         row_images, with_image_payloads)
from fasttune.errors import ConfigError, DataError
from fasttune.train.host_reads import host_values
from fasttune.train.loop import Trainer
from fasttune.train.trl_args import load_named_model, router_aux_loss_weight
from fasttune.train.imports import import_callables
from fasttune.train.objectives.grpo_config import GRPOConfig, environment_factories, generation_layout
from fasttune.train.objectives.grpo_entropy import EntropyBonus
from fasttune.train.objectives.grpo_rollout import Rollouts
from fasttune.train.objectives.grpo_environments import Environments
from fasttune.train.objectives.grpo_tools import ToolCalls
from fasttune.train.objectives.grpo_loss import (clip_stats, high_entropy_mask, off_policy_mask, per_token_loss,
                                                 reduce_loss, vespo_weights)
from fasttune.train.objectives.grpo_rewards import NoRewardError, RewardScoring, metric_windows
from fasttune.train.objectives.reference import ReferencePolicy, model_token_logprobs
from fasttune.train.objectives.reference_sync import ReferenceSync, synced_reference
from fasttune.train.reward_models import trainer_reward_funcs
from fasttune.train.rewards import required_columns, reward_name

__all__ = ["GRPOTrainer", "GRPOConfig", "NoRewardError"]


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


class GRPOTrainer(ReferenceSync, Rollouts, EntropyBonus, RewardScoring, Trainer):
    """GRPO (Shao et al. 2024) as TRL's GRPOTrainer computes it, on rows with a `prompt`. reward_funcs: callables
    and/or built-in names (see fasttune.train.rewards), default GRPOConfig.reward_funcs. Raises ConfigError for
    args that are not a GRPOConfig, no tokenizer, a reward_weights length that does not match, completions per
    step (or per eval batch) that are not whole groups of num_generations (num_generations_eval). With beta > 0 and
    full fine-tuning the reference is a second copy of the weights (as TRL keeps a reference model). An eval_dataset
    is evaluated as TRL evaluates one (evaluation_pass). tools, environment_factory, rollout_func: TRL's agent
    rollouts (grpo_tools.py, grpo_environments.py, grpo_rollout_func.py).

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
    takes_tools = True  # TRL's tools= (grpo_tools.py); trainers that sample in one turn refuse them
    # Completions scored as sampled: at the sampling temperature, left-padded rows at generation's positions. TRL's
    # online DPO and A2PO score at temperature 1 with the model's default positions 0..T-1 (their forward passes no
    # position ids), and so do theirs here (False).
    scores_as_sampled = True

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with the reference policy (a KL term: beta > 0)."""
        return self.args.beta != 0.0

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, tokenizer=None, reward_processing_classes=None,
                 tools=None, environment_factory=None, rollout_func=None, **kwargs):
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
        if tools is None and getattr(args, "tools", None):  # (the command line's and YAML's import specs)
            tools = import_callables(args.tools, "tools")
        if environment_factory is None and getattr(args, "environment_factory", None):
            environment_factory = environment_factories(args.environment_factory)
        self.environments = self._environments(environment_factory, tools, kwargs)
        env_rewards = self.environments.reward_funcs if self.environments is not None else []
        funcs = reward_funcs if given else args.reward_funcs
        # (an environment with get_reward may be the only reward source, as in TRL)
        self.reward_funcs = trainer_reward_funcs(
            funcs, reward_processing_classes, "reward_funcs" if given else f"{config}.reward_funcs",
            args.max_completion_length, args.per_device_train_batch_size, model, args.chat_template_kwargs) \
            if self.uses_rewards and (funcs or not env_rewards) else []
        self.reward_names = [reward_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(weights)} values but there are {len(self.reward_funcs)} "
                              f"reward functions ({', '.join(self.reward_names)}); give one weight per function.")
        # environments' get_reward: one more reward function each, weight 1 (TRL's)
        self.reward_funcs += env_rewards
        self.reward_names += [reward_name(f) for f in env_rewards]
        self.reward_weights = torch.tensor(list(weights) + [1.0] * len(env_rewards), dtype=torch.float32)
        if self.environments is not None and train_dataset is None:
            train_dataset = self._placeholder_rows(args)
        if args.chat_template:
            from fasttune.data.templates import resolve_chat_template

            tok.chat_template = resolve_chat_template(args.chat_template)  # kept on the tokenizer saved later
        self.tool_calls = self._tool_calls(tools if self.environments is None else self.environments.all_tools, tok,
                                           args, kwargs)
        self.rollout_func = rollout_func if self._builds("rollout_func", rollout_func, kwargs) else None
        if self.rollout_func is not None and self.tool_calls is not None:
            raise ConfigError(f"{name}: rollout_func with tools or environment_factory is not implemented (the tool "
                              f"loop after a custom rollout); run the tools inside your rollout_func, or leave it out.")
        super().__init__(model, tok, train_dataset, eval_dataset, args, config_cls=self.config_cls, **kwargs)
        a = self.args
        per_eval = a.per_device_eval_batch_size * self.dist.world
        if self.eval_examples is not None and per_eval % self.eval_generations:
            raise ConfigError(f"Each evaluation batch samples per_device_eval_batch_size x ranks = {per_eval} "
                              f"completions, which must hold whole groups of num_generations_eval="
                              f"{self.eval_generations}. Make it a multiple (as in TRL).")
        completions_per_step = self.micro_batch_rows * a.gradient_accumulation_steps * self.dist.world
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
            self.reference = synced_reference(self.model, a)
        self.eps_low = a.epsilon
        self.eps_high = a.epsilon_high if a.epsilon_high is not None else a.epsilon
        self.start_entropy_control(a)
        self.start_metrics()

    def _builds(self, name: str, value, kwargs: dict) -> bool:
        """Whether to build TRL's agent setting `name` (tools, environment_factory) given as `value`: not when unset
        (None or empty); a trainer that samples in one turn (takes_tools False) hands it to the core's check, which
        refuses it by name. Raises ConfigError on a vision-language model."""
        if not value:
            return False
        if not self.takes_tools:
            kwargs[name] = value
            return False
        if self.vision:
            raise ConfigError(f"{type(self).__name__}: {name} with a vision-language model is not implemented (tool "
                              f"results and observations with images); use a text model.")
        return True

    def _environments(self, factory, tools, kwargs: dict) -> Environments | None:
        """TRL's environment_factory (grpo_environments.py), when this trainer builds it."""
        if not self._builds("environment_factory", factory, kwargs):
            return None
        return Environments(factory, list(tools or []), type(self).__name__)

    def _placeholder_rows(self, args) -> list[dict]:
        """TRL's stand-in dataset when an environment owns the data: one generation batch of prompts that are one empty
        user message (reset() supplies the task). Raises ConfigError with several environments or without
        max_steps."""
        name = type(self).__name__
        if self.environments.multi:
            raise ConfigError(f"{name}: several environments need a train_dataset with an 'environment' column that "
                              f"routes each row; give one, or a single environment factory.")
        if args.max_steps <= 0:
            raise ConfigError(f"{name}: without a train_dataset (the environment supplies the prompts) set max_steps "
                              f"to the number of steps to train.")
        batch = args.generation_batch_size or args.per_device_train_batch_size * (
            args.steps_per_generation or args.gradient_accumulation_steps)
        return [{"prompt": [{"role": "user", "content": ""}]}] * max(1, batch // args.num_generations)

    def _tool_calls(self, tools, tok, args, kwargs: dict) -> ToolCalls | None:
        """TRL's tools (grpo_tools.py), when this trainer builds them."""
        if not self._builds("tools", tools, kwargs):
            return None
        return ToolCalls(tools, tok, args.max_tool_calling_iterations, args.chat_template_kwargs, type(self).__name__)

    # --- data --------------------------------------------------------------------------------------------------
    def prepare(self, dataset) -> list[dict]:
        """Rows with `prompt` (a string or a message list, encoded by data.prompts.encode_prompt; on a
        vision-language model a message list, with its images, by data.vision_prompts.encode_vision_prompt) and any
        columns the reward functions read; a text prompt longer than max_prompt_length keeps its last tokens (older
        TRL's rule; reward functions still get the whole prompt). Returns each prompt num_generations times in a row
        (the groups), so the core's batch counting holds. Raises DataError naming the row for a bad prompt, a missing
        reward column, a prompt too long for max_seq_length (unless drop_long), a prompt with images longer than
        max_prompt_length, or images on a model that reads text only."""
        a, tok = self.args, self.tokenizer
        rows, name = load_rows(dataset), source_name(dataset)
        base_dir = Path(dataset).expanduser().resolve().parent if isinstance(dataset, (str, os.PathLike)) else None
        model_limit = self.model.max_seq_length or a.max_seq_length
        limit = min(a.max_seq_length, model_limit) - a.max_completion_length
        if limit < 1:
            raise ConfigError(f"max_completion_length={a.max_completion_length} leaves no room for the prompt within "
                              f"max_seq_length={min(a.max_seq_length, model_limit)}; lower max_completion_length.")
        # (a rollout_func may supply columns itself, as extra fields: not checked here)
        needed = sorted({c for f in self.reward_funcs for c in required_columns(f)}) \
            if getattr(self, "rollout_func", None) is None else []
        examples = []
        for i, row in enumerate(rows):
            where = row_label(i, name)
            prompt, sources, videos = row.get("prompt"), [], []
            env = None
            if self.environments is not None:  # (a missing prompt is an empty user message: reset() supplies it)
                env = self.environments.name_of(row, where)
                prompt = prompt if prompt is not None else [{"role": "user", "content": ""}]
            if has_images(row) and not self.vision:
                raise DataError(f"{where}: the row has images, but {type(self.model).__name__} reads text only. Load "
                                f"a vision-language model with FastVisionModel.from_pretrained, or drop the images.")
            if self.vision and (isinstance(prompt, list) or has_images(row)):
                laid_out = encode_vision_prompt(prompt, row_images(row), tok, where, base_dir, row.get("videos"),
                                                **(a.chat_template_kwargs or {}))
                ids, sources, videos = laid_out.ids, laid_out.sources, laid_out.videos
                prompt = with_image_payloads(laid_out)  # what TRL's reward functions get
            elif self.tool_calls is not None:  # rendered with the tools' schemas (and TRL's training template)
                if not isinstance(prompt, list):
                    raise DataError(f"{where}: field 'prompt' is a string, but tools need conversational prompts "
                                    f"(a list of messages) to render the tools and parse the calls. Give prompts as "
                                    f"[{{'role': 'user', 'content': ...}}].")
                schemas = self.environments.tools[env] if self.environments is not None else None
                prompt, ids = encode_prompt(prompt, tok, where, **self.tool_calls.prompt_kwargs(schemas))
            else:
                prompt, ids = encode_prompt(prompt, tok, where, **(a.chat_template_kwargs or {}))
            cut = a.max_prompt_length
            if cut is not None and len(ids) > cut:  # older TRL's left truncation of the prompt
                if sources or videos:
                    raise DataError(f"{where}: the prompt is {len(ids)} tokens with its images / videos, more than "
                                    f"max_prompt_length={cut}, and cutting it would cut them. Raise "
                                    f"max_prompt_length (or leave it None).")
                if self.tool_calls is not None:  # (the tools' schemas open the prompt: a cut would drop them)
                    raise DataError(f"{where}: the prompt is {len(ids)} tokens with the tools' schemas, more than "
                                    f"max_prompt_length={cut}, and cutting it would cut the schemas. Raise "
                                    f"max_prompt_length (or leave it None, as TRL 1.x has no such cut).")
                ids = ids[-cut:]
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
            example = {"prompt": prompt, "prompt_ids": ids, "input_ids": ids, "columns": columns,
                       "images": sources, "videos": videos}
            if self.environments is not None:
                example.update(environment=env, row=self.environments.reset_kwargs(row), where=where)
            if self.extend_example(example, row, where, limit):
                examples.append(example)
        if not examples:
            raise DataError("No usable prompts: every row was longer than the prompt limit and drop_long=True.")
        return [ex for ex in examples for _ in range(a.num_generations)]

    def extend_example(self, example: dict, row: dict, where: str, limit: int) -> bool:
        """What an objective adds to a prepared example from its row (prepare; `where` names the row, `limit` is the
        most prompt tokens that leave room for max_completion_length); False drops the row (drop_long). GRPO adds
        nothing."""
        return True

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
        try:
            # under torchrun each rank samples every world-th batch; losses and metrics are gathered (FSDP: with the
            # model gathered on every rank for the whole pass, whose ranks run different numbers of batches)
            with self.gathered(*self.evaluation_companions()):
                losses = self._evaluation_batches(prompts, per_batch, n)
            rollouts = self.step_metrics(across_ranks=True)
        finally:
            self.model.train(was_training)
            self._metrics, self._ratios = train_metrics, train_ratios
        losses = [x for part in self.dist.gather(host_values(losses)) for x in part]
        metrics = {"loss": float(sum(losses)) / len(losses), **rollouts}
        return {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}

    def evaluation_companions(self) -> tuple:
        """The models evaluation_pass gathers whole on every rank under FSDP beside the policy (its ranks run
        different numbers of batches, so sharded passes could not meet): none here; a distillation teacher."""
        return ()

    def _evaluation_batches(self, prompts: list[dict], per_batch: int, n: int) -> list:
        """This rank's share of evaluation_pass's batches (every world-th): their losses (device scalars)."""
        losses = []
        for i in range(per_batch * self.dist.rank, len(prompts), per_batch * self.dist.world):
            group = [ex for ex in prompts[i:i + per_batch] for _ in range(n)]
            batch = self.rollout(group, [len(group)], self.args.seed + 7_000_003 + i, n)[0]
            batch = self.to_device(batch)
            loss, _ = self.micro_batch_loss(batch, self.count_items(batch))
            losses.append(loss)
            self.callbacks.fire("on_prediction_step")
        return losses

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

    def filler_loss(self, num_items: int) -> torch.Tensor:
        """The loop's zero-weight pass for a rank without a micro-batch in a short step under FSDP (ObjectiveHooks'):
        a training example holds a prompt, not a scored completion, so the pass is one policy forward over the first
        prompt (with its images) and its last token's log-prob times 0. micro_batch_loss runs one forward too, and no
        other collective in such a step (its ranks are not in lockstep)."""
        ids, mask, media = self.filler_inputs()
        return self.completion_logps(ids, mask, 1, None, media).sum() * 0.0

    def filler_inputs(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(input_ids (1, P), attention_mask, media) of the first training prompt on the device: filler_loss's pass."""
        example = self.train_examples[0]
        ids = torch.tensor([example["prompt_ids"]])
        media = prompt_media([example], self.tokenizer) if self.vision else {}
        dev = self.to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), **media})
        return dev.pop("input_ids"), dev.pop("attention_mask"), dev

    def policy_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The policy's (log-probs, entropies) (B, n) float32 of the batch's completion tokens (completion_logps)
        and, when the MoE load-balancing loss is on (aux_weight), that forward's load-balancing loss (() tensor,
        unweighted, over the rows' real tokens: transformers' load_balancing_loss_func), else None."""
        mask = batch["completion_mask"]
        media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
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

    def _all_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values`, concatenated in rank order, on this rank's device."""
        return torch.cat([t for t in self.dist.gather(values.cpu())]).to(values.device)

    def completion_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                         positions: torch.Tensor | None = None, media: dict | None = None, entropy: bool = False,
                         aux_out: list | None = None):
        """fp32 log-probs (B, n) of the last n tokens of each row at the sampling temperature; 0 where masked
        (reference.model_token_logprobs). Positions come from the attention mask, as in generation (Qwen-VL's
        multimodal positions from the model, which reads the mask too); with scores_as_sampled False, temperature 1
        and the model's default positions instead. `positions`: score_positions of
        attention_mask[:, -n:], to select the completion tokens without a device sync. media: the rows' image
        inputs (prompt_media) on a vision-language model. entropy=True: (log-probs, entropies (B, n)) (0 where
        masked). aux_out: a list that gets the forward's MoE load-balancing loss (model_token_logprobs)."""
        as_sampled = self.scores_as_sampled
        return model_token_logprobs(self.model, input_ids, attention_mask, attention_mask, positions, last=n,
                                    position_ids=self.sampling_positions(attention_mask, media) if as_sampled else None,
                                    temperature=self.args.temperature if as_sampled else 1.0, media=media or None,
                                    entropy=entropy, aux_out=aux_out, output_router_logits=aux_out is not None)

    def sampling_positions(self, attention_mask: torch.Tensor, media: dict | None) -> torch.Tensor | None:
        """Position ids (B, T) int64 of left-padded rows as generation gives them (attention_mask.cumsum - 1); None
        for a Qwen-VL model's rows with images (its own 3-axis positions, the left padding skipped as generate()
        does)."""
        if media and self.model.family.mrope:
            return None
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)
