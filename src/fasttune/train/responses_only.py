"""Turn an already built SFT trainer into one that trains only on assistant responses.

Works on fasttune's `SFTTrainer` (its tokenized examples get new labels) and on transformers/TRL trainers whose
`train_dataset`/`eval_dataset` are tokenized `datasets.Dataset`s (TRL's `SFTTrainer` after construction): their
`labels` column gets -100 outside the responses, which TRL's collator uses as given. Datasets without a `labels`
column (older TRL) get a `completion_mask` column instead and the collator's public `completion_only_loss` switch is
turned on. The rule for which tokens are targets is in fasttune.data.responses_only.
"""

from __future__ import annotations

import warnings
from itertools import groupby

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fasttune.data import responses_only as ro
from fasttune.data.examples import TokenizedExamples
from fasttune.errors import ConfigError, DataError

_FLAGS = ("_fasttune_response_found", "_fasttune_instruction_found", "_fasttune_has_target")
_ARROW_CHUNK = 10_000


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            num_proc: int | None = None):
    """Mask everything but the assistant responses in the trainer's train (and eval) data; returns the trainer.

    Args:
        trainer: fasttune's SFTTrainer, or a transformers/TRL trainer with tokenized datasets (`input_ids`).
        instruction_part: the text that opens a user turn, e.g. "<|im_start|>user\\n".
        response_part: the text that opens an assistant turn, e.g. "<|im_start|>assistant\\n". Tokens after each
            response part up to the next instruction part are trained on. A part left out is read off the
            tokenizer's chat template (fasttune.data.responses_only.derive_parts).
        num_proc: processes for `datasets.Dataset.map` on a transformers/TRL trainer's datasets.
    Returns: the same trainer. Examples left without any response token are dropped (one warning with the count).
    Raises: ConfigError when a part occurs in no row of a dataset, when the parts cannot be derived, or for a trainer
        this cannot work on; DataError when no example keeps a response token.
    """
    from fasttune.train.loop import Trainer
    from fasttune.train.objectives.sft import SFTTrainer

    if isinstance(trainer, Trainer):
        if not isinstance(trainer, SFTTrainer):
            raise ConfigError(f"train_on_responses_only works on SFT trainers, not on {type(trainer).__name__} "
                              "(preference and GRPO objectives already train only on the responses).")
        tokenizer = trainer.tokenizer
    else:
        tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor holds its tokenizer
    if tokenizer is None:
        raise ConfigError("train_on_responses_only needs the trainer's tokenizer (processing_class) to find the "
                          "instruction and response parts; the trainer has none.")
    if instruction_part is None or response_part is None:
        derived_instruction, derived_response = ro.derive_parts(tokenizer)
        instruction_part = derived_instruction if instruction_part is None else instruction_part
        response_part = derived_response if response_part is None else response_part
    parts = (ro.part_ids(tokenizer, instruction_part, "instruction_part"),
             ro.part_ids(tokenizer, response_part, "response_part"))
    texts = (instruction_part, response_part)

    if isinstance(trainer, Trainer):
        trainer.train_examples = _mask_examples(trainer.train_examples, parts, texts, "the training data")
        if trainer.eval_examples is not None:
            trainer.eval_examples = _mask_examples(trainer.eval_examples, parts, texts, "the eval data")
        return trainer

    if getattr(trainer, "train_dataset", None) is None and getattr(trainer, "eval_dataset", None) is None:
        raise ConfigError(f"train_on_responses_only needs a trainer with a train_dataset; {type(trainer).__name__} "
                          "has none.")
    collator = getattr(trainer, "data_collator", None)
    for attr, where in (("train_dataset", "the train_dataset"), ("eval_dataset", "the eval_dataset")):
        ds = getattr(trainer, attr, None)
        if isinstance(ds, dict):
            setattr(trainer, attr, {k: _mask_dataset(v, parts, texts, f"{where} '{k}'", collator, num_proc)
                                    for k, v in ds.items()})
        elif ds is not None:
            setattr(trainer, attr, _mask_dataset(ds, parts, texts, where, collator, num_proc))
    return trainer


# --- fasttune's own trainer ------------------------------------------------------------------------------------

def _mask_examples(examples, parts, texts, where: str):
    kept, found = [], [False, False]
    for ex in examples:
        docs = [len(list(g)) for _, g in groupby(ex["segment_ids"])] if "segment_ids" in ex else None
        target, has_response, has_instruction = ro.response_targets(ex["input_ids"], parts[0], parts[1], docs)
        found[0] |= has_instruction
        found[1] |= has_response
        labels = ro.masked_labels(ex["labels"], target)
        if any(t != ro.IGNORE_INDEX for t in labels[1:]):  # position 0 is never a target (causal shift)
            kept.append({**ex, "labels": labels})
    _check_found(found, parts, texts, where)
    _report_dropped(len(examples) - len(kept), len(examples), where)
    if isinstance(examples, TokenizedExamples):  # keep big data in Arrow, as tokenize_rows gave it
        return _to_arrow(kept)
    return kept


def _to_arrow(examples: list[dict]) -> TokenizedExamples:
    ids, labels = [], []
    for i in range(0, len(examples), _ARROW_CHUNK):
        part = examples[i:i + _ARROW_CHUNK]
        ids.append(pa.array([e["input_ids"] for e in part], type=pa.list_(pa.int32())))
        labels.append(pa.array([e["labels"] for e in part], type=pa.list_(pa.int32())))
    return TokenizedExamples(pa.chunked_array(ids), pa.chunked_array(labels))


# --- transformers / TRL trainers -------------------------------------------------------------------------------

class DatasetMasker:
    """Batched `datasets.Dataset.map` function: new `labels` (or `completion_mask`) plus three flag columns."""

    def __init__(self, instruction_ids: list[int], response_ids: list[int], column: str, keep_existing_mask: bool):
        self.instruction_ids, self.response_ids = instruction_ids, response_ids
        self.column = column  # "labels" or "completion_mask"
        self.keep_existing_mask = keep_existing_mask  # AND with a completion_mask the collator already applies

    def __call__(self, batch: dict) -> dict:
        out = {self.column: [], **{f: [] for f in _FLAGS}}
        for j, ids in enumerate(batch["input_ids"]):
            docs = batch["seq_lengths"][j] if "seq_lengths" in batch else None
            target, has_response, has_instruction = ro.response_targets(ids, self.instruction_ids,
                                                                        self.response_ids, docs)
            if self.column == "labels":
                value = ro.masked_labels(batch["labels"][j], target)
                has_target = any(t != ro.IGNORE_INDEX for t in value[1:])
            else:
                if self.keep_existing_mask and "completion_mask" in batch:
                    target &= np.asarray(batch["completion_mask"][j], dtype=bool)
                value = target.astype(np.int64).tolist()
                has_target = bool(target[1:].any())
            out[self.column].append(value)
            out[_FLAGS[0]].append(has_response)
            out[_FLAGS[1]].append(has_instruction)
            out[_FLAGS[2]].append(has_target)
        return out


def _mask_dataset(ds, parts, texts, where: str, collator, num_proc):
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"train_on_responses_only works on a datasets.Dataset; {where} is a {type(ds).__name__} "
                          "(streaming datasets are not supported: load the data without streaming=True).")
    if "input_ids" not in ds.column_names:
        raise ConfigError(f"{where} is not tokenized (columns: {', '.join(ds.column_names)}). Call "
                          "train_on_responses_only on the trainer after constructing it (TRL's SFTTrainer tokenizes "
                          "its datasets then), or tokenize the data first.")
    if "labels" in ds.column_names:
        column, keep_existing = "labels", False
    else:  # older TRL: the collator builds labels, honouring completion_mask when completion_only_loss is on
        if collator is None or not hasattr(collator, "completion_only_loss"):
            raise ConfigError(f"{where} has no 'labels' column and the trainer's data collator has no "
                              "completion_only_loss switch, so the masks cannot be handed to it. Use a collator that "
                              "reads 'labels' from the dataset (TRL's DataCollatorForLanguageModeling does).")
        column, keep_existing = "completion_mask", bool(collator.completion_only_loss)
    out = ds.map(DatasetMasker(parts[0], parts[1], column, keep_existing), batched=True, num_proc=num_proc,
                 desc="Masking everything but the responses")
    flags = {f: pc.sum(out.data.column(f)).as_py() or 0 for f in _FLAGS}
    _check_found([flags[_FLAGS[1]] > 0, flags[_FLAGS[0]] > 0], parts, texts, where)
    dropped = len(out) - flags[_FLAGS[2]]
    if dropped:
        keep = out.data.column(_FLAGS[2]).to_numpy(zero_copy_only=False)
        out = out.select(np.flatnonzero(keep))
    _report_dropped(dropped, len(ds), where)
    out = out.remove_columns(list(_FLAGS))
    if column == "completion_mask":
        collator.completion_only_loss = True
    return out


# --- shared ---------------------------------------------------------------------------------------------------

def _check_found(found, parts, texts, where: str) -> None:
    """`found`, `parts`, `texts`: (instruction, response) each; the response part is reported first."""
    for i, name in ((1, "response_part"), (0, "instruction_part")):
        if not found[i]:
            raise ro.never_found_error(name, texts[i], parts[i], where)


def _report_dropped(dropped: int, total: int, where: str) -> None:
    if dropped == total:
        raise DataError(f"train_on_responses_only: no example of {where} keeps a response token (all {total} lose "
                        "every target; they may have been truncated before the response). Raise the maximum "
                        "sequence length or check the instruction/response parts.")
    if dropped:
        warnings.warn(f"train_on_responses_only dropped {dropped} of {total} examples of {where} that have no "
                      "response token (e.g. truncated before the answer).", UserWarning, stacklevel=3)
