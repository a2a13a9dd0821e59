"""transformers+PEFT as the oracle: build the reference model carrying exactly our adapter weights."""
import torch
from tiny import hf_model


def peft_twin(family, adapter_dir, seed=0, **overrides):
    from peft import PeftModel

    base = hf_model(family, seed=seed, **overrides)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


def randomize_lora_b(model, seed=5):
    """LoRA B starts at zero; give it values so that gradients of A are non-trivial too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def peft_grads(peft_model) -> dict:
    """PEFT parameter grads keyed by our parameter names."""
    out = {}
    for n, p in peft_model.named_parameters():
        if p.grad is None:
            continue
        n = n.removeprefix("base_model.model.").replace(".default", "").replace(".modules_to_save", "")
        out[n.removesuffix(".weight") if ".lora_" in n else n] = p.grad
    return out


def reference_sft_losses(ref_model, batches, steps: int, lr: float) -> list[float]:
    """The transformers(+PEFT) reference loop: per-step loss = summed token CE of the accumulated batch over its
    target count, AdamW (torch defaults as HF uses them, no weight decay), clipping at 1.0. `batches` yields what
    Trainer.step_batches yields, so both sides see the same data."""
    import torch.nn.functional as F

    from fasttune.data.collate import count_targets

    params = [p for p in ref_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, _, group = next(batches)
        n = sum(count_targets(b["labels"]) for b in group)
        total = 0.0
        for b in group:
            logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum")
            (loss_sum / n).backward()
            total += loss_sum.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total / n)
    return losses
