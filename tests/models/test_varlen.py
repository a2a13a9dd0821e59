"""Packed-row attention: document spans for flash attention's varlen kernel (CPU), and on CUDA the varlen path
against the dense block-diagonal mask and against each document run alone."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.models import decoder, masks, self_attention
from fasttune.models.varlen import packed_spans, varlen_usable


def test_spans_split_documents_rows_and_padding():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    spans = packed_spans(seg)
    # Row 0: docs of 3 and 2 tokens, then its padding; row 1 starts a new span although it starts with id 1 again.
    assert spans.cu_seqlens.tolist() == [0, 3, 5, 6, 7, 10, 12]
    assert spans.cu_seqlens.dtype == torch.int32 and spans.max_len == 3


def test_same_id_in_adjacent_rows_is_two_documents():
    spans = packed_spans(torch.tensor([[1, 1], [1, 1]]))
    assert spans.cu_seqlens.tolist() == [0, 2, 4] and spans.max_len == 2


def test_varlen_not_used_on_cpu_or_with_softcap():
    x = torch.zeros(1, dtype=torch.bfloat16)
    assert not varlen_usable(x, None, {None})
    if torch.cuda.is_available():
        assert not varlen_usable(x.cuda(), 30.0, {None})


def _packed_batch(device):
    torch.manual_seed(5)
    lens = [[7, 12, 9], [20, 6]]
    ids = torch.randint(3, 300, (2, 30), device=device)
    seg = torch.zeros(2, 30, dtype=torch.long, device=device)
    pos = torch.zeros(2, 30, dtype=torch.long, device=device)
    for r, row in enumerate(lens):
        at = 0
        for d, n in enumerate(row, 1):
            seg[r, at:at + n] = d
            pos[r, at:at + n] = torch.arange(n)
            at += n
    mask = (seg > 0).long()
    return ids, mask, pos, seg, lens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gemma4_text"])  # gemma: windows of 4
def test_varlen_equals_dense_mask_and_unpacked_documents(family, tiny_model_dir, monkeypatch):
    folder = tiny_model_dir(family)
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    ids, mask, pos, seg, lens = _packed_batch("cuda")
    assert varlen_usable(model.model.norm.weight, None, set(model.arch.sliding_windows) or {None})

    def run(varlen: bool):
        monkeypatch.setattr(decoder, "varlen_usable", lambda *a: varlen)
        model.zero_grad()
        out = model(ids, attention_mask=mask, position_ids=pos, segment_ids=seg, labels=ids.masked_fill(mask == 0,
                                                                                                         -100),
                    return_logits=True)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    v_logits, v_grads = run(True)
    d_logits, d_grads = run(False)
    real = mask.bool()
    torch.testing.assert_close(v_logits[real], d_logits[real], rtol=2e-2, atol=2e-2)
    for n, g in v_grads.items():
        assert (g.float() - d_grads[n].float()).norm() <= 2e-2 * d_grads[n].float().norm() + 1e-6, n
    with torch.no_grad():  # each document alone, unpacked, gives the same logits
        for r, row in enumerate(lens):
            at = 0
            for n in row:
                alone = model(ids[r:r + 1, at:at + n]).logits.float()[0]
                torch.testing.assert_close(v_logits[r, at:at + n], alone, rtol=2e-2, atol=2e-2)
                at += n


def test_padding_runs_number_pads_and_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert masks.padding_runs(mask).tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 2],
                                                   [0, 0, 0, 0, 0]]
    assert masks.padding_runs(torch.tensor([[1, 0, 1]])) is None  # a hole: the dense mask keeps its meaning


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3: sliding windows of 4
def test_left_padding_runs_varlen_equal_to_the_dense_mask(family, tiny_model_dir, monkeypatch):
    """Left- and both-side-padded rows (generation prompts, GRPO's prompt + completion) take the varlen kernel and
    give the dense mask's logits and gradients at the real tokens."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.bfloat16, device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    torch.manual_seed(6)
    ids = torch.randint(3, 300, (3, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    mask[1, :3] = 0
    mask[1, 20:] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # A row's first token after left padding is predicted from a padding position, whose output is made from
    # padding on either path (there it differs); real prompts never put a target there (GRPO, generation).
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 9] = labels[1, 3] = -100
    seen = []
    real_spans = decoder.packed_spans

    def run(varlen: bool):
        monkeypatch.setattr(decoder, "varlen_usable", lambda *a: varlen)
        monkeypatch.setattr(decoder, "packed_spans", lambda seg: seen.append(varlen) or real_spans(seg))
        model.zero_grad()
        out = model(ids, attention_mask=mask, position_ids=pos, labels=labels, return_logits=True)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    v_logits, v_grads = run(True)
    d_logits, d_grads = run(False)
    assert seen == [True]  # only the varlen run built spans
    real = mask.bool()
    torch.testing.assert_close(v_logits[real], d_logits[real], rtol=2e-2, atol=2e-2)
    for n, g in v_grads.items():
        assert (g.float() - d_grads[n].float()).norm() <= 2e-2 * d_grads[n].float().norm() + 1e-6, n


def test_windows_wider_than_names_gemma4_full_layers(tiny_model_dir):
    from fasttune.models.config import ModelConfig
    import transformers

    cfg = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(tiny_model_dir("gemma4_text")))
    assert cfg.windows_wider_than(256) == set()  # tiny heads: 16 (sliding), 32 (full)
    assert cfg.windows_wider_than(16) == {None}
    assert cfg.windows_wider_than(8) == set(cfg.sliding_windows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_wide_head_layers_keep_dense_masks_beside_varlen(tiny_model_dir, monkeypatch):
    """Gemma 4 with full-layer heads wider than flash takes (here: flash's limit lowered to the sliding layers' 16
    channels, so the 32-channel full layers count as wide): packed rows run the sliding layers through varlen and
    the full layers through their dense block-diagonal mask, equal to every layer on dense masks."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("gemma4_text")), dtype=torch.bfloat16,
                                                 device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    monkeypatch.setattr(decoder, "FLASH_MAX_HEAD_DIM", 16)
    ids, mask, pos, seg, _ = _packed_batch("cuda")
    calls = []
    real_varlen, real_usable = self_attention.varlen_attention, decoder.varlen_usable
    monkeypatch.setattr(self_attention, "varlen_attention", lambda *a, **k: calls.append(a[4]) or real_varlen(*a, **k))

    def run(varlen: bool):
        monkeypatch.setattr(decoder, "varlen_usable", real_usable if varlen else lambda *a: False)
        model.zero_grad()
        out = model(ids, attention_mask=mask, position_ids=pos, segment_ids=seg,
                    labels=ids.masked_fill(mask == 0, -100), return_logits=True)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    v_logits, v_grads = run(True)
    sliding = [w for w in model.arch.sliding_windows if w is not None]
    assert calls == sliding  # each sliding layer went varlen with its window; no full layer did
    d_logits, d_grads = run(False)
    real = mask.bool()
    torch.testing.assert_close(v_logits[real], d_logits[real], rtol=2e-2, atol=2e-2)
    for n, g in v_grads.items():
        assert (g.float() - d_grads[n].float()).norm() <= 2e-2 * d_grads[n].float().norm() + 1e-6, n
