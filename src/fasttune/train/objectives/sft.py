"""SFT: next-token cross-entropy on the target tokens of each example."""
from __future__ import annotations

import torch

from fasttune.data.tokenize import tokenize_rows
from fasttune.errors import ConfigError, DataError
from fasttune.models.causal_lm import CausalLM
from fasttune.train.config import SFTConfig
from fasttune.train.loop import Trainer
from fasttune.train.objective_hooks import logged_sum


class SFTTrainer(Trainer):
    """Supervised fine-tuning with SFTConfig; args.chat_template, if set, is also stored on the tokenizer."""

    supports_cuda_graphs = True  # text models (vision ones are refused in cuda_graphs.cuda_graph_step_for)

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: SFTConfig | None = None,
                 data_collator=None, formatting_func=None, compute_metrics=None, preprocess_logits_for_metrics=None,
                 **kwargs):
        from fasttune.train.objectives import vision_sft
        from fasttune.train.trl_args import apply_router_aux_loss_coef, load_named_model

        model, tokenizer = load_named_model(model, tokenizer if tokenizer is not None else
                                            kwargs.pop("processing_class", None))
        self.vision = vision_sft.is_vision_model(model)
        if self.vision and data_collator is not None and \
                not isinstance(data_collator, vision_sft.VisionDataCollator):
            raise ConfigError(f"data_collator={type(data_collator).__name__}: a vision-language model's batches "
                              f"carry images, so the collator is taken only as a VisionDataCollator. Leave it out.")
        if data_collator is not None and not callable(data_collator):
            raise ConfigError(f"data_collator must be a function of a list of examples returning a batch (as "
                              f"transformers' collators are); got {type(data_collator).__name__}.")
        self.vision_collator = data_collator if self.vision else None
        # transformers' Trainer contract: a text model's batches come from the given collator (data/collate.py)
        self.text_collator = data_collator if not self.vision else None
        if self.text_collator is not None and (getattr(args, "packing", False) or kwargs.get("packing")):
            raise ConfigError("packing=True with a data_collator: packed rows carry per-document position and segment "
                              "ids that a collator does not pass on, so documents would attend to each other. Use "
                              "packing=False with the collator, or leave data_collator out.")
        if formatting_func is not None and not callable(formatting_func):
            raise ConfigError(f"formatting_func must be a function of one row returning its text; got "
                              f"{type(formatting_func).__name__}.")
        self.formatting_func = formatting_func
        for name, fn in (("compute_metrics", compute_metrics), ("preprocess_logits_for_metrics",
                                                                 preprocess_logits_for_metrics)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name} must be a function; got {type(fn).__name__}.")
        if compute_metrics is not None and self.vision:
            raise ConfigError("compute_metrics on a vision-language model is not implemented: evaluation logs "
                              "eval_loss; leave compute_metrics out.")
        # transformers' contract: evaluation gathers logits for compute_metrics (eval_predictions.py); predict()
        # gathers them, through preprocess_logits_for_metrics, with or without compute_metrics
        self.compute_metrics, self.preprocess_logits = compute_metrics, preprocess_logits_for_metrics
        self.predictions = None  # the PredictionGatherer of the evaluation pass running, when it gathers
        super().__init__(model, tokenizer, train_dataset, eval_dataset, args, config_cls=SFTConfig, **kwargs)
        apply_router_aux_loss_coef(self.model, self.args.router_aux_loss_coef)  # TRL's MoE default: on
        if self.args.chat_template and self.tokenizer is not None:
            from fasttune.data.templates import resolve_chat_template

            # The trained model speaks this template: keep it on the tokenizer that is saved with the adapter,
            # so chat, generate and GGUF export after training use it too.
            self.tokenizer.chat_template = resolve_chat_template(self.args.chat_template)

    def collate_batch(self, examples: list[dict]) -> dict:
        """Text examples as the base trainer batches them, or through the data_collator given (collate_with);
        image + text ones with pixel_values/image_grid_thw."""
        if self.vision:
            from fasttune.train.objectives import vision_sft

            return vision_sft.collate(examples, self.tokenizer)
        if self.text_collator is not None:
            from fasttune.data.collate import collate_with

            return collate_with(self.text_collator, examples)
        return super().collate_batch(examples)

    def model_inputs(self, batch: dict) -> dict:
        """See Trainer.model_inputs (packed rows' position_ids / segment_ids); a vision-language model's batches
        carry their images too."""
        if not self.vision:
            return super().model_inputs(batch)
        from fasttune.train.objectives.vision_sft import BATCH_KEYS

        return {**super().model_inputs(batch), **{k: batch[k] for k in BATCH_KEYS if k in batch}}

    # --- TRL's SFT metrics: entropy, mean_token_accuracy, num_tokens ----------------------------------------------
    @property
    def _token_stats_on(self) -> bool:
        """Whether the model returns token stats: fasttune's models (text and vision-language) and the transformers
        fallback (the same on every rank)."""
        from fasttune.models.fallback import FallbackModel

        return isinstance(self.model, (CausalLM, FallbackModel))

    def loss_kwargs(self) -> dict:
        """return_token_stats where the model gives them (see record_token_stats); loss_type="dft" asks for Dynamic
        Fine-Tuning's weighting, label_smoothing_factor for label smoothing."""
        kw = {"dft": True} if getattr(self.args, "loss_type", "nll") == "dft" else {}
        if getattr(self.args, "label_smoothing_factor", 0.0):
            kw["smoothing"] = float(self.args.label_smoothing_factor)
        return {"return_token_stats": True, **kw} if self._token_stats_on else kw

    def record_token_stats(self, stats: torch.Tensor, targets: torch.Tensor) -> None:
        """Keeps a micro-batch's [entropy sum, first-argmax hits, targets] (on the device, read with the step's one
        device read: step_reads)."""
        self._token_parts = getattr(self, "_token_parts", None) or []
        self._token_parts.append(torch.cat([stats, targets.reshape(1).to(stats.dtype)]))

    def step_reads(self) -> list:
        """The step's micro-batch sums (see record_token_stats), read with the loss and grad norm; resets them."""
        parts, self._token_parts = getattr(self, "_token_parts", None), None
        return list(torch.stack(parts).flatten().unbind()) if parts else []

    def step_read(self, values: list) -> None:
        """Adds the step's micro-batch means to the logging window, as TRL forms them: under torchrun, micro-batch k's
        sums over every rank's k-th micro-batch (gathered on the host), then entropy / targets and hits / targets
        (0 without targets)."""
        if not self._token_stats_on:
            return
        rows = [values[i:i + 3] for i in range(0, len(values), 3)]
        ranks = self.dist.gather(rows) if self.dist.active else [rows]
        window = getattr(self, "_token_window", None) or [0.0, 0.0, 0.0]
        for k in range(max(len(r) for r in ranks)):
            entropy, hits, n = (sum(r[k][j] for r in ranks if k < len(r)) for j in range(3))
            window = [window[0] + (entropy / n if n else 0.0), window[1] + (hits / n if n else 0.0), window[2] + 1]
        self._token_window = window

    def step_metrics(self) -> dict:
        """TRL's SFT metrics since the last log entry, each the mean over the window's micro-batches of the micro-batch
        mean over its target tokens (as TRL averages them): `entropy` (nats) and `mean_token_accuracy` (the share
        whose label is the first argmax); `num_tokens`: input tokens trained on so far (all ranks). Resets the
        window."""
        window, self._token_window = getattr(self, "_token_window", None), None
        return self._token_metrics(window)

    def _token_metrics(self, window: list | None) -> dict:
        out = {"num_tokens": float(getattr(self, "tokens_seen", None) or 0)}
        if window is not None:
            entropy, hits, n = window
            out.update(entropy=entropy / max(n, 1.0), mean_token_accuracy=hits / max(n, 1.0))
        return out

    def eval_batch_loss(self, batch: dict) -> tuple[float, int]:
        """See Trainer.eval_batch_loss; a vision-language model also gets the batch's images; with compute_metrics
        the logits are gathered too (text models). fasttune's models add the batch's token metrics to the eval window
        (TRL's eval_entropy / eval_mean_token_accuracy: the mean of the batches' means)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         return_logits=self.predictions is not None and not self.vision, **self.model_inputs(batch),
                         **self.loss_kwargs())
        if self.predictions is not None and not self.vision:  # the same loss, with the logits compute_metrics reads
            self.predictions.add(out.logits, batch["labels"])
        if getattr(out, "token_stats", None) is not None:
            n = max(float(out.target_count), 1.0)
            self._eval_tokens = _added(getattr(self, "_eval_tokens", None),
                                       [v / n for v in out.token_stats.tolist()] + [1.0])
        return float(logged_sum(self.model, out, out.target_count)), out.num_targets

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """See Trainer.evaluate; with compute_metrics, its metrics over this pass are added (prefixed)."""
        if self.compute_metrics is None or isinstance(eval_dataset, dict):  # a dict: each set comes back here
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        return self._gathering(lambda: super(SFTTrainer, self).evaluate(eval_dataset, ignore_keys,
                                                                        metric_key_prefix))[0]

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """transformers' Trainer.predict: a PredictionOutput of the logits (or preprocess_logits_for_metrics' result)
        and labels over `test_dataset`, joined and padded with -100 as transformers does, and its metrics (loss and
        compute_metrics', prefixed metric_key_prefix); fires on_predict. Raises as evaluate() does."""
        from transformers.trainer_utils import PredictionOutput

        if self.vision:
            raise ConfigError("predict() on a vision-language model is not implemented; generate() its answers.")
        self._predicting = True
        try:
            metrics, (predictions, label_ids) = self._gathering(
                lambda: self.evaluation_pass(test_dataset, metric_key_prefix))
        finally:
            self._predicting = False
        self.callbacks.fire("on_predict", metrics=metrics)
        return PredictionOutput(predictions=predictions, label_ids=label_ids, metrics=metrics)

    def _gathering(self, run_pass):
        """(run_pass()'s metrics, (predictions, label_ids)) with a fresh PredictionGatherer collecting the pass's
        logits; none is left behind, also when the pass raises."""
        from fasttune.train.eval_predictions import PredictionGatherer

        gatherer = self.predictions = PredictionGatherer(self.compute_metrics, self.preprocess_logits)
        try:
            return run_pass(), gatherer.last
        finally:
            self.predictions = None

    def eval_metrics(self) -> dict:
        """compute_metrics' result over the last evaluate() pass ("eval_"-prefixed), when it was given, and TRL's
        token metrics (eval_entropy, eval_mean_token_accuracy, eval_num_tokens: the tokens trained so far) on
        fasttune's models, except for predict() (as transformers' Trainer.predict returns no logged metrics)."""
        window, self._eval_tokens = getattr(self, "_eval_tokens", None), None
        out = self.predictions.metrics() if self.predictions is not None else {}
        if window is not None and not getattr(self, "_predicting", False):
            out.update({f"eval_{k}": v for k, v in self._token_metrics(window).items()})
        return out

    def prepare(self, dataset) -> list[dict]:
        """Rows -> examples with input_ids and labels (tokenize_rows), cut to the smaller of the config's and the
        model's max_seq_length. Raises ConfigError without a tokenizer unless the rows have input_ids."""
        a = self.args
        limit = min(a.max_seq_length, self.model.max_seq_length or a.max_seq_length)
        if self.vision:
            from fasttune.train.objectives import vision_sft

            return vision_sft.vision_examples(dataset, self.tokenizer, a, limit, self.vision_collator)
        text_field = a.dataset_text_field
        if self.formatting_func is not None:  # TRL: the function's string per row is the text trained on
            dataset, text_field = formatted_rows(dataset, self.formatting_func), "text"
        if self.tokenizer is None and not _is_tokenized(dataset):
            raise ConfigError("SFTTrainer needs a tokenizer (tokenizer=...) unless the rows are already tokenized "
                              "(`input_ids`).")
        return tokenize_rows(dataset, self.tokenizer, max_seq_length=limit, data_format=a.data_format,
                             dataset_text_field=text_field,
                             train_on_responses_only=a.train_on_responses_only, chat_template=a.chat_template,
                             drop_long=a.drop_long, num_proc=a.dataset_num_proc,
                             completion_only_loss=getattr(a, "completion_only_loss", None))


def _is_tokenized(dataset) -> bool:
    if isinstance(dataset, list):
        return bool(dataset) and isinstance(dataset[0], dict) and "input_ids" in dataset[0]
    return "input_ids" in getattr(dataset, "column_names", [])



def formatted_rows(dataset, formatting_func) -> list[dict]:
    """[{"text": formatting_func(row)}] for every row of `dataset` (anything data/sources.load_rows reads), as TRL's
    SFTTrainer applies a formatting_func (one row in, one string out). Raises DataError naming the first row whose
    result is not a string (a list: the old batched convention, which TRL no longer uses)."""
    from fasttune.data.sources import load_rows

    out = []
    for i, row in enumerate(load_rows(dataset)):
        text = formatting_func(row)
        if not isinstance(text, str):
            hint = (" (a list: write it for one row, as TRL's SFTTrainer now calls it, not for a batch)"
                    if isinstance(text, (list, tuple)) else "")
            raise DataError(f"formatting_func returned {type(text).__name__} for row {i}{hint}; return the row's "
                            f"text as one string.")
        out.append({"text": text})
    return out


def _added(sums: list | None, values: list) -> list:
    """Element-wise sums + values (values alone when sums is None)."""
    return list(values) if sums is None else [a + b for a, b in zip(sums, values)]
