"""Qwen3.5 on the card (skipped without CUDA): flash-linear-attention's delta-rule kernels (when installed) against
our torch chunked form, forward and backward, whole rows and packed runs; the model with and without fla; LoRA
training and CUDA-graph generation of the tiny Qwen3.5."""
import pytest
import torch
from tiny import check_bf16_lora_and_graph_decode

from fasttune import FastLanguageModel
from fasttune.models import delta_rule
from fasttune.models.delta_rule import chunked_delta_rule, gated_delta_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs(b=2, t=300, hk=4, hv=8, dk=64, dv=64, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v = make(b, t, hk, dk), make(b, t, hk, dk), make(b, t, hv, dv)
    decay = -torch.rand(b, t, hv, device="cuda", generator=g) * 0.5
    beta = torch.rand(b, t, hv, device="cuda", generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)] + [decay.requires_grad_(), beta.to(dtype).requires_grad_()]


def _need_fla():
    pytest.importorskip("fla")
    if not delta_rule.uses_fla(torch.empty(1, device="cuda")):
        pytest.skip("flash-linear-attention does not run on this GPU (see the FlaUnusableWarning)")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("packed", [False, True])
def test_fla_equals_the_torch_form(packed):
    """Outputs and every input's gradient within bf16 rounding of the fp32 torch form (grouped value heads,
    300 positions: four whole chunks and a partial one; packed: runs of 100, 137 and 63 positions per row)."""
    _need_fla()
    args = _inputs()
    spans = [(r, s, e) for r in range(2) for s, e in ((0, 100), (100, 237), (237, 300))] if packed else None
    out, _ = gated_delta_rule(*args, spans)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, args, grad)
    ref_args = [x.detach().float().requires_grad_() for x in args]
    if packed:
        ref = torch.zeros_like(out, dtype=torch.float32)
        for row, s, e in spans:
            part, _ = chunked_delta_rule(*(x[row:row + 1, s:e] for x in ref_args))
            ref = ref.index_put((torch.tensor([row], device="cuda")[:, None], torch.arange(s, e, device="cuda")),
                                part)
    else:
        ref, _ = chunked_delta_rule(*ref_args)
    want = torch.autograd.grad(ref, ref_args, grad.float())
    assert _rel(out, ref) < 1e-2
    for name, a, b in zip("q k v g beta".split(), got, want):
        assert _rel(a, b) < 2e-2, name


def test_model_with_fla_equals_without(tiny_model_dir, monkeypatch):
    """The tiny Qwen3.5 in fp32: logits and LoRA gradients through fla's kernels equal the torch form's."""
    _need_fla()
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_5_text")), dtype=torch.float32,
                                                 device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    ids = torch.randint(3, 300, (2, 150), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    results = []
    for fla_on in (True, False):
        monkeypatch.setattr(delta_rule, "_fla_chunk", delta_rule._fla_chunk if fla_on else lambda: None)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.requires_grad}))
    (logits, grads), (logits_ref, grads_ref) = results
    assert _rel(logits, logits_ref) < 1e-3
    for n in grads_ref:
        assert _rel(grads[n], grads_ref[n]) < 1e-2, n


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_next"])
def test_bf16_lora_trains_and_generation_graphs_equal_eager(family, tiny_model_dir, monkeypatch):
    """bf16 LoRA with recompute trains (loss falls); greedy generation through the CUDA-graph decode equals the
    eager decode (the linear layers' conv and state updated in place inside the graph). Qwen3-Next: its fused
    projections and experts (LoRA on them by default) too."""
    check_bf16_lora_and_graph_decode(tiny_model_dir(family), monkeypatch)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 5e-3), (torch.float32, 1e-5)])
def test_triton_scan_at_qwen3_5_head_size(dtype, tolerance, monkeypatch):
    """The default Triton chunk scan at Qwen3.5's head size (128; d_v in two blocks) against the torch loop, whole
    rows and packed runs: TF32 products for 16-bit inputs (within bf16 rounding), IEEE for fp32 (to 1e-5)."""
    monkeypatch.setenv("FASTTUNE_FLA", "0")
    delta_rule._fla_chunk.cache_clear()
    try:
        args = _inputs(b=2, t=300, hk=2, hv=4, dk=128, dv=128, dtype=dtype)
        spans = [(r, s, e) for r in range(2) for s, e in ((0, 100), (100, 237), (237, 300))]
        grad = torch.randn(2, 300, 4, 128, device="cuda", dtype=dtype)
        for runs in (None, spans):
            results = []
            for scan in ("", "torch"):
                monkeypatch.setenv("FASTTUNE_DELTA_SCAN", scan)
                out, _ = gated_delta_rule(*args, runs)
                results.append((out, torch.autograd.grad(out, args, grad)))
            (out, grads), (ref, ref_grads) = results
            assert _rel(out, ref) < tolerance
            for name, a, b in zip("q k v g beta".split(), grads, ref_grads):
                assert _rel(a, b) < 4 * tolerance, name
    finally:
        delta_rule._fla_chunk.cache_clear()


def test_tf32_products_stay_within_bf16_rounding(monkeypatch):
    """bf16 inputs take TF32 products (the chunk scan, the series inverse, the batched products); against the same
    inputs in fp32 (IEEE throughout) outputs and gradients stay within bf16's rounding (measured ~1.7e-3 at 9B's
    shape)."""
    monkeypatch.setenv("FASTTUNE_FLA", "0")
    delta_rule._fla_chunk.cache_clear()
    try:
        args = _inputs(b=2, t=300, hk=2, hv=4, dk=128, dv=128)
        exact = [x.detach().float().requires_grad_() for x in args]
        grad = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16)
        out, _ = gated_delta_rule(*args)
        ref, _ = gated_delta_rule(*exact)
        assert _rel(out, ref) < 5e-3
        for name, a, b in zip("q k v g beta".split(), torch.autograd.grad(out, args, grad),
                              torch.autograd.grad(ref, exact, grad.float())):
            assert _rel(a, b) < 2e-2, name
    finally:
        delta_rule._fla_chunk.cache_clear()
