"""Adapters trained on transformers 4's per-expert MoE layers (one LoRA per expert and projection) load onto our
stacked experts (peft/per_expert_adapter.py): logits equal transformers' model with every per-expert update merged
into its weights by hand, and equal transformers + PEFT loading the same folder (PEFT stacks such adapters too);
rsLoRA and per-name alphas keep each projection's own scaling; incomplete or mismatching adapters are refused."""
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import hf_model

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.peft.adapter_io import load_adapter_into

P = "base_model.model.model.layers"


def _v4_adapter(folder, family, base_dir, r=4, alpha=8, extra_cfg=None, skip=()):
    """Write a per-expert adapter for the tiny `family` model: q_proj/v_proj, the experts' three projections of
    every sparse layer (Mixtral: also its router `gate`), random A and B. Returns {key: tensor}."""
    cfg = hf_model(family).config
    mixtral = family == "mixtral"
    e_count = cfg.num_local_experts if mixtral else cfg.num_experts
    inter = cfg.intermediate_size if mixtral else cfg.moe_intermediate_size
    h = cfg.hidden_size
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if mixtral else "mlp"
    sparse = [i for i in range(cfg.num_hidden_layers) if mixtral or i not in cfg.mlp_only_layers]
    g = torch.Generator().manual_seed(1)
    tensors = {}

    def pair(stem, out_f, in_f):
        tensors[f"{stem}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.3
        tensors[f"{stem}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.3

    kv = cfg.num_key_value_heads * (cfg.head_dim if hasattr(cfg, "head_dim") and cfg.head_dim else
                                    h // cfg.num_attention_heads)
    q = cfg.num_attention_heads * (kv // cfg.num_key_value_heads)
    for i in range(cfg.num_hidden_layers):
        pair(f"{P}.{i}.self_attn.q_proj", q, h)
        pair(f"{P}.{i}.self_attn.v_proj", kv, h)
    for i in sparse:
        for e in range(e_count):
            for n in names:
                pair(f"{P}.{i}.{block}.experts.{e}.{n}", *((h, inter) if n in ("w2", "down_proj") else (inter, h)))
        if mixtral:
            pair(f"{P}.{i}.block_sparse_moe.gate", e_count, h)
    tensors = {k: v for k, v in tensors.items() if not any(s in k for s in skip)}
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    targets = ["q_proj", "v_proj", *names] + (["gate"] if mixtral else [])
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": targets,
        "base_model_name_or_path": str(base_dir), **(extra_cfg or {})}))
    return tensors


def _merged_reference(family, tensors, scaling):
    """transformers' tiny model with each LoRA update scaling(name) * B @ A added to its weight by hand (stacked
    experts: gate rows first, then up)."""
    ref = hf_model(family)
    params = dict(ref.named_parameters())
    mixtral = family == "mixtral"
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            stem = key.removesuffix(".lora_A.weight")
            delta = scaling(stem) * tensors[f"{stem}.lora_B.weight"] @ a
            module = stem.removeprefix("base_model.model.").replace("block_sparse_moe", "mlp")
            parts = module.split(".")
            if "experts" in parts:
                layer, e, proj = ".".join(parts[:parts.index("experts")]), int(parts[-2]), parts[-1]
                inter = delta.shape[0] if proj not in ("w2", "down_proj") else None
                if proj in ("w2", "down_proj"):
                    params[f"{layer}.experts.down_proj"][e] += delta
                elif proj in ("w1", "gate_proj"):
                    params[f"{layer}.experts.gate_up_proj"][e][:inter] += delta
                else:
                    params[f"{layer}.experts.gate_up_proj"][e][inter:] += delta
            else:
                params[f"{module}.weight"] += delta
    assert mixtral or "model.layers.1.mlp.experts.gate_up_proj" in params
    return ref


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_per_expert_adapter_loads_stacked(family, tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir(family)
    tensors = _v4_adapter(tmp_path / "v4", family, base_dir)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "v4"), dtype=torch.float32)
    settings = ours.lora_settings
    assert "mlp.experts.gate_up_proj" in settings.target_parameters and settings.rank_pattern
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _merged_reference(family, tensors, lambda stem: 8 / 4)
    from peft import PeftModel

    peft = PeftModel.from_pretrained(hf_model(family), str(tmp_path / "v4"))
    with torch.no_grad():
        got = ours.eval()(ids).logits
        torch.testing.assert_close(got, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, peft.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "stacked")  # written back in transformers 5's stacked keys
    keys = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert "mlp.experts.down_proj" in keys["target_parameters"]


def test_own_scalings_are_kept(tiny_model_dir, tmp_path):
    """rsLoRA and an alpha pattern on up_proj only: each projection's update keeps its own scaling (folded into the
    stacked B), where one stacked gate_up scaling would get gate or up wrong."""
    base_dir = tiny_model_dir("qwen3_moe")
    extra = {"use_rslora": True, "alpha_pattern": {"up_proj": 3.0}}
    tensors = _v4_adapter(tmp_path / "v4", "qwen3_moe", base_dir, extra_cfg=extra)
    ours, _ = FastLanguageModel.from_pretrained(str(base_dir), dtype=torch.float32)
    load_adapter_into(ours, tmp_path / "v4")
    ref = _merged_reference("qwen3_moe", tensors, lambda stem: (3.0 if stem.endswith("up_proj") else 8) / 2)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_incomplete_or_foreign_per_expert_adapters_are_refused(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("qwen3_moe")
    _v4_adapter(tmp_path / "gap", "qwen3_moe", base_dir, skip=("experts.2.down_proj.lora_B",))
    ours, _ = FastLanguageModel.from_pretrained(str(base_dir))
    with pytest.raises(ModelLoadError, match=r"experts\.2\.down_proj has no complete lora_A / lora_B pair"):
        load_adapter_into(ours, tmp_path / "gap")
    tensors = _v4_adapter(tmp_path / "dense", "qwen3_moe", base_dir)
    tensors[f"{P}.0.mlp.experts.0.down_proj.lora_A.weight"] = torch.zeros(4, 32)  # layer 0 is a dense MLP
    save_file(tensors, tmp_path / "dense" / "adapter_model.safetensors")
    ours, _ = FastLanguageModel.from_pretrained(str(base_dir))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.experts\.\*\.down_proj, which this model does not"):
        load_adapter_into(ours, tmp_path / "dense")
