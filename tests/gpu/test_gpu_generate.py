"""GPU checks of generation's CUDA-graph decode (models/static_decode.py; skipped without CUDA): replayed steps give
the tokens of eager steps (greedy and seeded sampling, LoRA unmerged, NF4, FP8, sliding windows, KV buckets), greedy
fp32 equals transformers' generate(), and training between two generate() calls is seen by the next one."""
import pytest
import torch
from peft_oracle import randomize_lora_b
from tiny import hf_model

from fasttune import FastLanguageModel
from fasttune.models import static_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :6] = 0
    return ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


def _both(model, monkeypatch, **kw):
    ids, mask = _prompts()
    graphed = model.generate(ids, mask, pad_token_id=0, **kw)
    monkeypatch.setenv("FASTTUNE_CUDA_GRAPHS", "0")
    eager = model.generate(ids, mask, pad_token_id=0, **kw)
    monkeypatch.delenv("FASTTUNE_CUDA_GRAPHS")
    return graphed, eager


# smollm3: the decode kernel rotates NoPE layers by nothing; ernie4_5: it gets reordered q/k channels;
# hunyuan_v1_dense: its norms after RoPE keep the unfused decode step; ministral3: its queries scaled by position
# (from 8 in the tiny config) before the fused step, and in the graphs from the device-side position;
# glm4_moe_lite: multi-head latent attention's cache of expanded keys and values (wider keys than values);
# gemma4_text: per-layer head sizes in the cache and the fused decode kernel, values taken from the keys;
# gemma4_e2b: per-layer embeddings of the step's token, shared layers reading an earlier layer's cache;
# mistral4: the latent attention's queries scaled by position (from 8) in the absorbed decode step;
# lfm2_moe: the convolution state with experts routed by score + the block's bias
@pytest.mark.parametrize("family", ["llama", "smollm3", "ernie4_5", "hunyuan_v1_dense", "ministral3", "lfm2",
                                    "lfm3", "glm4_moe_lite", "gemma4_text", "gemma4_e2b", "gemma4_moe",
                                    "mistral4", "lfm2_moe"])
def test_greedy_fp32_equals_transformers(family, tiny_model_dir, monkeypatch):
    folder = tiny_model_dir(family)
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cuda")
    ref = hf_model(family).cuda().eval()
    ids, mask = _prompts()
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                        eos_token_id=[7, 9])
    graphed, eager = _both(ours, monkeypatch, max_new_tokens=40, eos_token_id=[7, 9])
    assert torch.equal(graphed, want) and torch.equal(eager, want)


# the mixture-of-experts families decode in graphs too (bf16: torch's grouped GEMM takes the group sizes on the device)
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3", "smollm3", "glm4", "olmo3", "lfm2", "lfm3",
                                    "deepseek_v3", "gemma4_text", "gemma4_e2b", "qwen3_moe", "mixtral", "gpt_oss",
                                    "glm4_moe", "qwen3_5_moe_text", "lfm2_moe", "mistral4", "gemma4_moe"])
def test_graphs_equal_eager_bf16_lora(family, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(static_decode, "KV_BUCKET", 16)  # 9 + 48 slots: four buckets, four graphs, one pool
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.bfloat16, device="cuda")
    ours = FastLanguageModel.get_peft_model(ours, r=8)
    randomize_lora_b(ours)
    graphed, eager = _both(ours, monkeypatch, max_new_tokens=48, eos_token_id=[])
    assert torch.equal(graphed, eager)
    graphed, eager = _both(ours, monkeypatch, max_new_tokens=48, do_sample=True, temperature=1.5, top_p=0.9,
                           top_k=50, min_p=0.02, repetition_penalty=1.1, eos_token_id=[5, 6, 7], seed=11)
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("family, quant", [("llama", "nf4"), ("qwen3_moe", "nf4"), ("llama", "fp8")])
def test_graphs_equal_eager_quantized(family, quant, tiny_model_dir, monkeypatch):
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), load_in_4bit=quant == "nf4",
                                                load_in_fp8=quant == "fp8", dtype=torch.bfloat16, device="cuda")
    ours = FastLanguageModel.get_peft_model(ours, r=8)
    randomize_lora_b(ours)
    graphed, eager = _both(ours, monkeypatch, max_new_tokens=32, eos_token_id=[])
    assert torch.equal(graphed, eager)


def test_training_between_calls_is_seen(tiny_model_dir):
    """The graph is captured per call and reads the LoRA weights in place: an optimizer step between two calls
    changes the next call's output exactly as an uncaptured model's."""
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32, device="cuda")
    ours = FastLanguageModel.get_peft_model(ours, r=8)
    randomize_lora_b(ours)
    ids, mask = _prompts()
    before = ours.generate(ids, mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=5.0)
    ours.train()
    ours(ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    after = ours.generate(ids, mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        logits = ours(before[:, :10], attention_mask=torch.cat([mask, mask.new_ones(4, 1)], 1)).logits[:, -1]
    assert not torch.equal(after, before)
    assert torch.equal(after[:, 9], logits.argmax(-1))


def test_graphs_are_kept_between_calls_and_read_weights_in_place(tiny_model_dir, monkeypatch):
    """A second call of the same batch size replays the first call's graphs (no capture); a weight changed in place
    in between (the graphs copy the LoRA factors into their 16-bit copies at each step, kernels/lora_casts.py), and a
    shorter prompt, give what eager steps give."""
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.bfloat16, device="cuda")
    ours = FastLanguageModel.get_peft_model(ours, r=8)
    randomize_lora_b(ours)
    ours.eval()
    ids, mask = _prompts()
    kw = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    first = ours.generate(ids, mask, **kw)
    session = static_decode._SESSIONS[ours]
    graphs = dict(session.step._graphs)
    assert graphs
    assert torch.equal(ours.generate(ids, mask, **kw), first)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    graphed = ours.generate(ids, mask, **kw)
    shorter = ours.generate(ids[:, 4:], mask[:, 4:], **kw)
    assert static_decode._SESSIONS[ours] is session and session.step._graphs == graphs
    monkeypatch.setenv("FASTTUNE_CUDA_GRAPHS", "0")
    assert torch.equal(graphed, ours.generate(ids, mask, **kw))
    assert torch.equal(shorter, ours.generate(ids[:, 4:], mask[:, 4:], **kw))
    assert not torch.equal(graphed, first)


def test_batch_one_fp32_equals_transformers_through_the_gemv_kernel(tiny_model_dir):
    """At batch 1 q/k/v run as one matrix-vector launch inside the graphs (kernels/gemv.py); greedy fp32 output
    still equals transformers' token for token."""
    folder = tiny_model_dir("qwen2")  # q/k/v biases
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cuda")
    ref = hf_model("qwen2").cuda().eval()
    ids = _prompts()[0][:1]
    want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                        pad_token_id=0, eos_token_id=[])
    assert torch.equal(ours.generate(ids, max_new_tokens=40, eos_token_id=[]), want)
