"""cuda_graphs=True on the card (skipped without CUDA): the captured forward+backward gives the eager step's loss
sums and accumulated LoRA gradients (right-padded batches of varying length, with and without recompute; dense in
fp32, MoE / gpt-oss in bf16), across optimizer steps that drop the gradients; a capture that fails falls back to
eager with the same result and names the op; SFTTrainer's loss curve (and its token metrics) with graphs equals the
one without."""
import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.data.collate import collate
from fasttune.kernels.dispatch import replayed_launches
from fasttune.train.cuda_graphs import CudaGraphStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(tiny_model_dir, family, gc, dtype=torch.float32, **load):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=dtype, device="cuda", **load)
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules="all-linear", use_gradient_checkpointing=gc)
    with torch.no_grad():  # B = 0 at init would leave A's gradients zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([24, 19], [17, 11], [24, 24], [9]):  # the last: fewer rows than the graph's
        rows = [{"input_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in lengths]
        for r in rows:
            r["labels"] = [-100] * 3 + r["input_ids"][3:]  # a prompt without loss
        out.append({k: v.cuda() for k, v in collate(rows, 0).items()})
    return out


def _eager(model, batches, n):
    """The eager reference, on the paths a captured step takes (replayed_launches: the fused expert LoRA at any
    size; which path eager steps take is tested on the CPU, where both equal the loop over experts)."""
    sums = []
    for b in batches:
        with replayed_launches():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                        num_items_in_batch=n)
            out.loss.backward()
        sums.append(out.loss_sum.detach())
    return sums


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _compare(got_sums, want_sums, got_grads, want_grads, dtype=torch.float32):
    """fp32: to rounding; bf16 (the padding changes the GEMMs' shapes, so their rounding): relative norms."""
    exact = dtype == torch.float32
    torch.testing.assert_close(torch.stack(got_sums), torch.stack(want_sums), rtol=1e-5 if exact else 1e-2, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        got, want = got_grads[name].float(), want_grads[name].float()
        assert want.abs().max() > 0, name
        if exact:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=name)
        else:
            assert (got - want).norm() <= 3e-2 * want.norm(), name


# The MoE families in bf16: the experts' grouped GEMM kernel (the one path a graph can hold) takes 16-bit weights.
# gemma3_text: flash's sliding-window kernel inside the graph (gpt_oss: banded blocks with its sink key)
@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("lfm2", torch.float32),
                                           ("qwen3_moe", torch.bfloat16), ("gpt_oss", torch.bfloat16),
                                           ("gemma3_text", torch.bfloat16)])
@pytest.mark.parametrize("gc", [False, True])
def test_graph_step_equals_eager(tiny_model_dir, family, dtype, gc):
    model = _model(tiny_model_dir, family, gc, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    step = CudaGraphStep(model, pad_token_id=0, rows=2, length=24)
    for seed in (0, 1):  # the second optimizer step replays only
        batches = _batches(seed)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        want_sums = _eager(model, batches, n)
        want = _grads(model)
        for p in params:
            p.grad = None  # as zero_grad(set_to_none=True): the step re-attaches its own tensors
        got_sums = [step.run(b, n) for b in batches]
        _compare(got_sums, want_sums, _grads(model), want, dtype)
        for p in params:
            p.grad = None
    assert step.off_reason is None and step.replays == 7 and len(step.shapes) == 1


@pytest.mark.parametrize("gc", [False, True])
def test_graph_step_with_host_embedding(tiny_model_dir, gc):
    """offload_embedding: the rows are read from pinned host memory inside the graph; the replays equal eager."""
    from fasttune.models.host_embedding import HostEmbedding
    from fasttune import SFTConfig
    from fasttune.train.cuda_graphs import refusal

    model = _model(tiny_model_dir, "llama", gc, offload_embedding=True)
    assert isinstance(model.model.embed_tokens, HostEmbedding) and refusal(model, SFTConfig()) is None
    step = CudaGraphStep(model, pad_token_id=0, rows=2, length=24)
    for seed in (0, 1):
        batches = _batches(seed)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        want_sums = _eager(model, batches, n)
        want = _grads(model)
        for p in model.parameters():
            p.grad = None
        got_sums = [step.run(b, n) for b in batches]
        _compare(got_sums, want_sums, _grads(model), want)
        for p in model.parameters():
            p.grad = None
    assert step.off_reason is None and step.replays == 7


def test_failed_capture_falls_back_to_eager(tiny_model_dir, monkeypatch, capsys):
    """An op that cannot be captured (here the cross-entropy's row compaction, a host sync) turns graphs off for
    the run; the batch still trains, with the eager result."""
    import fasttune.models.causal_lm as causal_lm

    real = causal_lm.chunked_linear_cross_entropy
    monkeypatch.setattr(causal_lm, "chunked_linear_cross_entropy", lambda *a, **k: real(*a, **k, compact=True))
    model = _model(tiny_model_dir, "llama", False)
    batches = _batches(0)
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    want_sums = _eager(model, batches, n)
    want = _grads(model)
    for p in model.parameters():
        p.grad = None
    step = CudaGraphStep(model, rows=2, length=24)
    got_sums = [step.run(b, n) for b in batches]
    assert step.off_reason is not None and step.replays == 0
    assert "cuda_graphs turned off" in capsys.readouterr().err
    _compare(got_sums, want_sums, _grads(model), want)
    torch.manual_seed(0)
    a = torch.rand(3, device="cuda")  # the aborted capture leaves the random generator usable, at its old state
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3, device="cuda"), a)


def test_fp32_moe_falls_back_naming_the_expert_path(tiny_model_dir, capsys):
    model = _model(tiny_model_dir, "qwen3_moe", False)  # fp32 experts: the padded-bmm path, which syncs
    batches = _batches(0)
    step = CudaGraphStep(model, rows=2, length=24)
    for b in batches:
        step.run(b, 100)
    assert "padded-bmm expert path" in step.off_reason and step.replays == 0


@pytest.mark.parametrize("extra", [{}, {"label_smoothing_factor": 0.1}], ids=["plain", "label_smoothing"])
def test_sft_trainer_loss_curve_with_graphs(tiny_model_dir, tiny_tokenizer, tmp_path, capsys, extra):
    from fasttune import SFTConfig, SFTTrainer

    rows = [{"text": "word " * (5 + (i * 7) % 23)} for i in range(24)]
    curves = []
    for graphs in (False, True):
        model = _model(tiny_model_dir, "llama", True)
        args = SFTConfig(output_dir=str(tmp_path / str(graphs)), max_steps=5, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, cuda_graphs=graphs,
                         seed=1, **extra)
        trainer = SFTTrainer(model, tiny_tokenizer, train_dataset=rows, args=args)
        trainer.train()
        curves.append([[h[k] for k in ("loss", "entropy", "mean_token_accuracy", "num_tokens")]
                       for h in trainer.log_history if "loss" in h])
        if graphs:
            assert "cuda_graphs on: each micro-batch runs padded to 2 x" in capsys.readouterr().err
            # 10 micro-batches: the first runs eagerly (the warm-up), the second is captured and replayed
            assert trainer._graph_step.replays == 9 and trainer._graph_step.off_reason is None
    assert len(curves[0]) == 5 and curves[0][-1][1] > 0
    # the loss and TRL's token metrics (collected from the replayed graphs too) equal the eager run's
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5)
