"""SFT: next-token cross-entropy on the target tokens of each example."""
from __future__ import annotations

from fasttune.data.tokenize import tokenize_rows
from fasttune.errors import ConfigError
from fasttune.train.config import SFTConfig
from fasttune.train.loop import Trainer


class SFTTrainer(Trainer):
    """Supervised fine-tuning with SFTConfig; args.chat_template, if set, is also stored on the tokenizer."""

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: SFTConfig | None = None,
                 **kwargs):
        super().__init__(model, tokenizer, train_dataset, eval_dataset, args, config_cls=SFTConfig, **kwargs)
        if self.args.chat_template and self.tokenizer is not None:
            from fasttune.data.templates import resolve_chat_template

            # The trained model speaks this template: keep it on the tokenizer that is saved with the adapter,
            # so chat, generate and GGUF export after training use it too.
            self.tokenizer.chat_template = resolve_chat_template(self.args.chat_template)

    def prepare(self, dataset) -> list[dict]:
        """Rows -> examples with input_ids and labels (tokenize_rows), cut to the smaller of the config's and the
        model's max_seq_length. Raises ConfigError without a tokenizer unless the rows have input_ids."""
        a = self.args
        limit = min(a.max_seq_length, self.model.max_seq_length or a.max_seq_length)
        if self.tokenizer is None and not _is_tokenized(dataset):
            raise ConfigError("SFTTrainer needs a tokenizer (tokenizer=...) unless the rows are already tokenized "
                              "(`input_ids`).")
        return tokenize_rows(dataset, self.tokenizer, max_seq_length=limit, data_format=a.data_format,
                             dataset_text_field=a.dataset_text_field,
                             train_on_responses_only=a.train_on_responses_only, chat_template=a.chat_template,
                             drop_long=a.drop_long, num_proc=a.dataset_num_proc)


def _is_tokenized(dataset) -> bool:
    if isinstance(dataset, list):
        return bool(dataset) and isinstance(dataset[0], dict) and "input_ids" in dataset[0]
    return "input_ids" in getattr(dataset, "column_names", [])
