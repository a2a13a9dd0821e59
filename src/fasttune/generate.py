"""Text generation for quick samples (the CLI's before/after).

Greedy or temperature sampling without a KV cache: each new token re-runs the whole sequence, which is fine
for short samples; a KV-cache `generate()` for serving and GRPO comes with the inference work.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                  chat: bool = True, seed: int = 0) -> str:
    """Continue `prompt` (as a user turn through the chat template when the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    was_training = model.training
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.tensor([ids], device=model.device)
    stop = {tokenizer.eos_token_id} | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set())
    new = []
    for _ in range(max_new_tokens):
        logits = model(x).logits[0, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            tok = int(torch.multinomial(probs, 1, generator=g))
        else:
            tok = int(logits.argmax())
        if tok in stop:
            break
        new.append(tok)
        x = torch.cat([x, torch.tensor([[tok]], device=x.device)], dim=1)
    model.train(was_training)
    return tokenizer.decode(new, skip_special_tokens=True)
