"""GLM-4.7-Flash (transformers' Glm4MoeLiteForCausalLM) and DeepSeek-V3 (DeepseekV3ForCausalLM: Kimi K2, Moonlight)
on our decoder: multi-head latent attention (models/mla.py) with DeepSeek-V3's MoE (GLM-4.5's). Against transformers
and PEFT on tests/tiny.py's models (3 layers; q latent 24, kv latent 32, 12 unrotated + 8 rotated query/key channels,
16 value channels, interleaved RoPE; DeepSeek-V3's with yarn RoPE and two dense layers)."""
import pytest
import torch
from peft_oracle import (assert_grads_close, check_logits_generation_and_merged, check_recompute_gradients,
                         moe_adapter_grads)
from tiny import hf_config, hf_model, saved_pair

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.models.config import ModelConfig


def _pair(folder, tokenizer, family="glm4_moe_lite", **overrides):
    return saved_pair(family, folder, tokenizer, **overrides)


@pytest.fixture
def pair(tmp_path, tiny_tokenizer):
    return _pair(tmp_path / "m", tiny_tokenizer)


FAMILIES = ["glm4_moe_lite", "deepseek_v3", "deepseek_v2", "mistral4"]


def test_fields():
    arch = ModelConfig.from_hf(hf_config("glm4_moe_lite"))
    assert (arch.kv_lora_rank, arch.q_lora_rank, arch.qk_nope_head_dim, arch.head_dim, arch.v_head_dim) == \
        (32, 24, 12, 8, 16)
    assert arch.num_kv_heads == 4 and arch.rope_interleaved and arch.rotary_dim == 8 and arch.value_dim == 16
    assert arch.scaling == pytest.approx(20 ** -0.5)
    assert arch.moe_layers == [False, True, True] and arch.router_scoring == "sigmoid" and not arch.shared_expert_gated
    # yarn's mscale(factor, mscale_all_dim) squared joins the score scale (transformers' yarn_apply_mscale)
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 64}
    assert ModelConfig.from_hf(hf_config("glm4_moe_lite", rope_parameters=yarn)).scaling == \
        pytest.approx(20 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    deepseek = ModelConfig.from_hf(hf_config("deepseek_v3"))  # first_k_dense_replace=2; yarn factor 4
    assert deepseek.moe_layers == [False, False, True] and deepseek.kv_lora_rank == 32
    assert deepseek.scaling == pytest.approx(20 ** -0.5 * (0.1 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)
    with pytest.raises(ModelLoadError, match="mlp_layer_types .* 'dense' or 'sparse'"):
        ModelConfig.from_hf(hf_config("glm4_moe_lite", mlp_layer_types=["dense", "moe", "sparse"]))
    with pytest.raises(ModelLoadError, match="kv_lora_rank, qk_nope_head_dim and v_head_dim"):
        ModelConfig.from_hf(hf_config("glm4_moe_lite", kv_lora_rank=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_generation_and_merged_equal_transformers(family, tmp_path, tiny_tokenizer):
    check_logits_generation_and_merged(*_pair(tmp_path / "m", tiny_tokenizer, family), 20, tmp_path)


@pytest.mark.parametrize("overrides", [{"q_lora_rank": None}, {"rope_interleave": False}],
                         ids=["q_proj", "rotate_half"])
def test_variants_equal_transformers(overrides, tmp_path, tiny_tokenizer):
    """DeepSeek-V2-Lite's single q_proj (no query latent), and RoPE on halves instead of adjacent pairs."""
    hf, model = _pair(tmp_path / "m", tiny_tokenizer, **overrides)
    assert hasattr(model.model.layers[0].self_attn, "q_proj") == (overrides.get("q_lora_rank", 1) is None)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = hf(input_ids=ids).logits, model(ids).logits
    assert ((ref - got).abs().max() / ref.abs().max()).item() < 1e-5


def test_packed_documents_equal_separate_rows(pair):
    """Two documents packed in one row (positions restarting at 0) give each document's own logits."""
    _, model = pair
    a, b = torch.randint(3, 300, (1, 7)), torch.randint(3, 300, (1, 9))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), position_ids=positions).logits
        torch.testing.assert_close(packed[:, :7], model(a).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[:, 7:], model(b).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_equals_peft(family, tmp_path, tiny_tokenizer):
    """The default targets: the latent attention's projections (PEFT has no default for this family), the routed
    experts (gate + up as one rank-2r LoRA) and the MLP names, which PEFT maps as Qwen2-MoE to the experts (the
    shared experts and the dense layers stay frozen) except on Mistral 4. PEFT builds the same adapter from the saved
    files and its gradients equal ours."""
    _, model = _pair(tmp_path / "m", tiny_tokenizer, family)
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert set(ours.lora_settings.target_modules) >= {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                      "o_proj"}
    assert ours.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads(family, ours, tmp_path)
    assert mine.keys() == theirs.keys()
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert any(f".self_attn.{name}.lora_A" in n for n in mine), name
    assert any(".mlp.experts.lora_A" in n for n in mine)
    # PEFT maps the MLP names to the routed experts as Qwen2-MoE's for all but Mistral 4 (transformers has no
    # conversion pattern for it): there they name the shared experts and the dense layer's MLP, as in PEFT
    dense_adapted = any("shared_experts." in n or "layers.0.mlp." in n for n in mine)
    assert dense_adapted == (family == "mistral4")
    assert_grads_close(mine, theirs)


def test_recompute_and_offload_gradients_equal(tmp_path, tiny_tokenizer):
    hf_model("glm4_moe_lite").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    check_recompute_gradients(tmp_path / "m")


@pytest.mark.parametrize("family, overrides", [("glm4_moe_lite", {}), ("deepseek_v3", {}),
                                               ("deepseek_v2", {"topk_method": "greedy"}),
                                               ("glm4_moe_lite", {"rope_interleave": False}), ("mistral4", {})],
                         ids=["glm4_moe_lite", "deepseek_v3-yarn", "deepseek_v2-greedy", "rotate_half", "mistral4"])
def test_gguf_logits_equal_llama_cpp(family, overrides, tmp_path):
    """llama.cpp's deepseek2 (attention over the latent, kv_b_proj split into attn_k_b / attn_v_b, sigmoid routing
    with groups, or DeepSeek-V2's greedy softmax, leading dense layers; yarn's log multiplier; a rotate-half
    checkpoint's rows put in adjacent pairs): f16 logits of the LoRA-merged model within the MoE families' bound."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_check import PROMPTS, compare_logits, lora_merged_gguf

    model, tok, path, reader = lora_merged_gguf(family, tmp_path, **overrides)
    arch = "mistral4" if family == "mistral4" else "deepseek2"  # (mistral4: deepseek2's graph under its own name)
    field = lambda k: reader.fields[k.replace("ARCH", arch)].contents()  # noqa: E731
    assert field("general.architecture") == arch and field("ARCH.attention.head_count_kv") == 1
    assert field("ARCH.attention.key_length") == 32 + 8 and field("ARCH.attention.value_length") == 32
    assert field("ARCH.attention.key_length_mla") == 20 and field("ARCH.attention.value_length_mla") == 16
    assert field("ARCH.leading_dense_block_count") == (2 if family == "deepseek_v3" else 1)
    yarn = reader.fields.get(f"{arch}.rope.scaling.yarn_log_multiplier")
    assert (yarn is not None) == (family in ("deepseek_v3", "mistral4"))
    assert yarn is None or yarn.contents() == pytest.approx(0.1)
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.1.attn_k_b.weight"] == [12, 32, 4] and shapes["blk.1.attn_v_b.weight"] == [32, 16, 4]
    if family in ("deepseek_v2", "mistral4"):  # softmax gating; V2's not renormalised
        assert field("ARCH.expert_gating_func") == 1 and field("ARCH.expert_weights_norm") is (family == "mistral4")
        assert field("ARCH.expert_weights_scale") == pytest.approx(2.5)
    rel, top1, _ = compare_logits(model, tok, path, PROMPTS)
    assert rel < 2e-3 and top1 >= 1.0


def test_gguf_without_a_query_latent_is_refused(tmp_path, tiny_tokenizer):
    """llama.cpp reads a single q_proj only for DeepSeek-V2-Lite's layer count: a clear error and no file."""
    _, model = _pair(tmp_path / "m", tiny_tokenizer, q_lora_rank=None)
    with pytest.raises(ConfigError, match="q_lora_rank is None.*DeepSeek-V2-Lite"):
        model.save_pretrained_gguf(tmp_path / "m.gguf", tiny_tokenizer)
    assert not list(tmp_path.glob("*.gguf"))


def test_fastmodel_switches_name_the_latent_projections(pair):
    """FastModel's attention switch picks the latent attention's projections and o_proj (there is no k_proj /
    v_proj to name)."""
    from fasttune import FastModel

    _, model = pair
    attention = FastModel.get_peft_model(model, r=4, finetune_mlp_modules=False, use_gradient_checkpointing=False)
    assert set(attention.lora_settings.target_modules) == {"o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                           "kv_b_proj"}
    trained = {n.split(".self_attn.")[1].split(".")[0] for n, p in attention.named_parameters()
               if p.requires_grad and ".self_attn." in n}
    assert trained == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}


def test_generation_caches_the_latent_and_applies_the_adapter(pair, tmp_path):
    """The KV cache holds one latent + rotated key per position (kv_lora_rank + head_dim channels, no values), as
    transformers' does; decoding attends over it with kv_b_proj's key and value blocks absorbed, LoRA on kv_b_proj
    included: greedy tokens equal the merged checkpoint's in transformers."""
    from transformers import AutoModelForCausalLM

    from fasttune.models.kv_cache import KVCache
    from peft_oracle import randomize_lora_b

    _, model = pair
    cache = KVCache(model.arch, 2, 10, torch.float32, "cpu")
    assert cache.keys[0].shape == (2, 1, 10, 32 + 8) and cache.values[0].numel() == 0
    lora = FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear", use_gradient_checkpointing=False)
    randomize_lora_b(lora, seed=3)
    prompt = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(8))
    ours = lora.generate(prompt, max_new_tokens=10, do_sample=False)
    lora.save_pretrained_merged(tmp_path / "merged", save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.equal(ours, merged.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0))


def test_nf4_trains_and_decodes_over_the_latent(tmp_path, tiny_tokenizer):
    """load_in_4bit quantises the latent projections too; the absorbed decode reads kv_b_proj dequantised (plus the
    LoRA update), so cached decoding gives the tokens a full re-run of the prefix picks."""
    from fasttune.models.mla import effective_weight

    hf_model("glm4_moe_lite", hidden_size=128, intermediate_size=128, moe_intermediate_size=64).save_pretrained(
        tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), load_in_4bit=True)
    attn = model.model.layers[1].self_attn
    assert type(attn.kv_b_proj).__name__ == "QuantLinear" and type(attn.q_a_proj).__name__ == "QuantLinear"
    lora = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = lora(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    kv_b = lora.model.layers[1].self_attn.kv_b_proj
    want = kv_b.base_layer.dequantized_weight(torch.float32) + kv_b.delta_weight()
    torch.testing.assert_close(effective_weight(kv_b, torch.float32), want)
    lora.eval()
    prompt = ids[:1, :6]
    out = lora.generate(prompt, max_new_tokens=5, do_sample=False)
    with torch.no_grad():  # greedy by re-running the whole prefix, no cache
        seq = prompt
        for _ in range(5):
            seq = torch.cat([seq, lora(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_dora_on_kv_b_proj_decodes_as_a_full_rerun(pair):
    """A DoRA update on kv_b_proj cannot be applied factored: it is merged into the absorbed blocks (effective_weight),
    and cached decoding picks the tokens a full re-run of the prefix picks."""
    from peft_oracle import randomize_lora_b

    _, model = pair
    dora = FastLanguageModel.get_peft_model(model, r=4, target_modules=["kv_b_proj"], use_dora=True,
                                            use_gradient_checkpointing=False)
    randomize_lora_b(dora, seed=2)
    dora.eval()
    prompt = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(4))
    out = dora.generate(prompt, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, dora(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_gguf_of_deepseek_v2_group_limited_routing_is_refused(tmp_path, tiny_tokenizer):
    """llama.cpp ranks expert groups by their two best scores (DeepSeek-V3's rule); DeepSeek-V2's group-limited
    routing ranks them by the best one, so such a file would route differently (seen: 0.1 of the logits' range)."""
    hf_model("deepseek_v2").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="group_limited_greedy"):
        model.save_pretrained_gguf(tmp_path / "out.gguf", tok, quantization_method="f16", progress=False)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mistral4_routing_equals_transformers_router(dtype):
    """Softmax scores in the logits' dtype, groups ranked by their two best, the top-k renormalised and scaled: the
    experts and weights of transformers' Mistral4TopkRouter, in fp32 and bf16."""
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    from fasttune.models.moe import route_softmax_pairs

    cfg = hf_config("mistral4", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    router = Mistral4TopkRouter(cfg).to(dtype)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits, want_w, want_e = router(x)
    got_w, got_e = route_softmax_pairs(logits, 3, (4, 2), True, 2.5)
    order_w, order_g = want_e.sort(dim=-1).indices, got_e.sort(dim=-1).indices
    assert torch.equal(want_e.gather(1, order_w), got_e.gather(1, order_g))
    assert torch.equal(want_w.gather(1, order_w).float(), got_w.gather(1, order_g)) and got_w.dtype == torch.float32


def test_routing_keeps_no_reference_to_its_inputs():
    """Routing functions hold nothing between calls (a cache keyed by the logits would keep every step's logits and
    their autograd graph alive)."""
    import gc
    import weakref

    from fasttune.models.moe import route_sigmoid, route_softmax_grouped, route_softmax_pairs

    calls = [lambda t: route_softmax_grouped(t, 2, (2, 1), 1.0), lambda t: route_softmax_pairs(t, 2, (2, 1), True, 1.0),
             lambda t: route_sigmoid(t, torch.zeros(8), 2, (2, 1), True, 1.0)]
    for call in calls:
        logits = torch.randn(4, 8, requires_grad=True)
        call(logits.exp())  # (ExpBackward keeps its output, whose graph reaches logits)
        ref = weakref.ref(logits)
        del logits
        gc.collect()
        assert ref() is None
