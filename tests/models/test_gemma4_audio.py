"""Gemma 4 E2B / E4B with audio (data/audio.py, models/vision.py): clips expand to as many soft tokens as
Gemma4Processor writes; logits, LoRA gradients (PEFT on transformers' model) and greedy generation from prompts
with audio (and an image) equal transformers'; data rows take clips as arrays, datasets' {"array",
"sampling_rate"} dicts, WAV files or an `audios` column; and the bad inputs are named."""
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_vision import save_gemma4, solid_image

from fasttune import FastVisionModel
from fasttune.errors import ConfigError, DataError

E2B = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
           hidden_size_per_layer_input=8, vocab_size_per_layer_input=300, num_kv_shared_layers=2)


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_gemma4(tmp_path_factory.mktemp("gemma4-audio") / "m", audio=True, **E2B)


@pytest.fixture(scope="module")
def loaded(folder):
    return FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)


def _hf(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def _batch(proc):
    """Two rows: a clip then text; text, an image and a shorter clip (the batch's features padded to the longest)."""
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "audio"},
                                                                    {"type": "text", "text": "say it"}]},
                                       {"role": "assistant", "content": "hello"}]),
             proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image"},
                                                                    {"type": "audio"}]}], add_generation_prompt=True)]
    return proc(text=texts, images=[solid_image("red")], audio=[_clip(1.0), _clip(0.55, seed=1)])


def _marks(batch, proc):
    return {"mm_token_type_ids": (batch["input_ids"] == proc.image_token_id).long()}


@pytest.mark.parametrize("seconds", [0.2, 1.0, 2.47])
def test_clips_expand_as_gemma4_processor_writes(seconds, loaded):
    """The begin mark, one audio token per soft token of the clip, the end mark: transformers'
    Gemma4Processor.replace_audio_token on the feature extractor's mask (25 tokens a second)."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    _, proc = loaded
    clip = _clip(seconds)
    text = proc(text=["<|audio|>"], audio=[clip])["input_ids"][0].tolist()
    begin, token, end = proc.audio_marks
    fake = SimpleNamespace(boa_token=begin, audio_token=token, eoa_token=end)
    want = Gemma4Processor.replace_audio_token(fake, proc.process_audio([clip]), 0)
    assert proc.tokenizer.decode(text) == want and text.count(proc.audio_token_id) == proc.audio_counts([clip])[0]


def test_logits_and_generation_with_audio_equal_transformers(loaded, folder):
    model, proc = loaded
    batch = _batch(proc)
    assert batch["input_features"].shape[0] == 2 and not batch["input_features_mask"].all()
    hf = _hf(folder)
    with torch.no_grad():
        ours, ref = model(**batch).logits, hf(**batch, **_marks(batch, proc)).logits
        silent = model(**{**batch, "input_features": torch.zeros_like(batch["input_features"])}).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    assert (ours[real] - silent[real]).abs().max() > 1e-3  # the clips count
    prompt = proc.prompt_inputs([[{"type": "audio", "audio": _clip(0.7)}, {"type": "text", "text": "words?"}],
                                 [{"type": "text", "text": "hm"}, {"type": "audio", "audio": _clip(0.4, seed=2)}]])
    want = hf.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**prompt, max_new_tokens=5, do_sample=False), want)


def test_notebook_inference_through_apply_chat_template(loaded):
    """The peer's notebooks' inference call: processor.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=True, return_dict=True, return_tensors="pt").to(device) reads the messages' image and clip and gives
    the batch prompt_inputs gives (so generation from it equals transformers', tested above); without return_dict the
    ids; a list of conversations left-padded."""
    model, proc = loaded
    content = [{"type": "image", "image": solid_image("red")}, {"type": "audio", "audio": _clip(0.7)},
               {"type": "text", "text": "words?"}]
    messages = [{"role": "user", "content": content}]
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt").to("cpu")
    want = proc.prompt_inputs([content])
    assert set(inputs.keys()) == set(want) and {"pixel_values", "input_features"} <= set(want)
    for key, value in want.items():
        assert torch.equal(inputs[key], value), key
    assert proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == \
        want["input_ids"].tolist()
    both = proc.apply_chat_template([[{"role": "user", "content": "hi"}], messages], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)
    assert torch.equal(both["input_ids"][1], want["input_ids"][0]) and both["attention_mask"][0, 0] == 0
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, want["input_ids"].shape[1] + 3)
    # the vision notebooks' other call: the rendered text, then processor(image, text, ...) in transformers' order
    image_only = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    text = proc.apply_chat_template(image_only, add_generation_prompt=True)
    positional = proc(solid_image("red"), text, add_special_tokens=False, return_tensors="pt").to("cpu")
    named = proc(text=[text], images=[solid_image("red")])
    assert set(positional.keys()) == set(named) and all(torch.equal(positional[k], named[k]) for k in named)


@pytest.mark.parametrize("towers", [False, True, "list"], ids=["language", "audio+vision", "target-list"])
def test_lora_loss_and_gradients_equal_peft_on_audio(towers, folder, tmp_path):
    """towers: finetune_audio_layers and finetune_vision_layers too, the peer's switches (the conformer's linears
    inside Gemma4ClippableLinear, relative_k_proj, both embedders' projections); "list": target_modules names, which
    PEFT's suffix rule would also find in the towers (Gemma4ClippableLinear wrappers it refuses), so the saved config
    keeps them to the language model."""
    from peft import PeftModel

    from fasttune.peft.adapter_io import adapter_parameters

    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    switches = dict(target_modules=["q_proj", "v_proj", "gate_proj"]) if towers == "list" else dict(
        finetune_audio_layers=towers, finetune_vision_layers=towers)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, **switches)
    towers = towers is True
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    audio = {n for n in adapted if n.startswith(("audio_tower.", "embed_audio."))}
    if towers:  # every linear of the conformer layers (1 + 4 attention, 4 feed-forward, 2 convolution-module ones)
        assert len([n for n in audio if n.startswith("audio_tower.layers.")]) == 11 * 2
        assert {"embed_audio.embedding_projection", "embed_vision.embedding_projection"} <= adapted
    else:
        assert not audio and not any(n.startswith("vision_tower.") for n in adapted)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = _batch(proc)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill((labels == proc.image_token_id) | (labels == proc.audio_token_id), -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    model.save_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(_hf(folder), str(tmp_path / "adapter"), is_trainable=True)
    ref = peft_model(**batch, labels=labels, **_marks(batch, proc))
    ref.loss.backward()
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
    ours = {k: p.grad for k, p in adapter_parameters(model).items()}
    theirs = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    if towers:  # the clips' and the image's gradients reach their towers' adapters; both merge into the towers
        assert all(ours[n].abs().sum() > 0 for n in ours if "lora_A" in n and n.startswith(("audio_", "embed_")))
        model.save_pretrained_merged(tmp_path / "merged", proc, save_method="merged_16bit")
        with torch.no_grad():
            merged = _hf(tmp_path / "merged")(**batch, **_marks(batch, proc)).logits
            base = _hf(folder)(**batch, **_marks(batch, proc)).logits
            mine = model(**batch).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(mine[real], merged[real], rtol=1e-4, atol=1e-4)
        assert (merged[real] - base[real]).abs().max() > 1e-2
        with torch.no_grad():  # the towers' adapters alone move the logits past that tolerance
            for name, p in model.named_parameters():
                if "lora_B" in name and name.startswith(("audio_", "embed_", "vision_")):
                    p.zero_()
            assert (model(**batch).logits[real] - merged[real]).abs().max() > 1e-3


def _wav(path, samples: np.ndarray, rate: int = 16000, channels: int = 1):
    """A 16-bit PCM WAV of `samples` (floats in [-1, 1), multiples of 2 ** -15 survive exactly)."""
    ints = np.clip(np.round(samples * 32768), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.repeat(ints, channels).tobytes())
    return path


def test_rows_take_arrays_dicts_wav_files_and_an_audios_column(loaded, tmp_path):
    """Each form of a clip gives the same features as its samples; audio tokens are never targets; SFT on such rows
    trains (the loss falls) and the saved processor reloads with its feature extractor."""
    from fasttune import SFTConfig, SFTTrainer
    from fasttune.data.vision import VisionProcessor
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc = loaded
    clip = (np.round(_clip(0.6) * 32768) / 32768).astype(np.float32)  # what 16-bit WAV holds exactly
    _wav(tmp_path / "a.wav", clip)
    _wav(tmp_path / "stereo.wav", clip, channels=2)
    answer = {"role": "assistant", "content": "hi"}
    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "audio": src}]}, answer]}
            for src in (clip, {"array": clip, "sampling_rate": 16000}, "a.wav", "stereo.wav")]
    rows.append({"messages": [{"role": "user", "content": [{"type": "audio"}]}, answer], "audios": [clip]})
    enc = VisionEncoder(proc, 256, train_on_responses_only=False, base_dir=tmp_path)
    examples = [enc.encode(r, i) for i, r in enumerate(rows)]
    assert all(e["input_ids"] == examples[0]["input_ids"] for e in examples)
    assert all(lab == -100 for t, lab in zip(examples[0]["input_ids"], examples[0]["labels"]) if t == proc.audio_token_id)
    batch = collate_vision(examples, proc)
    assert torch.allclose(batch["input_features"], batch["input_features"][:1].expand_as(batch["input_features"]),
                          atol=1e-5)
    proc.save_pretrained(tmp_path / "proc")
    again = VisionProcessor.from_pretrained(tmp_path / "proc", audio_marks=proc.audio_marks)
    assert again.audio_counts([clip]) == proc.audio_counts([clip])
    lora = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    in_memory = rows[:2] + rows[4:]  # (a list of rows has no folder for relative paths)
    trainer = SFTTrainer(model=lora, processing_class=proc, train_dataset=in_memory * 2,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2,
                                        learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[]))
    trainer.train()
    losses = [h["loss"] for h in trainer.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_clips_at_other_rates_are_resampled(loaded, tmp_path):
    """A 44.1 kHz dict and an 8 kHz WAV file become the 16 kHz samples of the same tone (soxr's HQ resampler: within
    1e-3 away from the ends, where its filter starts), so their rows expand to the same soft tokens as the 16 kHz
    clip."""
    from fasttune.data.audio import resample
    from fasttune.data.vision_rows import VisionEncoder

    _, proc = loaded

    def tone(rate):
        return (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(0.75 * rate)) / rate)).astype(np.float32)

    want = tone(16000)
    for got, rate in ((resample(tone(44100), 44100, 16000, "t"), 44100), (resample(tone(8000), 8000, 16000, "t"), 8000)):
        assert got.shape == want.shape and got.dtype == np.float32, rate
        assert np.abs(got[200:-200] - want[200:-200]).max() < 1e-3, rate
    _wav(tmp_path / "slow.wav", tone(8000), rate=8000)
    enc = VisionEncoder(proc, 256, train_on_responses_only=False, base_dir=tmp_path)
    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "audio": src}]}]}
            for src in (want, {"array": tone(44100), "sampling_rate": 44100}, "slow.wav")]
    ids = [enc.encode(r, i)["input_ids"] for i, r in enumerate(rows)]
    assert ids[0] == ids[1] == ids[2] and ids[0].count(proc.audio_token_id) == proc.audio_counts([want])[0]


def test_bad_audio_is_named(loaded, tmp_path):
    from fasttune.data.vision_rows import VisionEncoder

    _, proc = loaded
    enc = VisionEncoder(proc, 256, train_on_responses_only=False, base_dir=tmp_path)

    def row(src):
        return {"messages": [{"role": "user", "content": [{"type": "audio", "audio": src}]}]}

    with pytest.raises(DataError, match="Row 0.*sampling_rate \\(Hz\\) must be a positive number, not 'fast'"):
        enc.encode(row({"array": _clip(0.5), "sampling_rate": "fast"}), 0)
    with pytest.raises(DataError, match="Row 1.*sampling_rate \\(Hz\\) must be a positive number, not 0"):
        enc.encode(row({"array": _clip(0.5), "sampling_rate": 0}), 1)
    with pytest.raises(DataError, match="Row 2.*'https://x.org/a.wav' is a web address.*pass its file path"):
        enc.encode(row("https://x.org/a.wav"), 2)
    with pytest.raises(DataError, match="Row 2.*'http://x.org/b.png' is a web address"):
        enc.encode({"messages": [{"role": "user", "content": [{"type": "image", "url": "http://x.org/b.png"}]}]}, 2)
    with pytest.raises(DataError, match="Row 2.*audio file .*missing.wav' does not exist"):
        enc.encode(row("missing.wav"), 2)
    (tmp_path / "not.wav").write_bytes(b"ID3 not a wave")
    with pytest.raises(DataError, match="Row 3.*not a PCM WAV file"):
        enc.encode(row("not.wav"), 3)
    with pytest.raises(DataError, match="Row 4.*1-D array of samples"):
        enc.encode(row(np.zeros((2, 100))), 4)
    with pytest.raises(DataError, match="Row 5.*'audios' column has no audio left"):
        enc.encode({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 5)
    short = VisionEncoder(proc, 10, train_on_responses_only=False)
    with pytest.raises(DataError, match="Row 6.*cut would fall inside a clip"):
        short.encode(row(_clip(1.0)), 6)


def test_audio_on_a_model_that_does_not_hear_is_refused(loaded, tmp_path):
    """A Gemma 4 without an audio tower (the 31B's layout): audio rows are a DataError, input_features a
    ConfigError; on the hearing model, audio tokens without their features are a ConfigError."""
    from fasttune.data.vision_rows import VisionEncoder

    deaf, deaf_proc = FastVisionModel.from_pretrained(str(save_gemma4(tmp_path / "deaf")), dtype=torch.float32)
    with pytest.raises(DataError, match="Row 0: has an audio item, but this model takes no audio"):
        VisionEncoder(deaf_proc, 256, False).encode(
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": _clip(0.3)}]}]}, 0)
    model, proc = loaded
    batch = proc(text=["<|audio|> hi"], audio=[_clip(0.3)])
    with torch.no_grad(), pytest.raises(ConfigError, match="no audio tower"):
        deaf(input_ids=torch.tensor([[5, 6]]), input_features=batch["input_features"],
             input_features_mask=batch["input_features_mask"])
    with torch.no_grad(), pytest.raises(ConfigError, match="audio placeholder tokens but no input_features"):
        model(input_ids=batch["input_ids"])


def test_prompt_preview_marks_media():
    from fasttune.data.vision_rows import content_preview

    assert content_preview([{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "words?"},
                            {"type": "image", "image": "b.png"}]) == "<audio> words? <image>"
