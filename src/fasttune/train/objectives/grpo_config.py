"""GRPOConfig and RLOOConfig: TrainingConfig's fields plus the online objectives' (OnlineRLConfig: sampling, reward
functions, clipping, reference) and each one's own, named as in TRL's GRPOConfig / RLOOConfig (each also a CLI flag
and YAML key).

As in TRL, per_device_train_batch_size counts completions: each optimizer step samples
per_device_train_batch_size x gradient_accumulation_steps x ranks completions, num_generations per prompt;
generation_layout reads steps_per_generation / generation_batch_size against that.
"""
from __future__ import annotations

import json
import warnings

from dataclasses import dataclass

from fasttune.errors import ConfigError
from fasttune.train.config import TrainingConfig
from fasttune.train.objectives.grpo_loss import AGGREGATIONS, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS
from fasttune.train.objectives.reference_sync import check_sync_settings


@dataclass
class OnlineRLConfig(TrainingConfig):
    """The fields GRPO and RLOO share. Raises ConfigError for an out-of-range field (num_generations < 2,
    temperature <= 0, top_p outside (0, 1], ...), packing=True, or a reward function name that does not resolve.
    reward_weights may be given as "1,0.5" (the CLI's form)."""

    min_generations = 2  # (a class setting, not a field: GRPO and RLOO compare completions within a group)
    num_generations: int = 8  # completions sampled per prompt (the group)
    num_generations_eval: int | None = None  # per eval prompt; None: num_generations (TRL's)
    max_completion_length: int = 256
    # older TRL's (the peer's GRPO notebooks pass it; TRL 1.x dropped it): a text prompt keeps its last
    # max_prompt_length tokens; None: prompts are not cut
    max_prompt_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None  # TRL's: tokens below min_p x the top token's probability are not sampled
    repetition_penalty: float = 1.0  # TRL's: > 1 discourages tokens already in the prompt or completion
    generation_kwargs: dict | None = None  # TRL's: more generate() arguments, over the ones above (JSON in a flag)
    chat_template_kwargs: dict | None = None  # TRL's: chat-template variables for prompts and reward models, e.g.
    # {"enable_thinking": false} (a JSON string in a flag)
    disable_dropout: bool = False  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0 (TRL's default here)
    cast_lm_head_to_fp32: bool = False  # TRL's (ScaleRL): logits and log-probs from the head's product in fp32
    beta: float = 0.0  # KL to the reference (the policy as handed to the trainer); 0 = no KL, no reference
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (DAPO suggests 0.28)
    num_iterations: int = 1  # optimizer steps per generated batch (mu in the GRPO paper)
    reward_funcs: str | list | None = None  # built-in names, e.g. ["exact_match", "regex:^Answer: \\d+$", "length",
    # "model:./my-reward-model"]
    reward_weights: list | None = None  # one weight per reward function (default 1.0 each)
    mask_truncated_completions: bool = False  # completions that hit max_completion_length get no loss
    max_unrewarded_steps: int = 5  # steps in a row where no reward function scored any completion before stopping
    # TRL's generation batch, by default one per optimizer step (steps_per_generation = gradient_accumulation_steps);
    # a multiple feeds several steps, a divisor cuts a step into several (checked by the trainer, which knows the ranks)
    steps_per_generation: int | None = None
    generation_batch_size: int | None = None
    # TRL's: each training log entry prints the latest step's completions table and writes it to
    # output_dir/completions/completions_<step>.parquet (train/objectives/completions_log.py)
    log_completions: bool = False
    num_completions_to_print: int | None = None  # rows printed (a random sample); None: all
    log_unique_prompts: bool = False  # one printed row per distinct prompt

    def __post_init__(self):
        if isinstance(self.reward_weights, str):  # from a CLI flag: "1,0.5"
            try:
                self.reward_weights = [float(w) for w in self.reward_weights.split(",") if w.strip()]
            except ValueError:
                raise ConfigError(f"reward_weights='{self.reward_weights}' is invalid: give numbers, e.g. 1,0.5.") \
                    from None
        super().__post_init__()
        for name in ("num_generations", "max_completion_length", "num_iterations", "max_unrewarded_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid: it must be a whole number >= 1.")
        if self.max_prompt_length is not None and (not isinstance(self.max_prompt_length, int)
                                                   or isinstance(self.max_prompt_length, bool)
                                                   or self.max_prompt_length < 1):
            raise ConfigError(f"max_prompt_length={self.max_prompt_length!r} is invalid: a whole number of tokens "
                              f">= 1, or None to keep whole prompts.")
        if self.num_generations_eval is not None and (not isinstance(self.num_generations_eval, int)
                                                      or isinstance(self.num_generations_eval, bool)
                                                      or self.num_generations_eval < 1):
            raise ConfigError(f"num_generations_eval={self.num_generations_eval!r} is invalid: a whole number >= 1, "
                              f"or None for num_generations.")
        if self.num_generations < self.min_generations:
            raise ConfigError(f"num_generations={self.num_generations} is invalid: GRPO compares completions within "
                              f"a group, so sample at least 2 per prompt.")
        for name in ("generation_kwargs", "chat_template_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):  # from a CLI flag or YAML string
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{name}={value!r} is not valid JSON ({e}); give an object, e.g. "
                                      f"'{{\"enable_thinking\": false}}'.") from None
                setattr(self, name, value)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{name}={value!r} is invalid: give a dict of keyword arguments (or None).")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p={self.min_p} is invalid: use a value in [0, 1], or None to turn it off.")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} is invalid: use a value > 0 (1 turns it "
                              f"off).")
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise ConfigError("steps_per_generation and generation_batch_size give the same setting; give one (as "
                              "TRL requires).")
        if self.num_completions_to_print is not None and (
                not isinstance(self.num_completions_to_print, int) or self.num_completions_to_print < 1):
            raise ConfigError(f"num_completions_to_print={self.num_completions_to_print!r} is invalid: a whole number "
                              f">= 1, or None to print every completion of the step.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: GRPO samples, so use a value > 0 "
                              f"(1.0 is TRL's default).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} is invalid: use a value in (0, 1]; 1 turns it off.")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is invalid: use 0 (off) or a number of tokens.")
        for name in ("beta", "epsilon"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: it must be >= 0.")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high={self.epsilon_high} is invalid: it must be >= 0 (or None for epsilon).")
        if self.packing:
            raise ConfigError("packing=True does not apply to GRPO or RLOO (completions are sampled per step); set "
                              "it False.")
        if self.group_by_length:
            raise ConfigError(f"group_by_length=True does not apply to {type(self).__name__}: its rows are sampled "
                              f"per step (their lengths are not known in advance); leave it False.")
        if self.reward_weights is not None:
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.reward_weights):
                raise ConfigError(f"reward_weights={self.reward_weights!r} is invalid: give one number per reward "
                                  f"function.")
            self.reward_weights = [float(w) for w in self.reward_weights]
        if self.reward_funcs is not None:  # names fail here (CLI/YAML); callables are checked by the trainer
            from fasttune.train.rewards import resolve_reward_funcs

            resolve_reward_funcs(self.reward_funcs, self.max_completion_length)


@dataclass
class GRPOConfig(OnlineRLConfig):
    """OnlineRLConfig plus GRPO's loss settings. Raises ConfigError as OnlineRLConfig, for an unknown loss_type,
    scale_rewards or multi_objective_aggregation, and for the sync settings that reference_sync.check_sync_settings
    refuses (sync_ref_model with beta=0 too)."""

    loss_type: str = "dapo"  # dapo | grpo | bnpo | dr_grpo (TRL's names; dapo is TRL 1.16's default)
    scale_rewards: str = "group"  # group | batch | none (true/false mean group/none, as in TRL)
    multi_objective_aggregation: str = "sum_then_normalize"  # or "normalize_then_sum" (GDPO): see group_advantages
    use_bias_correction_kl: bool = True  # KL term times the (differentiable) ratio, as TRL 1.16 does by default
    importance_sampling_level: str = "token"  # "sequence": GSPO's one ratio per completion (TRL's setting)
    delta: float | None = None  # INTELLECT-2's two-sided clipping: the unclipped ratio capped at delta (> 1 + epsilon)
    sapo_temperature_pos: float = 1.0  # loss_type="sapo": the gate's temperature where the advantage is positive
    sapo_temperature_neg: float = 1.05  # ... and where it is not
    vespo_k_pos: float = 2.0  # loss_type="vespo": the gamma weight's power where the advantage is >= 0
    vespo_lambda_pos: float = 3.0  # ... and its decay there
    vespo_k_neg: float = 3.0  # ... the power where the advantage is negative
    vespo_lambda_neg: float = 2.0  # ... and the decay there
    off_policy_mask_threshold: float | None = None  # DeepSeek-V3.2's delta: drop negative-advantage completions whose
    # mean KL(sampling policy || policy) exceeds it from the policy term (TRL's off-policy sequence masking)
    top_entropy_quantile: float = 1.0  # the policy term on the top fraction of completion tokens by entropy (1: all)
    entropy_coef: float = 0.0  # weight of the mean-entropy bonus taken off the loss (adaptive: its start value)
    use_adaptive_entropy: bool = False  # Skywork-OR1's controller: entropy_coef moves by entropy_coef_delta a step
    entropy_coef_min: float = 0.0  # adaptive: the coefficient's bounds and step
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2  # adaptive: the bonus applies while the step's mean entropy (nats) is <= this
    # TRL's MoE load-balancing loss weight on the policy's forward; None: the model config's (so it is on for MoE
    # models, as in TRL 1.16); 0.0: off
    router_aux_loss_coef: float | None = None
    # TRL's: with tools=, the most tool-calling turns a completion gets (grpo_tools.py); None: until a turn calls no
    # tool or max_completion_length is reached
    max_tool_calling_iterations: int | None = None
    # the command line's / YAML's way to the trainer's tools= and environment_factory= (train/imports.py specs):
    # "pkg.module.func,tools.py:other"; an environment "pkg.module.EnvClass", or "name=spec,name2=spec2" to route
    # rows by their `environment` column
    tools: str | list | None = None
    environment_factory: str | None = None
    # TR-DPO (reference_sync.py): every ref_model_sync_steps optimizer steps, ref <- alpha x policy + (1 - alpha) x ref
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        super().__post_init__()
        check_sync_settings(self, "beta=0 takes no reference passes (as TRL refuses)" if self.beta == 0 else None)
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type='{self.loss_type}' is not supported; use one of {LOSS_TYPES}.")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ConfigError(f"importance_sampling_level={self.importance_sampling_level!r} is not supported; use "
                              f"one of {IMPORTANCE_SAMPLING_LEVELS}.")
        if self.delta is not None and self.delta <= 1:
            raise ConfigError(f"delta={self.delta} is invalid: the cap on the ratio must be > 1 (INTELLECT-2 uses 4; "
                              f"above 1 + epsilon_high), or None to turn it off.")
        if self.tools:  # import specs fail here (CLI / YAML), not after the model has loaded
            from fasttune.train.imports import import_callables

            import_callables(self.tools, "tools")
        if self.environment_factory:
            environment_factories(self.environment_factory)
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 0:
            raise ConfigError(f"max_tool_calling_iterations={self.max_tool_calling_iterations} is invalid: it counts "
                              f"tool-calling turns (0 runs no tool), or None for no limit.")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ConfigError("sapo_temperature_pos and sapo_temperature_neg must be > 0.")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile={self.top_entropy_quantile} is invalid: it is the fraction of "
                              f"completion tokens (by entropy) the policy loss keeps, in [0, 1] (1 keeps all; the "
                              f"paper uses 0.2).")
        if self.use_adaptive_entropy and not self.entropy_coef_min <= self.entropy_coef_max:
            raise ConfigError(f"entropy_coef_min={self.entropy_coef_min} must be <= entropy_coef_max="
                              f"{self.entropy_coef_max}.")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            warnings.warn("loss_type='vespo' computes its sequence-level weights itself; importance_sampling_level "
                          "should be 'token' (as TRL warns).", UserWarning, stacklevel=3)
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            warnings.warn("loss_type='luspo' mirrors its paper with importance_sampling_level='sequence' (as TRL "
                          "warns).", UserWarning, stacklevel=3)
        if self.importance_sampling_level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            warnings.warn(f"importance_sampling_level='sequence' with loss_type='{self.loss_type}' sums per-token "
                          f"terms, which weights each completion by its length; GSPO's own setup is "
                          f"loss_type='grpo' (as TRL warns).", UserWarning, stacklevel=3)
        if self.multi_objective_aggregation not in AGGREGATIONS:
            raise ConfigError(f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not supported; use "
                              f"one of {AGGREGATIONS}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"scale_rewards='{self.scale_rewards}' is invalid; use one of {SCALE_REWARDS}.")


@dataclass
class RLOOConfig(OnlineRLConfig):
    """OnlineRLConfig with TRL 1.16 RLOOConfig's defaults (num_generations 2, beta 0.05) plus its own fields.
    Raises ConfigError as OnlineRLConfig, for a reward_clip_range that is not two numbers, low <= high, and as
    GRPOConfig for the sync settings. The CLI's form of reward_clip_range is "low,high"."""

    num_generations: int = 2
    beta: float = 0.05  # weight of the KL penalty (sampling policy - reference log-ratio) taken off the rewards
    normalize_advantages: bool = False  # advantages scaled to mean 0, std 1 over the batch
    reward_clip_range: tuple | list | str | None = None  # (low, high): rewards clamped before the KL penalty
    router_aux_loss_coef: float | None = None  # as GRPOConfig's (TRL's MoE load-balancing loss weight)
    # TR-DPO (reference_sync.py): every ref_model_sync_steps optimizer steps, ref <- alpha x policy + (1 - alpha) x ref
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self):
        super().__post_init__()
        check_sync_settings(self, "beta=0 takes no reference passes (as TRL refuses)" if self.beta == 0 else None)
        clip = self.reward_clip_range
        if isinstance(clip, str):
            clip = [part for part in clip.split(",") if part.strip()]
        if clip is not None:
            try:
                low, high = (float(v) for v in clip)
            except (TypeError, ValueError):
                raise ConfigError(f"reward_clip_range={self.reward_clip_range!r} is invalid: give two numbers (low, "
                                  f"high), e.g. -1,1.") from None
            if low > high:
                raise ConfigError(f"reward_clip_range={self.reward_clip_range!r} is invalid: low must be <= high.")
            self.reward_clip_range = (low, high)


def generation_layout(a, world: int) -> tuple[int, int]:
    """(optimizer steps one generation batch feeds, generation batches one optimizer step holds) for TRL's
    steps_per_generation (or generation_batch_size, in completions over all ranks); (1, 1) by default. A generation
    batch of k x gradient_accumulation_steps micro-batches a rank feeds k steps; one of gradient_accumulation_steps / k
    micro-batches is one of k in each step (with num_iterations=1, and whole groups of num_generations in each
    rank's share). Raises ConfigError for a generation_batch_size that is not whole per-device batches, a generation
    that is neither a multiple nor a divisor of the step's micro-batches, or the cases above."""
    ga, per_pass = a.gradient_accumulation_steps, a.per_device_train_batch_size * world
    spg = a.steps_per_generation
    if a.generation_batch_size is not None:
        if a.generation_batch_size % per_pass:
            raise ConfigError(f"generation_batch_size={a.generation_batch_size} must be a multiple of "
                              f"per_device_train_batch_size x ranks = {per_pass} (as TRL requires).")
        spg = a.generation_batch_size // per_pass
    if spg is None:
        return 1, 1
    given = f"steps_per_generation={a.steps_per_generation}" if a.steps_per_generation is not None else \
        f"generation_batch_size={a.generation_batch_size} ({spg} micro-batches a rank)"
    if spg >= 1 and spg % ga == 0:
        return spg // ga, 1
    if spg < 1 or ga % spg:
        raise ConfigError(f"{given} is not supported: a generation batch must feed whole optimizer steps or a whole "
                          f"share of one, so make it a multiple or a divisor of gradient_accumulation_steps={ga} "
                          f"micro-batches a rank (generation_batch_size a multiple of {per_pass * ga}, or {per_pass} "
                          f"x a divisor of {ga}); TRL's default is one generation batch per step.")
    if a.num_iterations > 1:
        raise ConfigError(f"{given} below gradient_accumulation_steps={ga} with num_iterations={a.num_iterations} "
                          f"is not supported (TRL then trains a generation batch again inside the same optimizer "
                          f"step); use num_iterations=1, or a generation batch of whole steps.")
    if (a.per_device_train_batch_size * spg) % a.num_generations:
        raise ConfigError(f"{given}: each generation batch holds per_device_train_batch_size x {spg} = "
                          f"{a.per_device_train_batch_size * spg} completions a rank, which must be whole groups of "
                          f"num_generations={a.num_generations} (their advantages are taken within the batch).")
    return 1, ga // spg


def environment_factories(value):
    """GRPOConfig.environment_factory -> what GRPOTrainer(environment_factory=...) takes: one import spec -> its
    callable; "name=spec,name2=spec2" -> {name: callable}.
    Raises ConfigError as train.imports.import_callables, and for a "name=spec" list with an empty or repeated
    name."""
    from fasttune.train.imports import import_callables

    field = "environment_factory"
    if isinstance(value, str) and "=" in value:
        pairs = [p.partition("=") for p in value.split(",")]
        names = [n.strip() for n, _, _ in pairs]
        if not all(names) or len(set(names)) != len(names):
            raise ConfigError(f"{field}={value!r} is invalid: write name=package.module.Class pairs, each name once.")
        value = {n.strip(): s.strip() for n, _, s in pairs}
    if isinstance(value, dict):
        return {str(n): import_callables([s], f"{field}[{n!r}]")[0] for n, s in value.items()}
    return import_callables([value], field)[0]
