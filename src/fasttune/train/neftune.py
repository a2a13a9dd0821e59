"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning") in fasttune's trainers.

transformers' Trainer adds the noise with a forward hook on `model.get_input_embeddings()` for the length of
`train()`: in a training forward each embedding output (B, T, H) gets uniform noise in [-m, m], m = alpha /
sqrt(T x H) (T the padded or packed length of the batch), drawn from torch's global generator; evaluation (the model
in eval mode) and generation after training get none. fasttune borrows that hook (transformers.integrations.neftune),
so the same seed gives the same noise as transformers' and TRL's trainers. Gemma's sqrt(hidden) scale is inside
its embedding module (models/word_embedding.py), so the noise lands after it, as in transformers' Gemma models.
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def neftune_noise(model, alpha: float | None):
    """Within the block, training forwards of `model` (our CausalLM, a vision-language model or the transformers
    fallback: anything with get_input_embeddings()) add NEFTune noise of `alpha` to the input embeddings; alpha
    None does nothing. The hook is removed when the block ends, also on an error."""
    if alpha is None:
        yield
        return
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    handle = activate_neftune(model, alpha)
    try:
        yield
    finally:
        deactivate_neftune(model, handle)
