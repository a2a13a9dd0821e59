"""On-policy distillation against TRL 1.16's DistillationTrainer (the student a PEFT twin carrying our adapter, the
teacher a wider transformers model with the same weights as ours, both sampling the same fixed completions): the
loss and LoRA gradients of a micro-batch for the forward KL, the JSD and the reverse KL, the per-step losses of a
short run, the student's entropy; plus gradient-accumulation invariance and the errors."""
import pytest
import torch
from grpo_oracle import COMPLETIONS, ROWS
from peft_oracle import peft_grads, peft_twin, randomize_lora_b, saved_lora_adapter
from tiny import hf_model, save_hf

from fasttune import DistillationConfig, DistillationTrainer, FastLanguageModel
from fasttune.errors import ConfigError

trl = pytest.importorskip("trl")
PROMPTS = [{"prompt": r["prompt"]} for r in ROWS] * 4  # 8 prompts, one completion each (COMPLETIONS in order)
TEACHER = dict(hidden_size=96, intermediate_size=160)  # a wider teacher: its own hidden size, the same vocabulary


class FixedCompletions(DistillationTrainer):
    """Our trainer with its sampler replaced by COMPLETIONS, in the order of the examples sampled."""

    def sample(self, examples, seed):
        out = COMPLETIONS[:len(examples)]
        return [list(c) for c in out], [256 not in c for c in out]


def _fixed_trl():
    class FixedCompletionsTRL(trl.DistillationTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            return [list(c) for c in COMPLETIONS[:len(prompt_ids)]]

    return FixedCompletionsTRL


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("distill")
    save_hf(hf_model("llama", seed=1, **TEACHER), root / "teacher", tiny_tokenizer)
    return root, saved_lora_adapter(root, tiny_tokenizer, "student")[1]


def _ours(root, tok, tmp_path, teacher=None, **cfg):
    model, _ = FastLanguageModel.from_pretrained(str(root / "adapter"), dtype="float32")
    cfg = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_completion_length": 6,
           "max_steps": 1, "shuffle": False, **cfg}
    return FixedCompletions(model, teacher if teacher is not None else str(root / "teacher"), processing_class=tok,
                            train_dataset=PROMPTS, args=DistillationConfig(output_dir=str(tmp_path / "ours"), **cfg))


def _theirs(root, tok, tmp_path, **cfg):
    from datasets import Dataset

    cfg = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_completion_length": 6, **cfg}
    args = trl.DistillationConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                                  shuffle_dataset=False, logging_steps=1, save_strategy="no", **cfg)
    teacher = hf_model("llama", seed=1, **TEACHER)
    tr = _fixed_trl()(model=peft_twin("llama", root / "adapter"), teacher_model=teacher, args=args,
                      train_dataset=Dataset.from_list(PROMPTS), processing_class=tok)
    tr.current_gradient_accumulation_steps = 1
    return tr


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_grads_and_entropy_equal_trl(setup, tmp_path, beta):
    root, tok = setup
    ours = _ours(root, tok, tmp_path, beta=beta, temperature=0.7)
    theirs = _theirs(root, tok, tmp_path, beta=beta, temperature=0.7)
    examples = ours.train_examples[:8]
    batch = ours.to_device(ours.score(examples, *ours.sample(examples, 0), [8])[0])
    inputs = theirs._generate_and_score_completions(list(PROMPTS))
    assert torch.equal(batch["completion_mask"], inputs["completion_mask"])
    num_items = int(batch["completion_mask"].sum())
    assert int(inputs["num_items_in_batch"]) == num_items
    loss, _ = ours.micro_batch_loss(batch, num_items)
    loss.backward()
    got = {n: p.grad for n, p in ours.model.named_parameters() if p.grad is not None}
    want = theirs.compute_loss(theirs.model, inputs)
    want.backward()
    want_grads = peft_grads(theirs.model)
    assert float(loss) > 1e-3
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    assert set(got) == set(want_grads) and got
    for n in got:
        torch.testing.assert_close(got[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    s, n = ours._ratios["entropy"][-1]
    assert float(s / n) == pytest.approx(theirs._metrics["train"]["entropy"][-1], rel=1e-5)


def test_steps_equal_trl(setup, tmp_path, monkeypatch):
    """Three optimizer steps of two micro-batches (the divergence summed over the step's completion tokens / their
    count): each step's loss and grad norm, the entropy (the mean of the micro-batches' means) and the completion
    lengths, as TRL's train() logs them (TRL's shuffle of the generation batch made the identity: fasttune keeps the
    sampled order)."""
    import trl.trainer.distillation_trainer as trl_distillation

    monkeypatch.setattr(trl_distillation, "shuffle_sequence_dict", lambda batch: batch)
    root, tok = setup
    cfg = dict(beta=0.5, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=0.05,
               max_grad_norm=1.0, max_steps=3)
    ours = _ours(root, tok, tmp_path, **cfg)
    ours.train()
    theirs = _theirs(root, tok, tmp_path, **cfg)
    theirs.train()
    got, want = ours.log_history, [h for h in theirs.state.log_history if "loss" in h]
    assert len(got) == len(want) == 3 and got[-1]["loss"] < got[0]["loss"]
    for key in ("loss", "grad_norm", "entropy", "completions/mean_length", "completions/clipped_ratio"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-4), key


def test_gradient_accumulation_is_invariant(setup, tmp_path):
    root, tok = setup
    runs = []
    for bs, ga in ((8, 1), (2, 4)):
        tr = _ours(root, tok, tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                   max_steps=2, learning_rate=0.05)
        tr.train()
        runs.append([h["loss"] for h in tr.log_history])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_errors_name_the_fix(setup, tmp_path):
    root, tok = setup
    for kw, match in ((dict(beta=1.5), "beta=1.5 is invalid"), (dict(reward_funcs=["length"]), "do not apply"),
                      (dict(cast_lm_head_to_fp32=True), "not implemented for distillation"),
                      (dict(teacher_model_init_kwargs="{x"), "not valid JSON")):
        with pytest.raises(ConfigError, match=match):
            DistillationConfig(output_dir=str(tmp_path / "e"), **kw)
    model, _ = FastLanguageModel.from_pretrained(str(root / "adapter"), dtype="float32")
    args = DistillationConfig(output_dir=str(tmp_path / "e"), per_device_train_batch_size=8)
    with pytest.raises(ConfigError, match="needs a teacher"):
        DistillationTrainer(model, processing_class=tok, train_dataset=PROMPTS, args=args)
    with pytest.raises(ConfigError, match="the student itself"):
        DistillationTrainer(model, model, processing_class=tok, train_dataset=PROMPTS, args=args)
    save_hf(hf_model("llama", seed=2, vocab_size=280), root / "small_vocab", tok)
    with pytest.raises(ConfigError, match=r"vocabulary \(280 tokens\) is smaller"):
        DistillationTrainer(model, str(root / "small_vocab"), processing_class=tok, train_dataset=PROMPTS, args=args)
    fallback, _ = FastLanguageModel.from_pretrained(str(root / "teacher"), dtype="float32", fast=False)
    with pytest.raises(ConfigError, match="transformers fallback"):
        DistillationTrainer(model, fallback, processing_class=tok, train_dataset=PROMPTS, args=args)


def test_evaluation_and_completions_table(setup, tmp_path, capsys):
    """evaluate() samples the eval prompts and reports the divergence, the entropy and completion lengths;
    log_completions prints and writes the step's prompts and completions (no reward or advantage columns)."""
    import pandas as pd

    root, tok = setup
    ours = _ours(root, tok, tmp_path, log_completions=True, per_device_eval_batch_size=4)
    ours.eval_examples = ours.prepare(PROMPTS[:4])
    ours.train()
    table = pd.read_parquet(tmp_path / "ours" / "completions" / "completions_00001.parquet")
    assert list(table.columns) == ["step", "prompt", "completion"] and len(table) == 8
    assert "Step 1" in capsys.readouterr().out
    got = ours.evaluate()
    assert got["eval_loss"] > 0 and got["eval_entropy"] > 0 and got["eval_completions/mean_length"] > 0


def test_nf4_teacher_from_init_kwargs(setup, tmp_path):
    """teacher_model_init_kwargs reach from_pretrained: {"load_in_4bit": true} gives an NF4 teacher, which trains the
    student (the README's example)."""
    root, tok = setup
    ours = _ours(root, tok, tmp_path, teacher_model_init_kwargs='{"load_in_4bit": true}', max_steps=2)
    assert type(ours.teacher.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    ours.train()
    assert all(h["loss"] > 0 for h in ours.log_history)


def test_trl_distillation_trainer_runs_our_models(setup, tmp_path):
    """trl.DistillationTrainer trains fasttune's models unpatched (its backbone call passes logits_to_keep): the
    loss and LoRA gradients of a batch equal our own DistillationTrainer's on the same models."""
    from datasets import Dataset

    root, tok = setup
    ours = _ours(root, tok, tmp_path, beta=0.5)
    student, _ = FastLanguageModel.from_pretrained(str(root / "adapter"), dtype="float32")
    teacher, _ = FastLanguageModel.from_pretrained(str(root / "teacher"), dtype="float32")
    args = trl.DistillationConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8,
                                  max_completion_length=6, beta=0.5, use_cpu=True, report_to="none", bf16=False,
                                  shuffle_dataset=False, save_strategy="no")
    theirs = _fixed_trl()(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(PROMPTS),
                          processing_class=tok)
    theirs.current_gradient_accumulation_steps = 1
    examples = ours.train_examples[:8]
    batch = ours.to_device(ours.score(examples, *ours.sample(examples, 0), [8])[0])
    loss, _ = ours.micro_batch_loss(batch, int(batch["completion_mask"].sum()))
    loss.backward()
    want = theirs.compute_loss(theirs.model, theirs._generate_and_score_completions(list(PROMPTS)))
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    mine = {n: p.grad for n, p in ours.model.named_parameters() if p.grad is not None}
    other = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert mine.keys() == other.keys() and mine
    for n in mine:
        torch.testing.assert_close(mine[n], other[n], rtol=1e-4, atol=1e-6, msg=n)


def _divergence(zs, zt, beta):
    """The JSD (0 < beta < 1) of full fp64 logits (..., V): the oracle of the vision test."""
    lps, lpt = zs.double().log_softmax(-1), zt.double().log_softmax(-1)
    m = ((1 - beta) * lps.exp() + beta * lpt.exp()).log()
    return beta * (lpt.exp() * (lpt - m)).sum(-1) + (1 - beta) * (lps.exp() * (lps - m)).sum(-1)


def test_vision_language_distillation(qwen_vl_dir, tmp_path, tiny_tokenizer):
    """A tiny Qwen2.5-VL distilled from another (its own weights): prompts with images of different sizes, left
    padded; the loss equals the JSD of both models' full logits on the same rows and images; a step trains; a text
    teacher for a vision-language student is refused."""
    from tiny_vision import save_qwen_vl, solid_image

    from fasttune import FastVisionModel
    from fasttune.constants import IMAGE_KEYS

    teacher_dir = save_qwen_vl(tmp_path / "teacher", seed=1)
    student, proc = FastVisionModel.from_pretrained(str(qwen_vl_dir), dtype="float32")
    student = FastVisionModel.get_peft_model(student, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(student)
    rows = [{"images": [solid_image((200, 30, 30), (56, 56))], "prompt": [{"role": "user", "content": "Colour?"}]},
            {"images": [solid_image((30, 40, 210), (28, 56)), solid_image((30, 180, 40), (56, 28))],
             "prompt": [{"role": "user", "content": "Which two colours are these?"}]}]
    args = DistillationConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_completion_length=6,
                              max_steps=1, shuffle=False, beta=0.5, temperature=0.8, save_strategy="no")
    tr = FixedCompletions(student, str(teacher_dir), processing_class=proc, train_dataset=rows, args=args)
    batch = tr.to_device(tr.score(tr.train_examples, *tr.sample(tr.train_examples, 0), [2])[0])
    mask = batch["completion_mask"].bool()
    n, num = mask.shape[1], int(mask.sum())
    loss, _ = tr.micro_batch_loss(batch, num)
    media = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    assert "pixel_values" in media and batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1, 0] == 1
    with torch.no_grad():
        zs, zt = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_logits=True,
                    **media).logits[:, -n - 1:-1] / 0.8 for m in (tr.model, tr.teacher))
    want = _divergence(zs, zt, 0.5)[mask].sum() / num
    assert float(loss) > 1e-4
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-8)
    tr.train()
    assert tr.log_history[-1]["loss"] > 0
    with pytest.raises(ConfigError, match="both read the same prompts"):
        text = save_hf(hf_model("llama", seed=1), tmp_path / "text", tiny_tokenizer)
        DistillationTrainer(student, str(text), processing_class=proc, train_dataset=rows, args=args)
