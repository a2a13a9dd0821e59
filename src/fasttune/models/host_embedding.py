"""A frozen input embedding kept in host memory (`from_pretrained(..., offload_embedding=True)`, Unsloth's name).

The input embedding of a model with an untied LM head is only ever read row by row: a forward needs the rows of
its B x T tokens, not the V x H table. QLoRA keeps it frozen in 16 bits, so on a GPU it holds 1-2 GiB that never
change (Llama-3.1-8B 1.0 GB, Qwen2.5-14B 1.5 GB, gpt-oss-20b 1.1 GB). Here the table lives in pinned host
memory; on CUDA the rows are gathered by a kernel reading that memory directly (kernels/embedding.py), which
needs no host sync and works inside CUDA graphs; where the device cannot address host memory the rows are looked
up on the host and copied over (one sync per forward). Values are the table's exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from fasttune.errors import ConfigError
from fasttune.kernels.embedding import device_reads_host, embedding_rows, embedding_rows_reference
from fasttune.models.word_embedding import scale_rows


class HostEmbedding(nn.Embedding):
    """nn.Embedding whose (frozen) weight stays in pinned host memory whatever `.to()` / `.cuda()` asks: dtype
    changes apply, device moves do not. forward(ids (...) int64 on any device) -> (..., H) on ids' device in the
    weight's dtype, times `embed_scale` when the embedding it replaced scaled its rows (Gemma's
    ScaledWordEmbedding). Build it with `from_embedding`."""

    embed_scale: float | None = None

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "HostEmbedding":
        """A HostEmbedding holding `embedding`'s weight (copied to pinned host memory; the original's device memory
        is released once nothing else references it). Raises ConfigError for a trainable embedding."""
        if embedding.weight.requires_grad:
            raise ConfigError("offload_embedding keeps the input embedding frozen in host memory, but it is trainable "
                              "(full_finetuning, or modules_to_save=['embed_tokens']); drop one of the two.")
        host = cls.__new__(cls)
        nn.Module.__init__(host)
        host.num_embeddings, host.embedding_dim = embedding.weight.shape
        for attr in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse", "embed_scale"):
            setattr(host, attr, getattr(embedding, attr, None))
        weight = embedding.weight.detach().to("cpu")
        host.weight = nn.Parameter(pinned(weight), requires_grad=False)
        return host

    def _apply(self, fn, recurse=True):
        return apply_dtype_only(self, fn)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) integer -> rows (..., H) on ids' device. Raises IndexError for an id outside the vocabulary
        where the rows are looked up on the host (the GPU gather writes NaN rows instead)."""
        table = self.weight
        if table.requires_grad:
            raise ConfigError("offload_embedding: the input embedding was made trainable after it was placed in host "
                              "memory; load without offload_embedding to train it.")
        if ids.is_cuda:
            if not table.is_pinned():  # replaced by resizing or a load: pin again before the GPU reads it
                self.weight = nn.Parameter(pinned(table.detach()), requires_grad=False)
                table = self.weight
            if device_reads_host(ids.device):
                return scale_rows(embedding_rows(ids, table.detach()), self.embed_scale)
        return scale_rows(embedding_rows_reference(ids, table.detach()), self.embed_scale)

    def extra_repr(self) -> str:
        """The table's size and where it lives (what print(model) shows)."""
        return f"{self.num_embeddings}, {self.embedding_dim}, in pinned host memory"


def apply_dtype_only(module: nn.Module, fn) -> nn.Module:
    """nn.Module._apply for a module whose frozen `weight` lives in pinned host memory: Module.to(device) / .cuda() /
    .half() call _apply with one function for every tensor; only its dtype effect is kept, so the weight never
    lands on the GPU. Returns the module."""
    moved = fn(torch.empty(0, dtype=module.weight.dtype, device="cpu"))
    if moved.dtype != module.weight.dtype and moved.dtype.is_floating_point:
        module.weight = nn.Parameter(pinned(module.weight.detach().to(moved.dtype)), requires_grad=False)
    return module


def pinned(t: torch.Tensor) -> torch.Tensor:
    """t (contiguous) in page-locked host memory when CUDA is available, else t."""
    t = t.contiguous()
    return t.pin_memory() if torch.cuda.is_available() and not t.is_pinned() else t


def offload_input_embedding(model) -> None:
    """Put `model`'s input embedding (our CausalLM or VisionCausalLM) in host memory as a HostEmbedding.

    Raises ConfigError when the LM head shares the embedding's weight (tied embeddings: the head needs the whole
    table in every forward) or when the embedding is trainable."""
    if getattr(model.arch, "tie_embeddings", False):
        raise ConfigError("offload_embedding=True: this model ties its LM head to the input embedding, and the head "
                          "reads the whole table in every forward, so it must stay on the GPU. Load without "
                          "offload_embedding.")
    decoder = model.model
    if isinstance(decoder.embed_tokens, HostEmbedding):
        return
    decoder.embed_tokens = HostEmbedding.from_embedding(decoder.embed_tokens)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
