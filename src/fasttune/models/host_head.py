"""A frozen LM head kept in host memory (`from_pretrained(..., offload_lm_head=True)`).

QLoRA keeps the head frozen in 16 bits: 1.0 GB for Llama-3.1-8B, 1.6 GB for Qwen2.5-14B, as much as five or six
of its NF4 decoder layers. Here it stays in pinned host memory and is streamed to the GPU in tiles of vocabulary
rows whenever it is used (kernels/streamed_head.py): the training loss takes one pass over it per 4,096 tokens,
with an online softmax, so neither the head nor the (tokens x vocab) logits are ever whole on the GPU. The values
are the 16-bit head's; the price is the copy, ~30 ms per pass for the 14B head over PCIe Gen5.

Generation reads the head once per new token, so `generate()` brings it to the GPU for the call
(`head_on_device`) instead of streaming it 1.6 GB a token.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from fasttune.errors import ConfigError
from fasttune.models.host_embedding import apply_dtype_only, pinned


class HostLMHead(nn.Linear):
    """nn.Linear without bias whose frozen weight (V, H) stays in pinned host memory whatever `.to()` / `.cuda()`
    asks (dtype changes apply, device moves do not). forward(x (..., H) on any device) -> logits (..., V) in x's
    dtype, the weight streamed in tiles. Build it with `from_linear`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HostLMHead":
        """A HostLMHead holding `linear`'s weight (copied to pinned host memory). Raises ConfigError for a trainable
        head or one with a bias."""
        if linear.weight.requires_grad:
            raise ConfigError("offload_lm_head keeps the LM head frozen in host memory, but it is trainable "
                              "(full_finetuning, or modules_to_save=['lm_head']); drop one of the two.")
        if linear.bias is not None:
            raise ConfigError("offload_lm_head: this model's LM head has a bias, which the streamed head does not "
                              "support; load without offload_lm_head.")
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.out_features, head.in_features = linear.weight.shape
        head.weight = nn.Parameter(pinned(linear.weight.detach().to("cpu")), requires_grad=False)
        head.register_parameter("bias", None)
        return head

    def _apply(self, fn, recurse=True):
        return apply_dtype_only(self, fn)

    def host_weight(self) -> torch.Tensor:
        """The (V, H) weight in pinned host memory (pinned again if something replaced it), detached. Raises
        ConfigError when it was made trainable after offloading."""
        if self.weight.requires_grad:
            raise ConfigError("offload_lm_head: the LM head was made trainable after it was placed in host memory; "
                              "load without offload_lm_head to train it.")
        if torch.cuda.is_available() and not self.weight.is_pinned():
            self.weight = nn.Parameter(pinned(self.weight.detach()), requires_grad=False)
        return self.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> logits (..., V) in x's dtype, the head streamed to x's device in tiles."""
        from fasttune.kernels.streamed_head import streamed_logits

        return streamed_logits(x, self.host_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, in pinned host memory"


def host_head(model) -> torch.Tensor | None:
    """The pinned host weight of `model`'s LM head when it is a HostLMHead, else None."""
    head = getattr(model, "lm_head", None)
    return head.host_weight() if isinstance(head, HostLMHead) else None


def offload_lm_head(model) -> None:
    """Put `model`'s LM head (our CausalLM or VisionCausalLM) in host memory as a HostLMHead.

    Raises ConfigError when the head shares the input embedding's weight (tied embeddings: the embedding is read on
    the GPU every step) or is trainable."""
    if getattr(model.arch, "tie_embeddings", False):
        raise ConfigError("offload_lm_head=True: this model ties its LM head to the input embedding, which then has "
                          "to stay on the GPU; load without offload_lm_head.")
    if isinstance(model.lm_head, HostLMHead):
        return
    model.lm_head = HostLMHead.from_linear(model.lm_head)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def head_on_device(model, device: torch.device):
    """Within the block, `model.lm_head` is a plain Linear on `device` holding a copy of the host head (for
    generation, which reads the whole head for every token); outside it, the HostLMHead again. A no-op for other
    heads."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, HostLMHead) or device.type == "cpu":
        yield
        return
    linear = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(head.host_weight().to(device, non_blocking=True), requires_grad=False)
    model.lm_head = linear
    try:
        yield
    finally:
        model.lm_head = head
        del linear
