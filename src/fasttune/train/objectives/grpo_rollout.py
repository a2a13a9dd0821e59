"""GRPO's sampling and scoring, once per optimizer step, as a mixin of GRPOTrainer (grpo.py): the step's prompts
sampled with the KV-cache generate() (each rank its own share under torchrun), scored by the reward functions
(grpo_rewards.py), the rewards normalised per group into advantages, and the completions cut into micro-batches,
which one generation batch may feed over several optimizer steps (steps_per_generation) and iterations
(num_iterations)."""
from __future__ import annotations

from contextlib import ExitStack

import torch

from fasttune.data.vision_prompts import prompt_media
from fasttune.generate import left_pad, stop_token_ids
from fasttune.train.objectives.grpo_environments import reset_rollouts
from fasttune.train.objectives.grpo_loss import group_advantages
from fasttune.train.objectives.grpo_rollout_func import custom_rollout
from fasttune.train.objectives.grpo_tools import ToolTurns, tool_turns
from fasttune.train.fsdp import all_unsharded, is_sharded
from fasttune.train.objectives.reference import score_positions

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


class Rollouts:
    """Needs the trainer's args, model, dist, tokenizer, pad_id, vision, train_examples and the reward / metric
    methods of grpo_rewards.RewardScoring (grpo.py's GRPOTrainer)."""

    _decoded_media: dict | None = None  # a rollout's decoded images / videos by source (set during rollout only)
    _turns: ToolTurns | None = None  # a rollout's completions after the tool loop (set during rollout only)
    _rollout_envs: list | None = None  # a rollout's environment instances, one per completion (during rollout only)

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
        examples are this rank's share of a step whose groups may span ranks (rewards gathered, see score). A
        prompt's images and videos are decoded once for both sampling and scoring (kept for this rollout only)."""
        self._decoded_media = {}
        with self.gathered():  # (FSDP)
            return self._rollout(examples, sizes, seed, group, across_ranks)

    def gathered(self, *others) -> ExitStack:
        """Under FSDP, a context in which the policy (and `others`, e.g. a distillation teacher; None skipped) is
        gathered whole on every rank (train/fsdp.py's unsharded) and a copied reference's weights too
        (ReferencePolicy.gathered), so that sampling and the reference passes inside need no collectives and each
        rank runs as many as its own work needs. Entering and leaving are collectives; nothing without FSDP."""
        stack = ExitStack()
        reference = getattr(self, "reference", None)
        if reference is not None and is_sharded(self.model):
            stack.enter_context(reference.gathered())  # (before unsharded: the copy is laid out like the shards)
        stack.enter_context(all_unsharded(self.model, *others))
        return stack

    def _rollout(self, examples: list[dict], sizes: list[int], seed: int, group: int | None,
                 across_ranks: bool) -> list[dict]:
        """rollout's work (see there)."""
        try:
            row_tools = None
            if getattr(self, "environments", None) is not None and examples:  # reset (grpo_environments.py)
                examples, self._rollout_envs, row_tools = reset_rollouts(self, examples)
            if getattr(self, "rollout_func", None) is not None and examples:  # the user's (grpo_rollout_func.py)
                examples, completion_ids, self._turns = custom_rollout(self, examples)
            else:
                completion_ids, truncated = self.sample(examples, seed) if examples else ([], [])
            if getattr(self, "tool_calls", None) is not None and examples:  # TRL's tool loop (grpo_tools.py)
                self._turns = tool_turns(self, examples, completion_ids, seed, row_tools)
                completion_ids = self._turns.completion_ids
            if self._turns is not None:  # completions built from turns: truncated unless they end with a stop (TRL's)
                stops = set(stop_token_ids(self.tokenizer, self.model))
                truncated = [not c or c[-1] not in stops for c in completion_ids]
            return self.score(examples, completion_ids, truncated, sizes, group, across_ranks)
        finally:
            self._decoded_media = self._turns = self._rollout_envs = None

    def sample(self, examples: list[dict], seed: int, model=None,
               max_new_tokens: int | None = None) -> tuple[list[list[int]], list[bool]]:
        """One completion per example from model.generate (temperature, top_p, top_k; seeded; `model`: the policy
        unless given, e.g. GKD's teacher; at most max_new_tokens, default max_completion_length): (token ids up to and
        including the first stop token, whether each hit the length without one)."""
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
            media = {**prompt_media(examples, self.tokenizer, self._decoded_media),
                     "num_return_sequences": copies,
                     "logits_processor": [SuppressTokensLogitsProcessor(placeholders, device=model.device)]}
        ids, mask = left_pad([ex["prompt_ids"] for ex in examples], self.pad_id)
        # TRL's sampling settings, then its generation_kwargs over them
        options = dict(max_new_tokens=max_new_tokens or a.max_completion_length, do_sample=True,
                       temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                       repetition_penalty=a.repetition_penalty, eos_token_id=stops, pad_token_id=self.pad_id, seed=seed)
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
        if getattr(self, "tool_calls", None) is not None:
            self._record_tools(len(rollout.lengths), across_ranks)
        self.keep_completions(rollout, advantages, across_ranks)
        return self.micro_batches(examples, completion_ids, truncated, rollout.mine(advantages), sizes)

    def _record_tools(self, completions: int, across_ranks: bool):
        """TRL's tools/call_frequency (tool calls per completion) and tools/failure_frequency (failed calls per call,
        0 without calls) of the rollout; across_ranks: summed over every rank (each calls it once per step)."""
        turns = self._turns
        calls, failures = (turns.calls, turns.failures) if turns is not None else (0, 0)
        if across_ranks and self.dist.active:
            calls, failures = self.dist.sum(calls), self.dist.sum(failures)
        self._metrics["tools/call_frequency"].append(calls / max(completions, 1))
        self._metrics["tools/failure_frequency"].append(failures / calls if calls else 0.0)

    def micro_batches(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
                      advantages: torch.Tensor, sizes: list[int]) -> list[dict]:
        """The scored completions cut into micro-batches of `sizes` completions (_micro_batch each), each counting
        len(sizes) micro-batches in its step (step_batches sets the training step's count over all ranks)."""
        batches, start = [], 0
        for n in sizes:
            part = slice(start, start + n)
            start += n
            # (with tools, each row's tool mask: the tool results' tokens are context, not trained)
            masks = {} if self._turns is None else {"tool_masks": self._turns.tool_masks[part]}
            b = self._micro_batch(examples[part], completion_ids[part], truncated[part], advantages[part], **masks)
            b["steps"] = len(sizes)  # a plain int: the loop moves only tensors to the device
            batches.append(b)
        return batches

    @torch.no_grad()  # the old and reference log-probs are constants of the loss (also when score() is called alone)
    def _micro_batch(self, examples, completion_ids, truncated, advantages, tool_masks=None) -> dict:
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
        loss_mask = comp_mask
        if tool_masks is not None:  # attention sees the tool results; the loss and token counts skip them (TRL's)
            loss_mask = comp_mask.clone()
            for r, m in enumerate(tool_masks):
                loss_mask[r, :len(m)] *= torch.tensor(m, dtype=loss_mask.dtype)
        b = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": loss_mask,
             "advantages": advantages.float(), "completion_positions": score_positions(comp_mask)}
        media = prompt_media(examples, self.tokenizer, self._decoded_media) if self.vision else {}
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
