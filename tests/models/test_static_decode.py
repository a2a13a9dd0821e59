"""The fixed-shape decode step (models/static_decode.py): its logits equal one forward over the whole sequence (left
padding, sliding windows, softcapping, Gemma 3's two RoPE bases); generate() prefills identical prompts once and
its deferred stop checks give the output of checking every token. The CUDA-graph replay is tested in tests/gpu."""
import os

import pytest
import torch
from tiny import hf_model, save_hf

import fasttune.generate as gen
from fasttune.kernels.decode_attention import decode_attention
from fasttune.models import self_attention, static_decode
from fasttune.models.kv_cache import KVCache
from fasttune.models.loading import load_model
from fasttune.models.static_decode import DecodeStep, graphs_wanted


def _ours(family, tmp_path, **overrides):
    return load_model(save_hf(hf_model(family, **overrides), tmp_path / family), torch.float32, "cpu")[0]


def _batch(rows=3, width=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family,overrides,bucket,kernels", [
    ("llama", {}, 256, "torch"), ("gemma2", {}, 256, "torch"), ("gemma3_text", {}, 256, "torch"),
    ("mistral", {"sliding_window": 3}, 256, "torch"),
    ("llama", {}, 4, "torch"), ("mistral", {"sliding_window": 3}, 4, "torch"),  # 4: steps cross KV buckets
    # the fused decode attention (kernels/decode_attention.py): KV buckets crossed, a sliding window; Gemma 3's two
    # RoPE bases and q/k norms
    ("mistral", {"sliding_window": 3}, 4, "triton"), ("gemma3_text", {}, 256, "triton")])
def test_decode_steps_equal_a_full_forward(family, overrides, bucket, kernels, tmp_path, monkeypatch):
    if kernels == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    monkeypatch.setattr(static_decode, "KV_BUCKET", bucket)
    fused = []
    monkeypatch.setattr(self_attention, "decode_attention", lambda *a, **k: fused.append(1) or decode_attention(*a, **k))
    ours = _ours(family, tmp_path, **overrides)
    ids, mask = _batch()
    extra = torch.randint(3, 300, (3, 6), generator=torch.Generator().manual_seed(1))
    full_ids, full_mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = ours(full_ids, attention_mask=full_mask, position_ids=positions).logits
        cache = KVCache(ours.arch, 3, full_ids.shape[1] + 2, torch.float32, "cpu")  # spare slots stay masked
        got = [ours(ids, attention_mask=mask, position_ids=positions[:, :7], past_key_values=cache).logits[:, -1]]
        cache.start_decoding()
        key_mask = torch.cat([full_mask, torch.ones(3, 2, dtype=torch.long)], 1)
        step = DecodeStep(ours, cache, key_mask, graph=False)
        for i in range(7, full_ids.shape[1]):
            got.append(step(full_ids[:, i:i + 1], positions[:, i:i + 1]))
    torch.testing.assert_close(torch.stack(got, 1), ref[:, 6:], rtol=1e-5, atol=1e-5)
    assert int(cache.slot) == full_ids.shape[1]
    assert len(fused) == (6 * ours.arch.num_layers if kernels == "triton" else 0)
    step(full_ids[:, :1], positions[:, :1])
    step(full_ids[:, :1], positions[:, :1])
    with pytest.raises(ValueError, match="holds 15 positions"):
        step(full_ids[:, :1], positions[:, :1])


def test_graphs_only_on_cuda_and_not_for_fp32_moe(tmp_path, monkeypatch):
    ours = _ours("llama", tmp_path)
    assert not graphs_wanted(ours, torch.device("cpu"))
    assert graphs_wanted(ours, torch.device("cuda"))
    monkeypatch.setenv("FASTTUNE_CUDA_GRAPHS", "0")
    assert not graphs_wanted(ours, torch.device("cuda"))
    monkeypatch.delenv("FASTTUNE_CUDA_GRAPHS")
    ours.arch.num_experts = 4  # fp32 experts take the padded-bmm path, which sizes its groups on the host
    assert not graphs_wanted(ours, torch.device("cuda"))  # (bf16 MoE decode graphs: tests/gpu/test_gpu_generate.py)


def test_identical_prompts_are_prefilled_once(tmp_path):
    ours = _ours("llama", tmp_path)
    ids, mask = _batch()
    rows = torch.tensor([0, 1, 0, 2, 1, 0])
    batches = []
    hook = ours.model.embed_tokens.register_forward_hook(lambda m, a, out: batches.append(out.shape[:2]))
    try:
        got = ours.generate(ids[rows], mask[rows], max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    finally:
        hook.remove()
    assert batches[0] == (3, 7) and all(b == (6, 1) for b in batches[1:])
    alone = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, alone[rows])
    # sampled copies of one prompt still draw their own tokens
    out = ours.generate(ids[:1].repeat(4, 1), mask[:1].repeat(4, 1), do_sample=True, temperature=3.0, top_k=0,
                        max_new_tokens=8, eos_token_id=[], seed=0)
    assert len({tuple(r) for r in out[:, 7:].tolist()}) > 1


def test_deferred_stop_checks_give_the_same_output(tmp_path, monkeypatch):
    """Checking the stop state every 4 tokens (as on CUDA every CHECK_EVERY) ends where checking every token
    ends: rows that stopped show padding, the output is cut at the step where the last row stopped."""
    ours = _ours("llama", tmp_path)
    ids, mask = _batch(rows=4)
    kw = dict(do_sample=True, temperature=2.0, top_k=0, max_new_tokens=30, pad_token_id=0, seed=5,
              output_scores=True, return_dict_in_generate=True)
    stops = sorted({int(t) for t in ours.generate(ids, mask, max_new_tokens=30, do_sample=True, temperature=2.0,
                                                  top_k=0, eos_token_id=[], seed=5)[:, 7:12].flatten()})[:6]
    assert gen._stop_check_interval(torch.device("cuda"), False) == gen.CHECK_EVERY
    assert gen._stop_check_interval(torch.device("cuda"), True) == 1  # a streamer reads every token anyway
    every = ours.generate(ids, mask, eos_token_id=stops, **kw)
    assert 7 < every.sequences.shape[1] < 37  # every row stopped early, at different steps
    monkeypatch.setattr(gen, "_stop_check_interval", lambda device, host_per_token: 4)
    deferred = ours.generate(ids, mask, eos_token_id=stops, **kw)
    assert torch.equal(deferred.sequences, every.sequences)
    assert len(deferred.scores) == len(every.scores) == every.sequences.shape[1] - 7


def test_the_decode_session_is_kept_between_calls_and_renewed_when_it_must(tmp_path):
    """generate() keeps its KV cache (and on CUDA its graphs) for the next call of the same batch size: a shorter
    prompt after a longer one sees nothing of the first call's keys; a longer total, a changed adapter switch, a
    replaced weight or model.train() renew or free it."""
    ours = _ours("llama", tmp_path).eval()  # as from_pretrained hands it over
    fresh = _ours("llama", tmp_path).eval()
    ids, mask = _batch()
    kw = dict(max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    ours.generate(ids, mask, **kw)
    session = static_decode._SESSIONS[ours]
    assert session.capacity == static_decode.KV_BUCKET
    short = ours.generate(ids[:, 3:], mask[:, 3:], **kw)
    assert static_decode._SESSIONS[ours] is session
    assert torch.equal(short, fresh.generate(ids[:, 3:], mask[:, 3:], **kw))
    ours.generate(ids, mask, max_new_tokens=static_decode.KV_BUCKET, eos_token_id=[], pad_token_id=0)
    assert static_decode._SESSIONS[ours].capacity == 2 * static_decode.KV_BUCKET
    session = static_decode._SESSIONS[ours]
    ours.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(ours.model.layers[0].mlp.up_proj.weight * 1.5)
    fresh.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(fresh.model.layers[0].mlp.up_proj.weight * 1.5)
    assert torch.equal(ours.generate(ids, mask, **kw), fresh.generate(ids, mask, **kw))
    assert static_decode._SESSIONS[ours] is not session
    ours.train()
    assert ours not in static_decode._SESSIONS
    ours.generate(ids, mask, **kw)  # called in training mode (GRPO's rollouts): nothing is kept
    assert ours not in static_decode._SESSIONS and ours.training


def test_graph_state_sees_adapter_switches_and_in_place_updates_do_not_change_it(tmp_path):
    from fasttune import FastLanguageModel
    from fasttune.peft.lora import set_adapters_enabled

    ours = FastLanguageModel.get_peft_model(_ours("llama", tmp_path), r=4)
    ours.eval()
    state = static_decode.graph_state(ours)
    with torch.no_grad():
        ours.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)  # same memory: the graphs read the new values
    assert static_decode.graph_state(ours) == state
    set_adapters_enabled(ours, False)
    assert static_decode.graph_state(ours) != state
    set_adapters_enabled(ours, True)
    assert static_decode.graph_state(ours) == state


@pytest.mark.parametrize("family", ["qwen2", "phi3"])  # q/k/v apart, with biases; fused qkv and gate_up
def test_batch_one_decode_through_the_gemv_kernels_gives_the_same_tokens(family, tmp_path, monkeypatch):
    """At batch 1 a decode step's projections run as matrix-vector kernels (kernels/gemv.py: q/k/v in one launch,
    o_proj, gate/up with the activation in one, down_proj) and attention as kernels/decode_attention.py: the
    modules' own forwards are skipped, the tokens are unchanged. (On a GPU machine the CPU tests have no Triton
    interpreter: skipped.)"""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    ours = _ours(family, tmp_path).eval()
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    want = ours.generate(ids, **kw)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    calls = []
    layer = ours.model.layers[0]
    mlp = layer.mlp
    watched = [layer.self_attn.o_proj, mlp.down_proj] + ([layer.self_attn.qkv_proj, mlp.gate_up_proj]
                                                         if family == "phi3" else [layer.self_attn.v_proj, mlp.up_proj])
    for module in watched:
        module.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert [s[:2] for s in calls] == [(1, 6)] * 4  # the prefill's only: the decode steps took the kernels


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases, added by the kernel
def test_lora_decode_steps_read_kept_factor_copies_refreshed_every_step(family, tmp_path, monkeypatch):
    """Decode steps over the fused LoRA path read their 16-bit factors from copies kept with the step
    (kernels/lora_casts.py) and add the low-rank terms in kernels/lora_decode.py's launches: the tokens equal the
    reference module path's, no factor is cast or concatenated per call after the first step, and an in-place change
    of a factor between two calls of a kept session is seen by the next call."""
    from fasttune import FastLanguageModel
    from fasttune.kernels import lora_casts, lora_decode

    monkeypatch.setattr(static_decode, "KV_BUCKET", 4)  # steps cross buckets
    ours = FastLanguageModel.get_peft_model(_ours(family, tmp_path), r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ours.eval()
    ids, mask = _batch()
    kw = dict(max_new_tokens=9, eos_token_id=[], pad_token_id=0)
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")  # the module path: casts per call, plain autograd-free matmuls
    want = ours.generate(ids, mask, **kw)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    monkeypatch.setattr(static_decode, "graphs_wanted", lambda *a: False)
    launches, real_delta = [], lora_decode.lora_delta
    monkeypatch.setattr(lora_decode, "lora_delta", lambda *a, **k: launches.append(lora_decode.fits(a[0], a[2]))
                        or real_delta(*a, **k))
    refreshes = []
    real_refresh = lora_casts.LoraCasts.refresh
    monkeypatch.setattr(lora_casts.LoraCasts, "refresh", lambda self: refreshes.append(len(self.sources))
                        or real_refresh(self))
    got = ours.generate(ids, mask, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    casts = static_decode._SESSIONS[ours].step.casts
    groups = 4 * ours.arch.num_layers  # q/k/v, o, gate/up, down
    assert len(casts.groups) == groups and len(casts.sources) == 14 * ours.arch.num_layers
    assert refreshes == [0] + [14 * ours.arch.num_layers] * 7  # 8 decode steps; the first fills the copies itself
    assert launches == [True] * 8 * groups  # every group's low-rank terms in the two-launch kernels
    with torch.no_grad():  # same memory, so the session is kept; the next steps must read the new values
        ours.model.layers[1].mlp.down_proj.lora_B.mul_(-3.0)
    session = static_decode._SESSIONS[ours]
    changed = ours.generate(ids, mask, **kw)
    assert static_decode._SESSIONS[ours] is session
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    assert torch.equal(changed, ours.generate(ids, mask, **kw))
    assert not torch.equal(changed, want)


def test_lora_decode_at_batch_one_takes_the_gemv_and_adds_the_low_rank_terms(tmp_path, monkeypatch):
    """One row: each LoRA group's base products in kernels/gemv.py's one launch, the low-rank terms added onto them
    (kernels/lora_decode.py); the tokens equal the module path's."""
    from fasttune import FastLanguageModel
    from fasttune.kernels import lora as lora_kernels

    ours = FastLanguageModel.get_peft_model(_ours("qwen2", tmp_path), r=4, lora_alpha=8)  # q/k/v biases
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ours.eval()
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    want = ours.generate(ids, **kw)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    gemvs, real = [], lora_kernels.gemv
    monkeypatch.setattr(lora_kernels, "gemv", lambda x, w, b: gemvs.append(len(w)) or real(x, w, b))
    assert torch.equal(ours.generate(ids, **kw), want)
    assert gemvs == [3, 1, 2, 1] * ours.arch.num_layers * 5  # q/k/v, o, gate/up, down in each of 5 decode steps
