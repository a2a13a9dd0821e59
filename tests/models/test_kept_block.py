""""offload" keeps each layer's q/k/v and post-attention residual (models/kept_block.py): the recompute skips the
attention block's projections and the gradients stay bit-equal to recomputing everything."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.models.offload import LayerInputOffloader


@pytest.fixture
def block_keepers(instances_of):
    """The BlockKeepers made during a test (one per forward pass that keeps the block)."""
    from fasttune.models.kept_block import BlockKeeper

    return instances_of(BlockKeeper)


def _grads(model, mode, ids, mask=None):
    model.gradient_checkpointing = mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same LoRA dropout masks in every mode
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora(tiny_model_dir, family, dropout=0.0):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=dropout)
    model.train()
    randomize_lora_b(model)
    return model


def test_recompute_skips_attention_projections(tiny_model_dir, block_keepers, monkeypatch):
    """Through the fused LoRA path (where projections can skip their base GEMM): the recompute reads only gate/up's
    base weights (q/k/v/o from the kept block, down_proj's output unused), every layer replays, and the gradients
    (LoRA dropout on, so the recompute must draw the forward's masks) equal plain recompute bit for bit."""
    import fasttune.kernels.lora as lora_mod

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    model = _lora(tiny_model_dir, "llama", dropout=0.1)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    ref = _grads(model, True, ids)
    assert block_keepers == []  # on-device recompute keeps nothing
    reads, real = [], lora_mod._base_weight
    monkeypatch.setattr(lora_mod, "_base_weight", lambda layer, dtype: reads.append(1) or real(layer, dtype))
    got = _grads(model, "offload", ids)
    layers = model.arch.num_layers
    # forward, recompute (gate and up only), backward; the first layer's q/k/v give no d(input) (a frozen embedding)
    assert len(reads) == layers * (7 + 2 + 7) - 3
    assert [k.replays for k in block_keepers] == [layers] and not block_keepers[0].records
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


@pytest.mark.parametrize("family,kept", [("llama", True), ("mixtral", True), ("smollm3", True), ("qwen3", False),
                                         ("gemma2", False), ("olmo3", False), ("granite", True),
                                         ("ernie4_5", True), ("glm4", False),
                                         ("hunyuan_v1_dense", False), ("arcee", True),
                                         ("apertus", False)])
def test_offload_equals_recompute(tiny_model_dir, block_keepers, family, kept):
    """Dense and MoE layers (and SmolLM3's NoPE layer, whose kept q/k are unrotated, Granite's scaled residuals and
    Ernie 4.5's reordered q/k) keep their block; q/k norms (Qwen3) and sandwich or post norms (Gemma 2, OLMo 3) read
    the values a kept block would skip, so those layers recompute everything and the forward pass sets no block aside
    for them. Left padding (a masked attention, not
    kept by kept_attention) still takes the kept q/k/v. Gradients bit-equal to plain recompute either way."""
    model = _lora(tiny_model_dir, family)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ref = _grads(model, True, ids, mask)
    got = _grads(model, "offload", ids, mask)
    replays = [k.replays for k in block_keepers]
    assert replays == ([model.arch.num_layers] if kept else [])  # no layer keeps: no keeper, no host room taken
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_block_needs_attention_outputs_and_host_room():
    """keep_block only joins kept attention outputs, and only when the host budget holds the block beside every
    layer's input (which are saved later, from the same budget)."""
    store = LayerInputOffloader(torch.device("cpu"), offload=False)
    assert not store.keep_block(4, 10, 30)  # no kept attention outputs
    store = LayerInputOffloader(torch.device("cpu"), offload=False)
    store.side, store.host_left = object(), 4 * (10 + 20 + 30) - 1  # as if offloading on a GPU
    assert store.keep_attention(4, 10, 20)
    assert not store.keep_block(4, 10, 30)  # one byte short
    store = LayerInputOffloader(torch.device("cpu"), offload=False)
    store.side, store.host_left = object(), 4 * (10 + 20 + 30)
    assert store.keep_attention(4, 10, 20) and store.keep_block(4, 10, 30)
    assert store.host_left == 4 * 10  # what is left is the layer inputs' share


def test_block_kept_only_where_its_copies_hide_under_the_arithmetic():
    """The measured case: Llama-3.1-8B's shape at 2,048 tokens a row became copy-bound with the block kept, at
    32,768 it gained; an MoE layer counts its top-k experts' arithmetic."""
    from transformers import LlamaConfig, MixtralConfig

    from fasttune.models.config import ModelConfig
    from fasttune.models.kept_block import block_pays

    llama = ModelConfig.from_hf(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=8))
    assert not block_pays(llama, 2048, 2) and block_pays(llama, 32768, 2)
    mixtral = ModelConfig.from_hf(MixtralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                                num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2))
    assert block_pays(mixtral, 2048, 2)  # two experts' MLPs a token: twice the dense arithmetic


def test_host_pool_reuses_a_buffer_among_other_sizes():
    """A pooled buffer is found among idle ones of other sizes (list.remove compared tensors elementwise), and is
    handed out only after the copy that last read it is done (the host waits then, not in backward)."""
    from fasttune.models.offload import _HostPool

    class Copy:  # stands for the torch.cuda.Event that load() returns a buffer with
        waited = False

        def synchronize(self):
            self.waited = True

    pool, copy = _HostPool(), Copy()
    big, fit = torch.empty(100, dtype=torch.uint8), torch.empty(50, dtype=torch.uint8)
    pool.put(big)
    pool.put(fit, copy)
    assert pool.get(48) is fit and copy.waited
    assert len(pool.idle) == 1 and pool.idle[0][0] is big
