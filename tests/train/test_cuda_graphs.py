"""cuda_graphs=True where it cannot apply (the graph path itself runs on the card: tests/gpu/test_gpu_cuda_graphs.py):
each refusal is a ConfigError naming the setting, raised before the output folder is written; which batches take
the graph path; the gradient tensors the graphs write into stay attached across zero_grad."""
import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError
from fasttune.train import cuda_graphs
from fasttune.train.cuda_graphs import CudaGraphStep


@pytest.fixture
def lora_model(tiny_model_dir):
    def make(family="llama", gc=False):
        model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)))
        return FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=gc), tok
    return make


def test_trainer_refuses_on_cpu_before_writing(lora_model, tmp_path):
    model, tok = lora_model()
    out = tmp_path / "run"
    trainer = SFTTrainer(model, tok, train_dataset=[{"text": "abc abc"}] * 4,
                         args=SFTConfig(output_dir=str(out), max_steps=1, cuda_graphs=True))
    with pytest.raises(ConfigError, match="cuda_graphs=True does not apply here: it needs a CUDA GPU"):
        trainer.train()
    assert not out.exists()


@pytest.mark.parametrize("setting, match", [
    (dict(gc="offload"), "use_gradient_checkpointing='offload'"),
    (dict(fp16=True), "fp16 needs loss scaling"),
    (dict(fsdp=True), "fsdp=True"),
    (dict(packing=True), "packing=True"),
])
def test_refusals_name_the_setting(lora_model, setting, match):
    model, _ = lora_model(gc=setting.pop("gc", False))
    assert match in cuda_graphs.refusal(model, SFTConfig(**setting))


def test_refusals_for_router_logits_and_host_weights(lora_model):
    from fasttune.models.host_head import offload_lm_head

    model, _ = lora_model("qwen3_moe")
    model.config.output_router_logits = True
    assert "set router_aux_loss_coef=0.0" in cuda_graphs.refusal(model, SFTConfig())
    model.config.output_router_logits = False
    offload_lm_head(model)
    assert "offload_lm_head" in cuda_graphs.refusal(model, SFTConfig())


def test_refuses_other_objectives(lora_model, tmp_path):
    from fasttune import DPOConfig, DPOTrainer

    model, tok = lora_model()
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2
    trainer = DPOTrainer(model, tok, train_dataset=rows,
                         args=DPOConfig(output_dir=str(tmp_path / "d"), max_steps=1, cuda_graphs=True))
    with pytest.raises(ConfigError, match="applies to SFTTrainer on text models"):
        trainer.train()


def test_accepts_only_plain_right_padded_batches(lora_model):
    model, _ = lora_model()
    step = CudaGraphStep(model)
    plain = {"input_ids": 0, "attention_mask": 0, "labels": 0}
    assert step.accepts(plain, right_padded=True)
    assert not step.accepts(plain, right_padded=False)  # left padding: the mask is needed
    assert not step.accepts({**plain, "segment_ids": 0}, right_padded=True)  # packed documents
    step.off_reason = "a failed capture"
    assert not step.accepts(plain, right_padded=True)


def test_gradients_stay_the_tensors_the_graphs_write(lora_model):
    """zero_grad(set_to_none=True) drops .grad: the same tensor comes back, zeroed; a tensor put there by other
    code has its values copied into it."""
    model, _ = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    step = CudaGraphStep(model)
    step._bind_grads()
    bound = [p.grad for p in params]
    for p in params:
        p.grad = None
    params[0].grad = torch.full_like(params[0], 3.0)
    step._bind_grads()
    assert all(p.grad is g for p, g in zip(params, bound))
    assert torch.all(params[0].grad == 3.0) and all(torch.all(p.grad == 0) for p in params[1:])


def test_cli_flag_reaches_the_check(tiny_model_dir, tmp_path, capsys):
    """`fasttune train --cuda-graphs` on a CPU: the refusal as one message, exit 2, no output folder."""
    from chat_rows import write_chat_rows

    from fasttune.cli import main

    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(write_chat_rows(tmp_path / "d.jsonl")),
               "--output-dir", str(out), "--max-steps", "1", "--lora-r", "4", "--cuda-graphs"])
    err = capsys.readouterr().err
    assert rc == 2 and "cuda_graphs=True does not apply here: it needs a CUDA GPU" in err
    assert "Traceback" not in err and not out.exists()


def test_auto_checkpointing_that_chose_offload_is_named(lora_model, tmp_path, monkeypatch):
    """gradient checkpointing "auto" picking "offload" (memory is short) is refused as that choice, with the fix."""
    import fasttune.train.memory_policy as policy

    monkeypatch.setattr(policy, "choose_checkpointing",
                        lambda model, tokens, media=0, lean_ok=True, offload_ok=True:
                        ("offload", "auto -> offload", None, False))
    model, tok = lora_model(gc="auto")
    trainer = SFTTrainer(model, tok, train_dataset=[{"text": "abc abc"}] * 4,
                         args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1, cuda_graphs=True))
    with pytest.raises(ConfigError, match="'auto' chose 'offload'.*Lower per_device_train_batch_size"):
        trainer.train()
    assert not (tmp_path / "o").exists()
