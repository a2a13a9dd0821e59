"""transformers+PEFT as the oracle: build the reference model carrying exactly our adapter weights."""
import torch
from tiny import hf_model


def peft_twin(family, adapter_dir, seed=0, **overrides):
    from peft import PeftModel

    base = hf_model(family, seed=seed, **overrides)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


def saved_lora_adapter(root, tokenizer, name="llama"):
    """Save the tiny Llama (seed 0) as root/name, our LoRA model on it (r 4, alpha 8, random B) and its adapter as
    root/"adapter"; returns (that model, its tokenizer)."""
    from fasttune import FastLanguageModel
    from tiny import save_hf

    save_hf(hf_model("llama", seed=0), root / name, tokenizer)
    model, tok = FastLanguageModel.from_pretrained(str(root / name), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora_b(model)
    model.save_pretrained(str(root / "adapter"))
    return model, tok


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


def moe_adapter_grads(family, ours, folder, prepare_ref=None, **overrides) -> tuple[dict, dict]:
    """({name: grad} of our LoRA model `ours` (random B, saved to `folder`/adapter) under PEFT's names, the same
    for PEFT's model built from that adapter over transformers' `family` (config `overrides` on tests/tiny.py's),
    after one loss backward on the same batch (2 x 20 tokens). `prepare_ref(base model)` sets values our model has
    beyond the tiny model's."""
    from fasttune.peft.adapter_io import adapter_parameters

    randomize_lora_b(ours)
    ours.save_pretrained(folder / "adapter")
    ref = peft_twin(family, folder / "adapter", **overrides)
    if prepare_ref is not None:
        prepare_ref(ref.base_model.model)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(6))
    ours(ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    mine = {k.removeprefix("base_model.model.").removesuffix(".weight"): p.grad
            for k, p in adapter_parameters(ours).items()}
    return mine, peft_grads(ref)



def assert_grads_close(mine: dict, theirs: dict) -> None:
    """Each of `mine`'s gradients equals `theirs` under the same name: rtol 1e-5, atol 1e-7 plus 1e-6 of that
    gradient's largest magnitude (the experts' summation order differs)."""
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7 + 1e-6 * theirs[n].abs().max().item(), msg=n)


def check_recompute_gradients(folder, device=None, **load) -> None:
    """LoRA gradients of the model saved in `folder` (fp32, random B, one 2 x 12 batch) equal without recompute, with
    layer recompute and with "offload" (the kept attention block included); on `device` (default: from_pretrained's);
    `load`: more from_pretrained arguments (e.g. load_in_fp8=True)."""
    from fasttune import FastLanguageModel

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    ids = ids if device is None else ids.to(device)
    grads = []
    for mode in (False, True, "offload"):
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device=device, **load)
        lora = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode, random_state=0)
        randomize_lora_b(lora)
        lora.train()
        lora(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n, g in other.items():
            torch.testing.assert_close(g, grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


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


def check_logits_generation_and_merged(hf, model, length: int, folder):
    """Our `model` (a fasttune FastLanguageModel, fp32) against transformers' `hf` on the same weights: logits on two
    random rows of `length` tokens (without a mask, and with the second row left-padded), greedy generation of 6
    tokens from 8, and after LoRA (random B) a merged 16-bit checkpoint in `folder`/merged that transformers loads
    with our logits."""
    from tiny import causal_lm_class

    from fasttune import FastLanguageModel

    ids = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        for m in (None, mask):
            ref, got = hf(input_ids=ids, attention_mask=m).logits, model(ids, attention_mask=m).logits
            real = slice(None) if m is None else m.bool()
            assert ((ref - got).abs()[real].max() / ref[real].abs().max()).item() < 1e-5
    prompt = ids[:1, :8]
    want = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), want)
    model = FastLanguageModel.get_peft_model(model, r=4)
    randomize_lora_b(model)
    model.save_pretrained_merged(folder / "merged", save_method="merged_16bit")
    merged = causal_lm_class(hf.config.model_type).from_pretrained(folder / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def check_packed_documents(model, first_len: int = 70, second_len: int = 20) -> None:
    """Two documents packed in one row of our `model` (positions restarting at 0) give each document's logits alone
    (a recurrent layer starts each from a zero state, attention attends within it), and differ from the unpacked
    row's (so the check can fail)."""
    ids = torch.randint(3, 300, (1, first_len + second_len), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([list(range(first_len)) + list(range(second_len))])
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        first, second = model(ids[:, :first_len]).logits, model(ids[:, first_len:]).logits
        unpacked = model(ids).logits
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-6)
    assert (packed[:, first_len:] - unpacked[:, first_len:]).abs().max() > 1e-4


def assert_same_routing(want_weights, want_experts, weights, experts) -> None:
    """Two top-k routings (weights (N, k), experts (N, k)) pick the same experts with the same weights, in whatever
    order each lists a token's k experts."""
    mine, theirs = experts.sort(-1).indices, want_experts.sort(-1).indices
    assert torch.equal(want_experts.gather(1, theirs), experts.gather(1, mine))
    torch.testing.assert_close(weights.gather(1, mine), want_weights.gather(1, theirs), rtol=1e-6, atol=1e-7)
