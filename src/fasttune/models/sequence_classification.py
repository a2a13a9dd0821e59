"""`SequenceClassifier`: our decoder with transformers' sequence-classification head (`score`), for classifiers and
reward models.

It is what transformers' `<Family>ForSequenceClassification` computes (transformers 5's
`GenericForSequenceClassification`, modeling_layers.py): the backbone's final hidden state, `score` (hidden ->
num_labels, no bias) on each row's last token that is not the pad token (the rightmost one, so left and right padding
both work), and `ForSequenceClassificationLoss` (loss/loss_utils.py): MSE for "regression", cross-entropy for
"single_label_classification", BCE-with-logits for "multi_label_classification", the problem type inferred from
num_labels and the labels' dtype when the config has none. Only the pooled rows go through `score`, in fp32.

Loaded by `FastLanguageModel.from_pretrained(..., auto_model=AutoModelForSequenceClassification, num_labels=N)` or
from a checkpoint whose `architectures` names a `*ForSequenceClassification` class (api.py, models/loading.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from fasttune.errors import ConfigError
from fasttune.models.causal_lm import CausalLM

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# the keywords of packed / padding-free rows (several documents in one row), which a classifier refuses
PACKED_ROW_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "segment_ids", "max_length_q", "max_length_k")
HEAD = "score"  # transformers' name for the head; PEFT's SEQ_CLS adapters save it as a module to save


def classification_architecture(model_type: str) -> str | None:
    """transformers' sequence-classification class name for a model_type (e.g. "llama" ->
    "LlamaForSequenceClassification"), or None where transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)


def is_classification_config(hf_config) -> bool:
    """Whether a checkpoint's config.architectures names a sequence-classification class (a saved classifier or a
    reward model), so that it loads with its `score` head."""
    return any(str(a).endswith("ForSequenceClassification") for a in getattr(hf_config, "architectures", None) or ())


@dataclass
class SequenceClassifierOutput(ModelOutput):
    """transformers' SequenceClassifierOutputWithPast fields that are set here: loss () fp32 (with labels) and
    logits (B, num_labels) fp32, the pooled scores."""
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class SequenceClassifier(CausalLM):
    """Our decoder with a sequence-classification head: `SequenceClassifier(config)` takes the family's transformers
    config with num_labels set (config.num_labels, id2label, problem_type, pad_token_id are read as transformers'
    classes read them). It has no LM head: `lm_head` is None, and generation and GGUF export are refused.

    forward(input_ids (B, T), attention_mask, labels) -> SequenceClassifierOutput (logits (B, num_labels) fp32);
    see `forward`. Everything else (LoRA, recompute, NF4, saving adapters and merged checkpoints) is CausalLM's."""

    is_sequence_classifier = True  # read by peft/ and export/, which do not import models/
    has_lm_head = False  # no vocabulary-sized head (transformers' classifiers have none either): lm_head is None
    transformers_classes = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"  # e.g. LlamaForSequenceClassification

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.score = nn.Linear(self.arch.hidden_size, config.num_labels, bias=False)
        self.loss_type = "ForSequenceClassification"  # transformers.Trainer then counts labels unshifted

    @property
    def num_labels(self) -> int:
        """config.num_labels (the head's output width)."""
        return self.config.num_labels

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        """No LM head, nothing to tie."""

    def get_output_embeddings(self):
        """None: a classifier has no LM head (as transformers' classes answer)."""
        return None

    def _no_head(self, what: str):
        raise ConfigError(f"{what} needs a language-model head, and this model is a sequence classifier (num_labels="
                          f"{self.num_labels}, a `score` head). Load the model without auto_model / num_labels to "
                          f"generate text.")

    def logits(self, hidden):
        """Refused: no LM head."""
        self._no_head("Token logits")

    def token_logprobs(self, hidden, labels, temperature: float = 1.0, entropy: bool = False):
        """Refused: no LM head."""
        self._no_head("Token log-probabilities")

    def generate(self, *args, **kwargs):
        """Refused: no LM head."""
        self._no_head("generate()")

    def fast_generate(self, *args, **kwargs):
        """Refused: no LM head."""
        self._no_head("fast_generate()")

    def save_pretrained_gguf(self, *args, **kwargs):
        """Refused: llama.cpp's GGUF files hold language models (save_pretrained_merged writes a transformers
        classifier)."""
        raise ConfigError("GGUF export writes language models for llama.cpp; this model is a sequence classifier. "
                          "Save it with save_pretrained_merged (a transformers checkpoint that "
                          "AutoModelForSequenceClassification loads) or save_pretrained (the PEFT adapter).")

    def pooled_index(self, input_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
        """Each row's position whose score is the row's, (B,) int64: transformers' rule, the rightmost token that is
        not config.pad_token_id; the last position (length - 1) without a pad id (batch 1 only) or with
        inputs_embeds. Raises ConfigError for batch > 1 without a pad id."""
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ConfigError("A sequence classifier scores each row's last token that is not padding, and the "
                              "model config has no pad_token_id, so rows of a batch cannot be told from their "
                              "padding. Set model.config.pad_token_id = tokenizer.pad_token_id (fasttune's "
                              "from_pretrained does this when the tokenizer has a pad token).")
        if pad is None or input_ids is None:
            return torch.full((batch,), length - 1, dtype=torch.long, device=self.device)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return (positions * (input_ids != pad)).argmax(-1)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None):
        """logits (B, L) fp32, labels (B,) int64 / (B,) or (B, L) float -> () fp32, as transformers'
        ForSequenceClassificationLoss (which also sets config.problem_type when it is None). With
        num_items_in_batch (transformers.Trainer's count of labels over the accumulated batch) every problem type is
        a sum over that count, so gradient accumulation gives the mean over the whole batch; transformers does this
        for cross-entropy only (its MSE / BCE stay per-micro-batch means that Trainer then does not divide)."""
        cfg, n = self.config, self.num_labels
        if cfg.problem_type is None:
            if n == 1:
                cfg.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                cfg.problem_type = "single_label_classification"
            else:
                cfg.problem_type = "multi_label_classification"
        if cfg.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"config.problem_type={cfg.problem_type!r} is not one of {PROBLEM_TYPES}.")
        labels = labels.to(logits.device)
        summed = num_items_in_batch is not None
        reduction = "sum" if summed else "mean"
        if cfg.problem_type == "regression":
            if n == 1:
                loss = F.mse_loss(logits.squeeze(), labels.squeeze().float(), reduction=reduction)
            else:
                loss = F.mse_loss(logits, labels.float(), reduction=reduction)
        elif cfg.problem_type == "single_label_classification":
            if labels.is_floating_point():
                raise ConfigError(f"problem_type 'single_label_classification' takes class indices as labels (int), "
                                  f"got {labels.dtype}. Store the label column as integers 0..{n - 1}.")
            loss = F.cross_entropy(logits.view(-1, n), labels.view(-1), ignore_index=-100, reduction=reduction)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction=reduction)
        if summed:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None, return_dict: bool | None = None,
                num_items_in_batch=None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, cache_position=None, **unexpected):
        """input_ids (B, T) int64 (or inputs_embeds (B, T, H)) -> SequenceClassifierOutput (a tuple with
        return_dict=False): logits (B, num_labels) fp32, the score of each row's last non-pad token (see
        pooled_index); with labels (see classification_loss) also the loss. attention_mask (B, T), 1 = real token;
        left padding, right padding and rows without padding give the same scores as transformers.

        Raises ConfigError for packed / padding-free rows (cu_seq_lens_q/k, seq_idx, segment_ids: one row holds
        several documents, each needing its own score) and TypeError for other unknown arguments (`margin`, which TRL's
        RewardTrainer passes with its batches, is ignored)."""
        packed = sorted(k for k in PACKED_ROW_KEYS if unexpected.get(k) is not None)
        if packed:
            raise ConfigError(f"A sequence classifier scores one document per row; packed / padding-free rows "
                              f"({', '.join(packed)}) hold several. Turn packing / padding_free off.")
        # TRL's RewardTrainer passes its batch whole, `margin` (its loss's, not the model's) included
        rest = sorted(k for k in unexpected if k not in (*PACKED_ROW_KEYS, "logits_to_keep", "margin"))
        if rest:
            raise TypeError(f"SequenceClassifier.forward() got unexpected keyword arguments {rest}.")
        if past_key_values is not None:
            raise ConfigError("A sequence classifier takes whole rows; it keeps no KV cache (past_key_values).")
        hidden = self.model(input_ids, attention_mask, position_ids, None, inputs_embeds, False,
                            output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states).last_hidden_state
        batch, length = hidden.shape[:2]
        index = self.pooled_index(input_ids, batch, length).to(hidden.device)
        pooled = hidden[torch.arange(batch, device=hidden.device), index]
        logits = F.linear(pooled.float(), self.score.weight.float())
        loss = None if labels is None else self.classification_loss(logits, labels, num_items_in_batch)
        out = SequenceClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


# from_pretrained's keywords for the head, as transformers' AutoModelForSequenceClassification.from_pretrained and
# the peer's FastModel.from_pretrained(auto_model=...) take them
CLASSIFIER_ARGS = ("auto_model", "num_labels", "id2label", "label2id", "problem_type")
# auto_model values that mean the model's own head (a language model, or a vision-language model's)
DEFAULT_AUTO_MODELS = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq",
                       "AutoModel")


def classifier_request(extra: dict) -> dict | None:
    """from_pretrained's head keywords (CLASSIFIER_ARGS, popped from `extra`) -> None for the model's own head, or
    {"num_labels", "id2label", "label2id", "problem_type"} (None where not given) for a sequence classifier.
    auto_model: transformers' AutoModelForSequenceClassification (the class or its name) asks for the classifier;
    AutoModelForCausalLM and the vision-language auto classes, or None, for the model's own head. Raises ConfigError
    for another auto class, head settings without auto_model=AutoModelForSequenceClassification, or invalid values."""
    given = {k: extra.pop(k) for k in CLASSIFIER_ARGS if k in extra}
    auto = given.pop("auto_model", None)
    name = auto if isinstance(auto, str) or auto is None else getattr(auto, "__name__", repr(auto))
    settings = {k: v for k, v in given.items() if v is not None}
    if name is None or name in DEFAULT_AUTO_MODELS:
        if settings:
            raise ConfigError(f"from_pretrained({', '.join(f'{k}=...' for k in settings)}) sets up a classification "
                              f"head; also pass auto_model=AutoModelForSequenceClassification (from transformers) "
                              f"to load the model as a sequence classifier.")
        return None
    if name != "AutoModelForSequenceClassification":
        raise ConfigError(f"from_pretrained(auto_model={name}) is not supported: fasttune loads language models "
                          f"(the default, AutoModelForCausalLM) and sequence classifiers / reward models "
                          f"(auto_model=AutoModelForSequenceClassification).")
    num, id2label, label2id, problem = (given.get(k) for k in ("num_labels", "id2label", "label2id", "problem_type"))
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise ConfigError(f"num_labels={num!r} is invalid: use a positive whole number (1 for a reward model or "
                          f"regression, the number of classes otherwise).")
    for key, table in (("id2label", id2label), ("label2id", label2id)):
        if table is not None and not isinstance(table, dict):
            shape = "class index -> name" if key == "id2label" else "name -> class index"
            raise ConfigError(f"{key} must be a dict ({shape}), got {type(table).__name__}.")
    if id2label is not None:
        try:
            id2label = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"id2label={id2label!r}: its keys must be class indices (0, 1, ...).") from None
        if sorted(id2label) != list(range(len(id2label))):
            raise ConfigError(f"id2label has keys {sorted(id2label)}; it must name every class 0..N-1 once.")
        if num is not None and num != len(id2label):
            raise ConfigError(f"num_labels={num} but id2label names {len(id2label)} classes; give matching values.")
    if problem is not None and problem not in PROBLEM_TYPES:
        raise ConfigError(f"problem_type={problem!r} is invalid: use one of {PROBLEM_TYPES} (or leave it unset: "
                          f"regression for num_labels=1, else single-label for integer labels).")
    return {"num_labels": num, "id2label": id2label, "label2id": label2id, "problem_type": problem}


def classifier_class(hf_config, request: dict | None, source: str, fast: bool = True, fallback: bool = False):
    """The model class to build `hf_config` as: CausalLM, or SequenceClassifier when `request` (classifier_request's
    dict) asks for one or the checkpoint is a classifier (is_classification_config). For a classifier, the request's
    settings are written into hf_config (num_labels, id2label, label2id, problem_type) and architectures becomes
    transformers' class for the family, which merged saves then carry (a vision-language checkpoint's language model
    comes here with its text config: models/loading.py's text_classifier_from_vision). Raises ConfigError for a
    family transformers has no sequence-classification class for, or one on the transformers fallback
    (fast=False, a family outside our decoder, or `fallback`: a file the caller loads through it)."""
    from fasttune.models.config import SUPPORTED_FAMILIES

    if request is None and not is_classification_config(hf_config):
        return CausalLM
    model_type = getattr(hf_config, "model_type", None)
    name = classification_architecture(model_type)
    if model_type not in SUPPORTED_FAMILIES or not fast or fallback:
        raise ConfigError(f"'{source}' ({model_type}) would load through the transformers fallback"
                          f"{' (fast=False)' if not fast else ''}, which has no sequence-classification head here; "
                          f"sequence classifiers run on fasttune's decoder"
                          + (" (leave fast at True)." if not fast and model_type in SUPPORTED_FAMILIES else
                             f" for its families: {', '.join(supported_classifier_families())}."))
    if name is None:
        raise ConfigError(f"'{source}' is a {model_type} model, for which transformers has no "
                          f"ForSequenceClassification class, so a classifier trained here could not be loaded "
                          f"elsewhere. Families with one: {', '.join(supported_classifier_families())}.")
    request = request or {}
    if request.get("id2label") is not None:
        hf_config.id2label = request["id2label"]
        hf_config.label2id = request.get("label2id") or {v: k for k, v in request["id2label"].items()}
    elif request.get("num_labels") is not None:
        hf_config.num_labels = request["num_labels"]  # (transformers' setter writes LABEL_i names)
    if request.get("label2id") is not None and request.get("id2label") is None:
        hf_config.label2id = dict(request["label2id"])
    if request.get("problem_type") is not None:
        hf_config.problem_type = request["problem_type"]
    hf_config.architectures = [name]
    return SequenceClassifier


def supported_classifier_families() -> list[str]:
    """fasttune's decoder families that transformers has a ForSequenceClassification class for."""
    from fasttune.models.config import SUPPORTED_FAMILIES

    return [f for f in SUPPORTED_FAMILIES if classification_architecture(f)]


def pad_like_tokenizer(config, tokenizer) -> None:
    """A classifier scores each row's last token that is not config.pad_token_id, and batches are padded with the
    tokenizer's pad token: make them one (as TRL's RewardTrainer does), warning when the config named another."""
    import warnings

    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None or config.pad_token_id == pad:
        return
    if config.pad_token_id is not None:
        warnings.warn(f"config.pad_token_id {config.pad_token_id} differs from the tokenizer's pad token "
                      f"{tokenizer.pad_token!r} ({pad}), which pads the batches; the classifier now finds each "
                      f"row's last real token by {pad}.")
    config.pad_token_id = pad
