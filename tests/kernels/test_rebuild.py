"""Lean saves (kernels/rebuild.py): layers that keep their activations rebuild the norms' and activations' outputs in
backward instead of keeping them. Gradients must be bitwise the same, the saved values must shrink by exactly what
train/lean_count.py's lean_values counts, and recomputed layers must keep what they kept."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.kernels import rebuild
from fasttune.train.memory_policy import lean_values

pytest.importorskip("triton")


def _model(folder, gc=False, dropout=0.0, dtype=torch.float32, **load):
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=dtype, **load)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout,
                                             use_gradient_checkpointing=gc)
    randomize_lora_b(model)
    return model


def _step(model, lean: bool, through_backward: bool = False):
    """(loss, LoRA grads, bytes of the distinct storages autograd saved) for one forward + backward; with
    `through_backward` the saves of a recomputed layer's re-run (inside backward) count too. Every saved tensor is
    held until the end so that no storage is freed and its address reused."""
    model.lean_saves = lean
    torch.manual_seed(4)
    ids = torch.randint(3, 300, (2, 9))
    storages, held = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
        if through_backward:
            loss.backward()
    if not through_backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, sum(storages.values())


@pytest.mark.parametrize("family,fused_experts", [("llama", False), ("qwen3", False), ("phi3", False),
                                                  ("gemma2", False), ("gemma3_text", False), ("granite", False),
                                                  ("olmo2", False), ("qwen3_moe", False), ("qwen3_moe", True),
                                                  ("mixtral", False), ("gpt_oss", False), ("qwen3_5_text", False),
                                                  ("lfm2", False), ("arcee", False), ("nemotron_h", False)])
def test_lean_saves_keep_gradients_and_save_what_the_estimate_counts(family, fused_experts, tiny_model_dir,
                                                                     monkeypatch):
    """Also an MoE's stacked-expert LoRA, on torch's grouped GEMMs and on the fused Triton path."""
    import fasttune.models.moe as moe

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    if fused_experts:
        monkeypatch.setattr(moe, "EAGER_FUSED_MIN_WORK", 0)
    model = _model(tiny_model_dir(family))
    loss, grads, full = _step(model, lean=False)
    lean_loss, lean_grads, lean = _step(model, lean=True)
    assert torch.equal(lean_loss, loss)
    for n, g in grads.items():
        assert torch.equal(lean_grads[n], g), n
    counted = sum(lean_values(model)) * 2 * 9 * 4  # values a token, per layer, times tokens and fp32 bytes
    assert counted > 0 and full - lean >= counted
    # (Qwen3.5's, LFM2's and Nemotron-H's linear / Mamba mixers rebuild their input norm too, uncounted)
    if family not in ("qwen3_5_text", "lfm2", "nemotron_h"):
        assert full - lean == counted
    if family == "llama":  # both norms' outputs and act(gate) * up; the first layer's input needs no gradient
        h, i = model.arch.hidden_size, model.arch.intermediate_size
        assert lean_values(model) == [h + i, 2 * h + i]


def test_lean_saves_with_dropout_in_bf16_and_over_nf4(tiny_model_dir, monkeypatch):
    """LoRA dropout (the masks kept, the dropped input rebuilt from the rebuilt input), 16-bit activations, and
    NF4 base weights (QLoRA)."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    folder = tiny_model_dir("llama")
    for kwargs in ({"dropout": 0.1}, {"dtype": torch.bfloat16}, {"load_in_4bit": True}):
        model = _model(folder, **kwargs)
        model.train()
        loss, grads, full = _step(model, lean=False)
        lean_loss, lean_grads, lean = _step(model, lean=True)
        assert torch.equal(lean_loss, loss) and lean < full, kwargs
        for n, g in grads.items():
            assert torch.equal(lean_grads[n], g), (kwargs, n)


@pytest.mark.parametrize("gc", [True, "offload"])
def test_only_layers_that_keep_their_activations_rebuild(gc, tiny_model_dir, monkeypatch):
    """A recomputed layer's re-run (inside backward) keeps what it kept without lean saves; with the first of two
    layers recomputed, the saves (re-runs included) fall by the kept second layer's count alone. Gradients stay
    bitwise."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    model = _model(tiny_model_dir("llama"), gc=gc)
    _, grads, full = _step(model, lean=False, through_backward=True)
    _, lean_grads, lean = _step(model, lean=True, through_backward=True)
    assert full == lean
    model.recompute_layers = 1
    _, _, partial = _step(model, lean=False, through_backward=True)
    _, partial_grads, partial_lean = _step(model, lean=True, through_backward=True)
    assert lean_values(model)[1] > 0 and partial - partial_lean == lean_values(model)[1] * 2 * 9 * 4
    for n, g in grads.items():
        assert torch.equal(lean_grads[n], g) and torch.equal(partial_grads[n], g), n


def test_torch_path_and_generation_mark_nothing(tiny_model_dir, monkeypatch):
    """The torch reference path has no rebuild; without autograd, or for an output needing no gradient (whose
    norm keeps nothing), nothing is marked."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    from fasttune.kernels.activations import gated_act
    from fasttune.kernels.rmsnorm import add_rms_norm

    x, w = torch.randn(3, 8, requires_grad=True), torch.ones(8)
    with rebuild.lean_saves():
        _, y = add_rms_norm(x, None, w, 1e-6)
        assert rebuild.rebuild_of(y) is not None
        fn, sources = rebuild.rebuild_of(y)
        assert torch.equal(rebuild.rebuilt(fn, sources), y)
        with torch.no_grad():
            assert rebuild.rebuild_of(add_rms_norm(x, None, w, 1e-6)[1]) is None
        assert rebuild.rebuild_of(add_rms_norm(x.detach(), None, w, 1e-6)[1]) is None
        g, u = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16)
        a = gated_act(g, u, "silu")
        assert torch.equal(rebuild.rebuilt(*rebuild.rebuild_of(a)), a)
    assert rebuild.rebuild_of(add_rms_norm(x, None, w, 1e-6)[1]) is None  # lean saves off
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    with rebuild.lean_saves():
        assert rebuild.rebuild_of(add_rms_norm(x, None, w, 1e-6)[1]) is None


def test_lean_saves_setting_is_checked(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    assert model.lean_saves is False
    with pytest.raises(ConfigError, match="lean_saves='yes'"):
        model.lean_saves = "yes"


def test_training_with_lean_saves_is_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    """Through the trainer (gradient accumulation, clipping, AdamW), lean saves give the same loss curve bitwise."""
    from fasttune import SFTConfig, SFTTrainer

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    folder = tiny_model_dir("llama")
    curves = []
    for lean in (False, True):
        model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, random_state=1)
        model.lean_saves = lean
        rows = [{"text": f"row {i} " + "abc " * (1 + i % 3)} for i in range(8)]
        trainer = SFTTrainer(model, tok, train_dataset=rows,
                             args=SFTConfig(output_dir=str(tmp_path / f"o{lean}"), max_steps=2, report_to="none",
                                            per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                            learning_rate=1e-2, logging_steps=1, seed=0))
        trainer.train()
        curves.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(curves[0]) == 2 and all(0 < v < 100 for v in curves[0]) and curves[0] == curves[1]
