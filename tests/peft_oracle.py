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
