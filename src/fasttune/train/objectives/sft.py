"""SFT: next-token cross-entropy on the target tokens of each example."""
from __future__ import annotations

import torch

from fasttune.data.collate import count_targets
from fasttune.data.tokenize import tokenize_rows
from fasttune.errors import ConfigError, DataError
from fasttune.models.causal_lm import CausalLM
from fasttune.train.config import SFTConfig
from fasttune.train.loop import Trainer


class SFTTrainer(Trainer):
    """Supervised fine-tuning with SFTConfig; args.chat_template, if set, is also stored on the tokenizer."""

    supports_cuda_graphs = True  # text models (vision ones are refused in cuda_graphs.cuda_graph_step_for)

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: SFTConfig | None = None,
                 data_collator=None, formatting_func=None, compute_metrics=None, preprocess_logits_for_metrics=None,
                 **kwargs):
        from fasttune.train.objectives import vision_sft
        from fasttune.train.trl_args import load_named_model

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
        if self.text_collator is not None and args is not None and args.packing:
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

    def micro_batch_loss(self, batch: dict, num_items: int):
        """See Trainer.micro_batch_loss; a vision-language model also gets the batch's images."""
        if self.vision:
            from fasttune.train.objectives import vision_sft

            return vision_sft.vision_loss(self.model, batch, num_items)
        return super().micro_batch_loss(batch, num_items)

    # --- TRL's SFT metrics: entropy, mean_token_accuracy, num_tokens ----------------------------------------------
    def loss_kwargs(self) -> dict:
        """fasttune's text model returns its token stats with the loss (see record_token_stats)."""
        return {"return_token_stats": True} if isinstance(self.model, CausalLM) and not self.vision else {}

    def record_token_stats(self, stats: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a micro-batch's [entropy sum, first-argmax hits] and target count to the step's sums (on the device,
        read with the step's one device read: step_reads)."""
        part = torch.cat([stats, targets.reshape(1).to(stats.dtype)])
        self._token_step = part if getattr(self, "_token_step", None) is None else self._token_step + part

    def step_reads(self) -> list:
        """The step's token sums (see record_token_stats), read with the loss and grad norm."""
        step, self._token_step = getattr(self, "_token_step", None), None
        return list(step.unbind()) if step is not None else []

    def step_read(self, values: list) -> None:
        """Adds the step's [entropy sum, hits, targets] (host floats) to the logging window."""
        window = getattr(self, "_token_window", None) or [0.0, 0.0, 0.0]
        self._token_window = [a + b for a, b in zip(window, values)]

    def step_metrics(self) -> dict:
        """TRL's SFT metrics over the target tokens since the last log entry: `entropy` (mean, nats) and
        `mean_token_accuracy` (the share whose label is the first argmax), token-weighted over the window (TRL
        averages per-micro-batch means); `num_tokens`: input tokens trained on so far (all ranks). Resets the
        window."""
        window, self._token_window = getattr(self, "_token_window", None), None
        out = {} if getattr(self, "tokens_seen", None) is None else {"num_tokens": float(self.tokens_seen)}
        if window is not None:
            entropy, hits, n = window
            out.update(entropy=entropy / max(n, 1.0), mean_token_accuracy=hits / max(n, 1.0))
        return out

    def eval_batch_loss(self, batch: dict) -> tuple[float, int]:
        """See Trainer.eval_batch_loss; a vision-language model also gets the batch's images; with compute_metrics
        the logits are gathered too."""
        if self.vision:
            from fasttune.train.objectives import vision_sft

            _, loss_sum = vision_sft.vision_loss(self.model, batch, 1)
            return float(loss_sum), count_targets(batch["labels"])
        if self.predictions is None:
            return super().eval_batch_loss(batch)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         return_logits=True)  # the same loss, with the logits compute_metrics reads
        self.predictions.add(out.logits, batch["labels"])
        return float(out.loss_sum), out.num_targets

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
        metrics, (predictions, label_ids) = self._gathering(
            lambda: self.evaluation_pass(test_dataset, metric_key_prefix))
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
        """compute_metrics' result over the last evaluate() pass ("eval_"-prefixed), when it was given."""
        return self.predictions.metrics() if self.predictions is not None else {}

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
                             drop_long=a.drop_long, num_proc=a.dataset_num_proc)


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
