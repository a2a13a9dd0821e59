"""use_gradient_checkpointing="auto": the fastest policy that fits the free memory."""
from types import SimpleNamespace

import pytest
import torch

from fasttune.models.config import ModelConfig
from fasttune.train import memory_policy
from fasttune.train.memory_policy import activation_bytes, choose_checkpointing

LLAMA_8B = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)


def _fake_gpu_model(monkeypatch, free_gib):
    monkeypatch.setattr(memory_policy.torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 0))
    monkeypatch.setattr(memory_policy.torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0,
                        raising=False)
    return SimpleNamespace(arch=LLAMA_8B, dtype=torch.bfloat16, device=torch.device("cuda"))


def test_estimate_matches_the_measured_8b_activations():
    # Measured on an H200 (bench/results/lora_sft_h200.jsonl): 35.7 GiB peak without recompute, ~16 GiB of it
    # weights, at 2 x 2048 tokens. The estimate must be of that order, not a guess off by 2x.
    est = activation_bytes(LLAMA_8B, 4096, 2, recompute=False) / 2**30
    assert 15 < est < 24


def test_moe_estimate_counts_the_expert_rows():
    # Qwen3-30B-A3B shape, expert LoRA, 2 x 2048 tokens, no recompute, measured on an H200: 96.9 GiB peak with
    # ~71.5 GiB of bf16 weights and fp32 LoRA weights, grads and AdamW states, so ~25 GiB of activations. The
    # dense formula (intermediate_size 6144 per token) counted about half of that.
    moe = ModelConfig(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                      num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, moe_layers=[True] * 48)
    est = activation_bytes(moe, 4096, 2, recompute=False) / 2**30
    assert 21 < est < 29
    dense_part = activation_bytes(ModelConfig(**{**moe.__dict__, "num_experts": 0}), 4096, 2, False) / 2**30
    assert dense_part < 0.65 * est
    assert activation_bytes(moe, 4096, 2, recompute=True) / 2**30 < est / 10


def test_picks_no_recompute_when_it_fits(monkeypatch):
    mode, why, layers, _ = choose_checkpointing(_fake_gpu_model(monkeypatch, 60), 4096)
    assert mode is False and "off" in why and layers is None


def test_picks_recompute_when_only_that_fits(monkeypatch):
    monkeypatch.setattr(memory_policy, "OFFLOAD_COST_LAYERS", 100)  # (inputs kept on the GPU)
    mode, why, layers, _ = choose_checkpointing(_fake_gpu_model(monkeypatch, 5), 4096)
    assert mode is True and layers == 31 and "first 31 of 32 layers" in why  # the last layer is never recomputed


def test_offloaded_inputs_let_more_layers_keep_their_activations(monkeypatch):
    """With the recomputed layers' inputs in host memory, fewer layers need recomputing: taken when that spares more
    than OFFLOAD_COST_LAYERS; the estimate counts the two inputs offload still holds on the GPU."""
    from fasttune.train.memory_policy import OFFLOAD_INPUTS_ON_GPU, RESERVE_BYTES, SAFETY, checkpointing_bytes

    mode, why, layers, _ = choose_checkpointing(_fake_gpu_model(monkeypatch, 5), 4096)
    assert mode == "offload" and layers < 31 - memory_policy.OFFLOAD_COST_LAYERS
    assert f"offload for the first {layers} of 32 layers" in why and "inputs in CPU memory" in why
    budget = 5 * 2**30 - RESERVE_BYTES - memory_policy.loss_bytes(LLAMA_8B.vocab_size, 4096)
    inputs = 4096 * 4096 * 2
    assert SAFETY * (checkpointing_bytes(LLAMA_8B, 4096, 2, layers) - (layers - OFFLOAD_INPUTS_ON_GPU) * inputs) \
        <= budget
    assert SAFETY * (checkpointing_bytes(LLAMA_8B, 4096, 2, layers - 1) - (layers - 1 - OFFLOAD_INPUTS_ON_GPU)
                     * inputs) > budget
    # with room for everything, nothing is recomputed or offloaded; CUDA graphs keep the inputs on the GPU
    assert choose_checkpointing(_fake_gpu_model(monkeypatch, 60), 4096)[0] is False
    assert choose_checkpointing(_fake_gpu_model(monkeypatch, 5), 4096, offload_ok=False)[:3:2] == (True, 31)


def test_picks_offload_when_nothing_else_fits(monkeypatch):
    mode, _, _, _ = choose_checkpointing(_fake_gpu_model(monkeypatch, 5), 131072)
    assert mode == "offload"


def test_cpu_keeps_everything(tiny_model_dir):
    from fasttune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert model.gradient_checkpointing == "auto"
    assert choose_checkpointing(model, 100)[0] is False


def test_partial_recompute_estimate_lies_between_the_two_modes():
    from fasttune.train.memory_policy import checkpointing_bytes

    full = [checkpointing_bytes(LLAMA_8B, 4096, 2, n) for n in range(33)]
    assert full[0] == activation_bytes(LLAMA_8B, 4096, 2, recompute=False)
    assert full[32] == activation_bytes(LLAMA_8B, 4096, 2, recompute=True)
    assert all(a > b for a, b in zip(full[:32], full[1:32]))  # each recomputed layer saves memory...
    assert full[32] == full[31] + 4096 * 2 * 4096  # ...but the last: recomputing it only adds its input
    # each layer kept instead of recomputed costs its full set less its input
    per_layer = 4096 * 2 * (6 * 4096 + 2 * 1024 + 3 * 14336 - 4096)
    assert full[10] - full[11] == per_layer


def test_picks_the_fewest_recomputed_layers_that_fit(monkeypatch):
    # between the two modes (8B, 2 x 2048): recompute only part of the layers, and more of them with less memory
    picks = []
    for free in (14, 18, 22):
        mode, why, layers, _ = choose_checkpointing(_fake_gpu_model(monkeypatch, free), 4096)
        assert mode is True and 0 < layers < 32, (free, why)
        assert f"first {layers} of 32 layers" in why
        picks.append(layers)
    assert picks[0] > picks[1] > picks[2]
    # the pick's own estimate fits, and one layer fewer recomputed would not
    from fasttune.train.memory_policy import RESERVE_BYTES, SAFETY, checkpointing_bytes, loss_bytes

    budget = 18 * 2**30 - RESERVE_BYTES - loss_bytes(LLAMA_8B.vocab_size, 4096)
    assert SAFETY * checkpointing_bytes(LLAMA_8B, 4096, 2, picks[1]) <= budget
    assert SAFETY * checkpointing_bytes(LLAMA_8B, 4096, 2, picks[1] - 1) > budget


def test_trainable_states_count_against_the_budget(monkeypatch):
    model = _fake_gpu_model(monkeypatch, 18)
    _, _, plain, _ = choose_checkpointing(model, 4096)
    big = SimpleNamespace(requires_grad=True, grad=None, numel=lambda: 2**28, element_size=lambda: 4)  # 1 GiB of
    model.parameters = lambda: [big]  # fp32, counted, not allocated: 3 GiB of gradient and AdamW states
    _, _, with_states, _ = choose_checkpointing(model, 4096)
    assert with_states > plain


def test_trainer_applies_the_partial_pick(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The trainer resolving "auto" sets the mode and the picked recompute_layers, and says so."""
    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer

    picked = (True, "gradient checkpointing auto -> on for the first 1 of 2", 1, True)
    monkeypatch.setattr(memory_policy, "choose_checkpointing",
                        lambda model, tokens, media=0, lean_ok=True, offload_ok=True: picked)
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    trainer = SFTTrainer(model, tok, train_dataset=[{"text": "abc abc"}] * 4,
                         args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none"))
    trainer.train()
    assert model.gradient_checkpointing is True and model.recompute_layers == 1 and model.lean_saves is True
    assert "on for the first 1 of 2" in capsys.readouterr().err


def test_ranks_agree_on_the_most_memory_saving_pick(monkeypatch):
    from fasttune.train.memory_policy import agreed_pick, peak_estimate

    need, _ = peak_estimate(_fake_gpu_model(monkeypatch, 18), 4096, lean_ok=False)

    def agree(*picks):
        return agreed_pick([(m, n, False) for m, n in picks], 32, need)[:2]

    assert agree((False, None), (True, 5)) == (True, 5)
    assert agree((True, 20), (True, 5), (False, None)) == (True, 20)
    assert agree((True, None), (True, 31)) == (True, 31)  # the last layer's input only adds to the peak
    assert agree((True, 31), ("offload", None), (False, None)) == ("offload", None)
    assert agree((True, 20), ("offload", 20), (True, 5)) == ("offload", 20)  # same count, less memory
    # the pick a poorer rank took because it fits where one layer more with inputs on the GPU does not
    assert need(20, False, True) < need(21, False)
    assert agree((True, 21), ("offload", 20)) == ("offload", 20)


def test_an_explicit_full_recompute_gets_a_hint_when_fewer_layers_fit(monkeypatch):
    from fasttune.train.memory_policy import recompute_hint

    model = _fake_gpu_model(monkeypatch, 60)
    model.recompute_layers = None
    model.gradient_checkpointing = "offload"  # (what the peer's "unsloth" means here)
    hint = recompute_hint(model, 4096)
    assert "recomputes all 32 layers" in hint and "recomputing none of the layers" in hint and "'auto'" in hint
    model = _fake_gpu_model(monkeypatch, 18)
    model.recompute_layers, model.gradient_checkpointing = None, True
    assert "only the first" in recompute_hint(model, 4096)
    model = _fake_gpu_model(monkeypatch, 5)  # little room: fewer with the inputs in host memory
    model.recompute_layers, model.gradient_checkpointing = None, True
    assert "inputs in CPU memory" in recompute_hint(model, 4096)
    assert recompute_hint(model, 131072) is None  # nothing fewer fits
    model = _fake_gpu_model(monkeypatch, 60)
    model.recompute_layers, model.gradient_checkpointing = None, False
    assert recompute_hint(model, 4096) is None  # not recomputing: nothing to say
    model.recompute_layers, model.gradient_checkpointing = 20, True
    assert recompute_hint(model, 4096) is None  # a count chosen already
    monkeypatch.setattr(memory_policy, "lean_values", lambda model: [2 * 4096 + 14336] * 32)
    model = _fake_gpu_model(monkeypatch, 13)
    model.recompute_layers, model.gradient_checkpointing = None, True
    assert "layers with lean saves at 4096 tokens" in recompute_hint(model, 4096)


def _fake_vision_model(monkeypatch, free_gib, tower_trains: bool):
    """The 8B fake with a Qwen2.5-VL-7B-like tower (32 layers of 1,280, MLP 3,420, 2 x 2 merge) that trains or not."""
    from fasttune.models.vision_families import FAMILIES

    model = _fake_gpu_model(monkeypatch, free_gib)
    tower = torch.nn.Linear(2, 2)
    tower.requires_grad_(tower_trains)
    vision = SimpleNamespace(hidden_size=1280, intermediate_size=3420, depth=32, spatial_merge_size=2)
    model.family, model.visual = FAMILIES["qwen2_5_vl"], tower
    model.hf_config = SimpleNamespace(vision_config=vision)
    return model


def test_a_training_tower_counts_its_patches(monkeypatch):
    from fasttune.train.memory_policy import tower_bytes

    model = _fake_vision_model(monkeypatch, 22, tower_trains=True)
    patches = 512 * 4  # 512 image tokens of 2 x 2 merged patches
    per_layer = patches * (6 * 1280 + 3 * 3420) * 2
    assert tower_bytes(model, 512, 2, recompute=False) == 32 * per_layer
    assert tower_bytes(model, 512, 2, recompute=True) == 32 * patches * 1280 * 2 + per_layer
    assert tower_bytes(_fake_vision_model(monkeypatch, 22, tower_trains=False), 512, 2, False) == 0  # frozen: none
    assert tower_bytes(model, 0, 2, False) == 0
    # the pick recomputes more layers when a training tower's images come along
    _, _, without, _ = choose_checkpointing(model, 4096)
    _, _, with_images, _ = choose_checkpointing(model, 4096, media_tokens=2048)
    assert without is not None and with_images > without


def test_media_tokens_of_the_longest_examples():
    from fasttune.train.memory_policy import most_media_tokens

    proc = SimpleNamespace(image_token_ids={7, 8})
    examples = [{"input_ids": [1, 7, 7, 2]}, {"input_ids": [7] * 5 + [1] * 10}, {"prompt_ids": [8, 8, 1],
                                                                                  "chosen_ids": [1]}]
    assert most_media_tokens(examples, proc) == 5
    assert most_media_tokens(examples[2:], proc) == 4  # a pair: two rows with the prompt's images
    assert most_media_tokens(examples, SimpleNamespace()) == 0  # a text tokenizer


@pytest.mark.parametrize("heads, state, head_dim, groups", [(16, 64, 32, 1), (64, 128, 64, 1), (32, 128, 80, 8)])
def test_mamba_layer_count_matches_its_saved_tensors(heads, state, head_dim, groups):
    """The estimate of a Mamba-2 mixer's saved values (Granite 4.0: 64 heads of 64, state 128, one group; Nemotron
    Nano 2's heads of 80 in 8 groups) is at least what autograd keeps for one bf16 forward (each storage once,
    parameters not counted), and at most 1.3x it (an overestimate only picks recompute sooner)."""
    from fasttune.models.config import ModelConfig
    from fasttune.models.mamba2 import Mamba2Mixer
    from fasttune.train.memory_policy import _mamba_values

    hidden = heads * head_dim // 2
    cfg = ModelConfig.from_hf(dict(model_type="granitemoehybrid", vocab_size=300, hidden_size=hidden,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   shared_intermediate_size=64, num_local_experts=0, layer_types=["mamba"],
                                   mamba_n_heads=heads, mamba_d_head=head_dim, mamba_d_state=state, mamba_expand=2,
                                   mamba_n_groups=groups))
    mixer = Mamba2Mixer(cfg, 0).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in mixer.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, 256, hidden, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer(x, None, None, {})
    measured = sum(saved.values()) / 256 / 2
    assert 1.0 <= _mamba_values(cfg) / measured < 1.3, (_mamba_values(cfg), measured)


def test_lean_saves_when_they_spare_recomputed_layers(monkeypatch):
    """Where no recompute fits only with lean saves, "auto" takes them; with less memory, lean saves let fewer layers
    be recomputed than without; with plenty, they stay off (they cost a pass in backward), and so they do where
    they would spare fewer than LEAN_COST_LAYERS recomputed layers."""
    from fasttune.train.memory_policy import RESERVE_BYTES, SAFETY, checkpointing_bytes, loss_bytes

    lean = [2 * 4096 + 14336] * 32
    monkeypatch.setattr(memory_policy, "lean_values", lambda model: lean)
    fixed = loss_bytes(LLAMA_8B.vocab_size, 4096) + RESERVE_BYTES
    plain, lean_need = (SAFETY * checkpointing_bytes(LLAMA_8B, 4096, 2, 0, saved) + fixed for saved in (None, lean))
    mode, why, layers, on = choose_checkpointing(_fake_gpu_model(monkeypatch, (plain + lean_need) / 2 / 2**30), 4096)
    assert mode is False and layers is None and on and "with lean saves" in why
    assert choose_checkpointing(_fake_gpu_model(monkeypatch, plain / 2**30 + 0.1), 4096)[3] is False
    mode, _, with_lean, on = choose_checkpointing(_fake_gpu_model(monkeypatch, 13), 4096)
    monkeypatch.setattr(memory_policy, "lean_values", lambda model: [0] * 32)
    _, _, without, off = choose_checkpointing(_fake_gpu_model(monkeypatch, 13), 4096)
    assert mode is True and on and not off and with_lean <= without - memory_policy.LEAN_COST_LAYERS
    monkeypatch.setattr(memory_policy, "lean_values", lambda model: lean)
    one_layer = (SAFETY * checkpointing_bytes(LLAMA_8B, 4096, 2, 1) + fixed) / 2**30  # plain fits recomputing one
    assert SAFETY * checkpointing_bytes(LLAMA_8B, 4096, 2, 0, lean) + fixed <= one_layer * 2**30  # lean fits none
    mode, _, layers, on = choose_checkpointing(_fake_gpu_model(monkeypatch, one_layer + 0.01), 4096)
    assert mode is True and layers == 1 and not on


def test_no_lean_saves_when_not_allowed(monkeypatch):
    """lean_ok=False (FSDP: the trainer passes it) recomputes instead."""
    monkeypatch.setattr(memory_policy, "lean_values", lambda model: [2 * 4096 + 14336] * 32)
    assert choose_checkpointing(_fake_gpu_model(monkeypatch, 13), 4096)[3] is True
    mode, _, _, lean = choose_checkpointing(_fake_gpu_model(monkeypatch, 13), 4096, lean_ok=False)
    assert mode is True and lean is False
    mode, _, _, lean = choose_checkpointing(_fake_gpu_model(monkeypatch, 5), 131072)
    assert mode == "offload" and lean is False  # (the fallback leaves them off: little gain at a re-run's peak)


def test_a_per_process_memory_cap_counts(monkeypatch):
    """A cap set with torch.cuda.set_per_process_memory_fraction is what the process may fill, not the card."""
    from fasttune.train.memory_policy import free_bytes

    cuda = memory_policy.torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (60 * 2**30, 80 * 2**30))
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 10 * 2**30)
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    assert free_bytes(torch.device("cuda")) == 60 * 2**30
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 0.25, raising=False)
    assert free_bytes(torch.device("cuda")) == 10 * 2**30  # 20 GiB of the card, 10 of them allocated
    model = SimpleNamespace(arch=LLAMA_8B, dtype=torch.bfloat16, device=torch.device("cuda"))
    assert choose_checkpointing(model, 4096)[0] is not False  # the 60 GiB free would have kept everything


def test_trainer_lean_saves_setting(tiny_model_dir, tmp_path, monkeypatch):
    """SFTConfig(lean_saves=True / False) forces lean saves on or off, whatever "auto" would pick (and False keeps
    the pick from counting on them); None lets "auto" decide; True with FSDP is refused."""
    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
    from fasttune.errors import ConfigError

    seen = []

    def pick(model, tokens, media=0, lean_ok=True, offload_ok=True):
        seen.append(lean_ok)
        return True, "gradient checkpointing auto -> on for the first 1 of 2", 1, lean_ok

    monkeypatch.setattr(memory_policy, "choose_checkpointing", pick)
    for forced, gc in ((True, False), (False, "auto"), (None, "auto")):
        model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=gc)
        SFTTrainer(model, tok, train_dataset=[{"text": "abc abc"}] * 4,
                   args=SFTConfig(output_dir=str(tmp_path / f"o{forced}"), max_steps=1, report_to="none",
                                  lean_saves=forced)).train()
        assert model.lean_saves is (forced is not False)
    assert seen == [False, True]  # ("auto" runs twice: forced off, then free to choose)
    with pytest.raises(ConfigError, match="lean_saves=True with fsdp=True"):
        SFTConfig(output_dir="o", lean_saves=True, fsdp=True)
