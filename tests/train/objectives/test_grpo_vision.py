"""GRPOTrainer on prompts with images (tiny random Qwen2.5-VL and Gemma 3): prompts laid out as TRL lays them out,
completion log-probs, loss and LoRA gradients equal to transformers + PEFT on the same left-padded rows with their
images, and for Qwen2.5-VL three training steps equal to TRL 1.16's own GRPOTrainer on the same fixed completions
(tests/fixtures/vision_grpo_trl.json, written by it where torchvision is installed); plus the data errors and the
CLI."""
import json
from pathlib import Path

import pytest
import torch
from grpo_oracle import COMPLETIONS, G, count_a
from tiny_vision import image_count, oracle_inputs, solid_image

from fasttune.constants import IMAGE_KEYS
from fasttune.errors import ConfigError, DataError

STEPS, LR, BETA, TEMPERATURE = 3, 2e-2, 0.1, 0.8
TRL_ORACLE = Path(__file__).resolve().parents[2] / "fixtures" / "vision_grpo_trl.json"


def _rows() -> list[dict]:
    """Two prompts of different lengths, their images placed by TRL's rule (string content: before the text)."""
    return [{"images": [solid_image((200, 30, 30), (56, 56))], "prompt": [{"role": "user", "content": "Colour?"}]},
            {"images": [solid_image((30, 40, 210), (28, 56)), solid_image((30, 180, 40), (56, 28))],
             "prompt": [{"role": "user", "content": "Which two colours are these?"}]}]


def redness(prompts, completions, images, **_):
    """Reads the row's images (as TRL passes the `images` column) and the completion."""
    return [im[0].convert("RGB").getpixel((0, 0))[0] / 255 * len(c[0]["content"]) for im, c in zip(images, completions)]


def _load(folder):
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    return FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), proc


def _config(tmp_path, **kw):
    from fasttune import GRPOConfig

    return GRPOConfig(**{"output_dir": str(tmp_path / "ours"), "per_device_train_batch_size": len(COMPLETIONS),
                         "gradient_accumulation_steps": 1, "num_generations": G, "max_completion_length": 6,
                         "max_steps": STEPS, "learning_rate": LR, "beta": BETA, "temperature": TEMPERATURE,
                         "logging_steps": 1, "shuffle": False, "save_strategy": "no", **kw})


def _fixed(model, proc, tmp_path, rows=None, **kw):
    from fasttune import GRPOTrainer

    class Fixed(GRPOTrainer):
        def sample(self, examples, seed):
            return COMPLETIONS[:len(examples)], [256 not in c for c in COMPLETIONS[:len(examples)]]

    return Fixed(model, reward_funcs=[count_a, redness], processing_class=proc, train_dataset=rows or _rows(),
                 args=_config(tmp_path, **kw))


@pytest.fixture(params=["qwen_vl_dir", "gemma3_vl_dir", "idefics3_vl_dir", "internvl_vl_dir", "llava_vl_dir",
                        "mllama_vl_dir", "paligemma_vl_dir"])
def vl_folder(request):
    return request.getfixturevalue(request.param)


def test_prompt_layout_and_grads_equal_transformers_and_peft(vl_folder, tmp_path):
    """The scored batch's prompts are the processor's (images expanded, left-padded); the completion log-probs, the
    loss (beta > 0, clipping active) and every LoRA gradient equal the same GRPO loss on transformers + PEFT fed the
    same rows with their images."""
    from peft import PeftModel
    from peft_oracle import randomize_lora_b
    from transformers import AutoModelForImageTextToText

    from fasttune.train.objectives.grpo_loss import per_token_loss, reduce_loss

    model, proc = _load(vl_folder)
    trainer = _fixed(model, proc, tmp_path)  # the reference: the fresh adapter as handed over, i.e. the base
    randomize_lora_b(model)  # then a policy away from it, the same in PEFT's copy
    model.save_pretrained(tmp_path / "adapter")
    examples = trainer.train_examples[:len(COMPLETIONS)]
    batch = trainer.score(examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)])[0]
    rows = _rows()
    for r, row in enumerate(rows):  # the processor's own ids of the prompt, left-padded
        items = [{"type": "image"}] * len(row["images"]) + [{"type": "text", "text": row["prompt"][0]["content"]}]
        messages = [{"role": "user", "content": items}]
        want = proc(text=[proc.apply_chat_template(messages, add_generation_prompt=True)],
                    images=row["images"])["input_ids"][0].tolist()
        width = batch["input_ids"].shape[1] - batch["completion_mask"].shape[1]
        got = batch["input_ids"][r * G, :width][batch["attention_mask"][r * G, :width].bool()].tolist()
        assert got == want
    assert not batch["attention_mask"][:, 0].all()  # one prompt is left-padded
    assert batch["pixel_values"].shape[0] > 0 and image_count(batch, proc) == 12

    twin = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vl_folder, dtype=torch.float32),
                                     str(tmp_path / "adapter"), is_trainable=True).train()
    media = {**{k: batch[k] for k in IMAGE_KEYS if k in batch}, **oracle_inputs(vl_folder, batch, proc)}
    n = batch["completion_mask"].shape[1]

    def their_logps():
        logits = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **media).logits
        logps = (logits[:, -n - 1:-1].float() / TEMPERATURE).log_softmax(-1)
        return logps.gather(-1, batch["input_ids"][:, -n:, None]).squeeze(-1) * batch["completion_mask"]

    mask = batch["completion_mask"]
    with torch.no_grad(), twin.disable_adapter():
        ref = their_logps()
    torch.testing.assert_close(batch["ref_logps"], ref, rtol=1e-5, atol=1e-5)  # beta > 0: the base, adapters off
    with torch.no_grad():
        old = their_logps() + 0.4 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    batch["old_logps"] = old
    items = int(mask.sum())
    loss, _ = trainer.micro_batch_loss(batch, items)
    loss.backward()
    theirs = their_logps()
    token_loss, _, _ = per_token_loss(theirs, old, batch["advantages"], 0.2, 0.2, BETA, ref, True)
    want_loss = reduce_loss(token_loss, mask, "dapo", items, 1, 6)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    assert trainer._ratios["clip_ratio/region_mean"][-1][0] > 0  # clipping acted
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {_our_name(n): p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert set(ours) == set(want) and len(ours) > 0
    for n in ours:
        torch.testing.assert_close(ours[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def _our_name(peft_name: str) -> str:
    """PEFT's name of a LoRA weight of transformers' vision-language model -> fasttune's name of it."""
    n = peft_name.removeprefix("base_model.model.").replace("model.language_model.", "model.")
    n = n.replace("model.text_model.", "model.")  # (Idefics3's language model)
    return n.replace(".default", "").removesuffix(".weight")


def test_moe_load_balancing_loss_with_images(qwen3_vl_moe_dir, tmp_path):
    """Qwen3-VL-MoE: the policy forward's load-balancing loss over prompts with images and their completions equals
    transformers' (output_router_logits=True: every real token, image tokens included), and the loss carries
    router_aux_loss_coef x it."""
    from transformers import AutoModelForImageTextToText

    model, proc = _load(qwen3_vl_moe_dir)
    trainer = _fixed(model, proc, tmp_path, beta=0.0, router_aux_loss_coef=0.5)
    batch = trainer.score(trainer.train_examples[:len(COMPLETIONS)], COMPLETIONS,
                          [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)])[0]
    assert not batch["attention_mask"][:, 0].all()  # one prompt is left-padded
    _, _, aux = trainer.policy_logps(batch)
    hf = AutoModelForImageTextToText.from_pretrained(qwen3_vl_moe_dir, dtype=torch.float32)
    marks = (batch["input_ids"] == proc.image_token_id).long()
    out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
             image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=marks, output_router_logits=True)
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-5, atol=1e-7)
    loss, _ = trainer.micro_batch_loss(batch, int(batch["completion_mask"].sum()))
    trainer.aux_weight = 0.0
    plain, _ = trainer.micro_batch_loss(batch, int(batch["completion_mask"].sum()))
    assert float(loss - plain) == pytest.approx(0.5 * float(aux), rel=1e-4)


def test_steps_equal_trl(qwen_vl_dir, tmp_path):
    """Three steps on the fixed completions (adapter starting at LoRA B zero, beta 0.1, AdamW at 2e-2): loss, kl,
    grad_norm and rewards per step equal TRL 1.16's GRPOTrainer's (the fixture; see make_vision_grpo_trl.py)."""
    model, proc = _load(qwen_vl_dir)
    trainer = _fixed(model, proc, tmp_path)
    trainer.train()
    ours = [h for h in trainer.log_history if "loss" in h]
    trl = json.loads(TRL_ORACLE.read_text())["qwen2_5_vl"]
    assert len(ours) == len(trl) == STEPS
    for mine, theirs in zip(ours, trl):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=2e-4, abs=1e-6), key
    assert ours[-1]["kl"] > 0  # the policy moved away from the reference


def test_images_reach_generation(qwen_vl_dir, tmp_path):
    """Sampling sees the images: with the same seed, a prompt's completions change when only its image does."""
    from fasttune import GRPOTrainer

    model, proc = _load(qwen_vl_dir)
    rows = _rows()[:1]
    trainer = GRPOTrainer(model, reward_funcs=[count_a], processing_class=proc, train_dataset=rows,
                          args=_config(tmp_path, per_device_train_batch_size=G, temperature=0.01))
    first, _ = trainer.sample(trainer.train_examples[:G], seed=3)
    again, _ = trainer.sample(trainer.train_examples[:G], seed=3)
    other = dict(trainer.train_examples[0], images=[solid_image((10, 250, 250), (56, 56))])
    changed, _ = trainer.sample([other] * G, seed=3)
    assert first == again and first != changed


def test_bad_rows_and_models(qwen_vl_dir, tiny_model_dir, tmp_path):
    """Images on a text model, more images than image items, video items on a processor without videos, audio items,
    and a tokenizer in place of the processor are named."""
    from fasttune import FastLanguageModel, GRPOTrainer

    model, proc = _load(qwen_vl_dir)
    rows = _rows()
    rows[1]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                      {"type": "image"}, {"type": "text", "text": "?"}]}]
    rows[1]["images"].append(solid_image((1, 2, 3)))
    rows[0]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(DataError, match="Row 1 of the dataset: the row gives 3 images but its prompt has places .* 2"):
        _fixed(model, proc, tmp_path, rows)
    rows = _rows()
    rows[0]["prompt"] = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]
    rows[1]["prompt"] = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    with pytest.raises(DataError, match="Row 0 of the dataset: has a video item; fasttune's data pipeline reads "
                                        "videos for"):  # (this processor has no video token)
        _fixed(model, proc, tmp_path, rows)
    rows[0]["prompt"] = [{"role": "user", "content": [{"type": "audio", "audio": "clip.wav"}]}]
    with pytest.raises(DataError, match="Row 0 of the dataset: the prompt has an audio item; this objective reads"):
        _fixed(model, proc, tmp_path, rows)
    with pytest.raises(ConfigError, match="GRPOTrainer on a vision-language model takes the processor"):
        GRPOTrainer(model, reward_funcs=[count_a], processing_class=proc.tokenizer, train_dataset=_rows(),
                    args=_config(tmp_path))
    text_model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir()), dtype="float32")
    with pytest.raises(DataError, match="Row 0 of the dataset: the row has images, but .* reads text only"):
        GRPOTrainer(text_model, reward_funcs=[count_a], processing_class=tok, train_dataset=_rows(),
                    args=_config(tmp_path))


def test_cli_grpo_with_image_files(qwen_vl_dir, tmp_path, capsys):
    """`fasttune train --method grpo` on a vision-language model: rows naming image files beside the data file, a
    built-in reward reading the rows' answers."""
    from fasttune.cli import main

    rows = _rows()
    for i, row in enumerate(rows):
        for k, image in enumerate(row["images"]):
            image.save(tmp_path / f"img{i}_{k}.png")
        row["images"] = [f"img{i}_{k}.png" for k in range(len(row["images"]))]  # (relative to the data file)
        row["answer"] = "red"
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rc = main(["train", "--method", "grpo", "--model", str(qwen_vl_dir), "--data", str(tmp_path / "prompts.jsonl"),
               "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--lora-r", "4", "--batch-size", "4",
               "--grad-accum", "1", "--num-generations", "4", "--max-completion-length", "4",
               "--reward-funcs", "exact_match", "--no-sample"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_a_group_is_prefilled_once(qwen_vl_dir, tmp_path):
    """generate(num_return_sequences=n) with images (one prefill per prompt, its cache rows copied) samples what the
    prompt repeated n times in the batch samples with the same seed; GRPO's rollout asks for it per group."""
    from fasttune.generate import left_pad

    model, proc = _load(qwen_vl_dir)
    trainer = _fixed(model, proc, tmp_path)
    distinct = trainer.train_examples[::G]
    ids, mask = left_pad([ex["prompt_ids"] for ex in distinct], trainer.pad_id)
    once = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=5, num_return_sequences=3,
                          **trainer.tokenizer.process_images([im for ex in distinct for im in ex["images"]]))
    repeated = [ex for ex in distinct for _ in range(3)]
    ids, mask = left_pad([ex["prompt_ids"] for ex in repeated], trainer.pad_id)
    each = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=5,
                          **trainer.tokenizer.process_images([im for ex in repeated for im in ex["images"]]))
    assert once.shape == (6, ids.shape[1] + 6) and torch.equal(once, each)
    assert not torch.equal(once[0, -6:], once[1, -6:])  # the copies are sampled apart


def test_reward_functions_get_trls_prompts(qwen_vl_dir, tmp_path):
    """As TRL's prepare_multimodal_messages leaves them: every content a list of items, the image items carrying
    their images (the row's, in order)."""
    model, proc = _load(qwen_vl_dir)
    seen = {}

    def spy(prompts, completions, **_):
        seen["prompts"] = prompts
        return [0.0] * len(prompts)

    trainer = _fixed(model, proc, tmp_path)
    trainer.reward_funcs, trainer.reward_names = [spy], ["spy"]
    trainer.reward_weights = torch.ones(1)
    trainer.compute_rewards(trainer.train_examples[G:G + 1], [[97, 256]])
    import numpy as np

    row = _rows()[1]
    ((prompt,),) = seen["prompts"]  # one completion's prompt: one user message
    items = prompt["content"]
    assert prompt["role"] == "user" and [i["type"] for i in items] == ["image", "image", "text"]
    assert items[2]["text"] == row["prompt"][0]["content"]
    for item, image in zip(items, row["images"]):
        assert np.array_equal(np.asarray(item["image"].convert("RGB")), np.asarray(image))


def test_rloo_on_images(qwen_vl_dir, tmp_path):
    """RLOOTrainer takes the same rows with images (GRPO's sampling and scoring): sampled steps with the KL penalty
    train the adapter."""
    from fasttune import RLOOConfig, RLOOTrainer

    model, proc = _load(qwen_vl_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = RLOOTrainer(model, reward_funcs=[redness], processing_class=proc, train_dataset=_rows(),
                          args=RLOOConfig(output_dir=str(tmp_path / "rloo"), per_device_train_batch_size=4,
                                          num_generations=2, max_completion_length=4, max_steps=2, learning_rate=1e-2,
                                          logging_steps=1, save_strategy="no"))
    trainer.train()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all("kl" in h and h["grad_norm"] > 0 for h in logs)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("folder", ["qwen_vl_dir", "mllama_vl_dir"])
def test_online_dpo_on_images(folder, request, tmp_path):
    """OnlineDPOTrainer takes the same rows with images (GRPO's sampling and scoring, a pair per prompt): sampled
    steps train the adapter (Qwen2.5-VL; Llama 3.2 Vision's images through cross-attention)."""
    from fasttune import OnlineDPOConfig, OnlineDPOTrainer

    model, proc = _load(request.getfixturevalue(folder))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = OnlineDPOTrainer(model, reward_funcs=[redness], processing_class=proc, train_dataset=_rows(),
                               args=OnlineDPOConfig(output_dir=str(tmp_path / "odpo"), per_device_train_batch_size=2,
                                                    max_new_tokens=4, max_steps=2, learning_rate=1e-2,
                                                    logging_steps=1, save_strategy="no"))
    trainer.train()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all("rewards/margins" in h and h["grad_norm"] > 0 for h in logs)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def _video_rows(frames):
    return [{"prompt": [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 2},
                                                     {"type": "text", "text": "What moves?"}]}]}]


def test_video_prompts_reach_generation_and_scoring(qwen_video_dir, tmp_path):
    """A prompt with a video item: its ids are the processor's for that conversation (the video's timed run of
    placeholders), generation and the scoring forward get the processor's pixel_values_videos / video_grid_thw /
    second_per_grid_ts, sampling changes when only the frames do, and reward functions get the frames in the video
    item."""
    from PIL import Image
    from tiny_vision import patterned_frames

    from fasttune import GRPOTrainer
    from fasttune.data.vision_prompts import prompt_media

    model, proc = _load(qwen_video_dir)
    frames = [Image.fromarray(f) for f in patterned_frames(4, 56, 56)]
    seen = []

    def video_reward(prompts, completions, **_):
        seen.append(prompts[0][0]["content"][0])
        return [0.0] * len(completions)

    trainer = GRPOTrainer(model, reward_funcs=[video_reward], processing_class=proc, train_dataset=_video_rows(frames),
                          args=_config(tmp_path, per_device_train_batch_size=G, temperature=0.01, max_steps=1))
    ex = trainer.train_examples[0]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    direct = proc(text=[proc.apply_chat_template(messages, add_generation_prompt=True)], videos=[frames],
                  video_metadata=[{"fps": 2}])
    assert ex["prompt_ids"] == direct["input_ids"][0].tolist()
    media = prompt_media(trainer.train_examples[:G], proc)
    assert set(media) == {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    assert torch.equal(media["pixel_values_videos"][:len(direct["pixel_values_videos"])],
                       direct["pixel_values_videos"])
    assert media["video_grid_thw"].shape[0] == G  # one per row of the group (decoded once)
    first, ends = trainer.sample(trainer.train_examples[:G], seed=3)
    other = dict(ex, videos=[(list(reversed(frames)), 2)])
    changed, _ = trainer.sample([other] * G, seed=3)
    assert first != changed
    # the scoring forward sees the video too: the same completions score otherwise after other frames
    logps = [trainer.policy_logps(trainer.to_device(trainer.score(examples, first, ends, [G])[0]))[0]
             for examples in (trainer.train_examples[:G], [other] * G)]
    assert not torch.allclose(*logps)
    trainer.train()
    assert seen and seen[0]["type"] == "video" and len(seen[0]["video"]) == 4  # (the frames as the rows stored them)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.log_history if "loss" in h)


def test_a_rollout_decodes_each_prompts_video_once(qwen_video_dir, tmp_path, monkeypatch):
    """Sampling and scoring one rollout share the prompt's decoded frames (a video file would otherwise be read
    twice a step); the next rollout decodes again (nothing is kept past it)."""
    from PIL import Image
    from tiny_vision import patterned_frames

    import fasttune.data.video as video
    from fasttune import GRPOTrainer

    model, proc = _load(qwen_video_dir)
    frames = [Image.fromarray(f) for f in patterned_frames(4, 56, 56)]
    trainer = GRPOTrainer(model, reward_funcs=[count_a], processing_class=proc, train_dataset=_video_rows(frames),
                          args=_config(tmp_path, per_device_train_batch_size=G, max_steps=1))
    calls, decode = [], video.decoded

    def counted(sources, where):
        calls.append(len(sources))
        return decode(sources, where)
    monkeypatch.setattr(video, "decoded", counted)
    for _ in range(2):
        batches = trainer.rollout(trainer.train_examples[:G], [G], seed=0)
        assert batches[0]["pixel_values_videos"].shape[0] > 0
    assert calls == [1, 1] and trainer._decoded_media is None


def test_tools_and_environments_are_refused_on_vision_models(qwen_vl_dir, tmp_path):
    from fasttune import GRPOTrainer

    model, proc = _load(qwen_vl_dir)
    for kwargs in ({"tools": [len]}, {"environment_factory": object}):
        name = next(iter(kwargs))
        with pytest.raises(ConfigError, match=f"{name} with a vision-language model is not implemented"):
            GRPOTrainer(model, reward_funcs=[count_a], processing_class=proc, train_dataset=_rows(),
                        args=_config(tmp_path), **kwargs)
