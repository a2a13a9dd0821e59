"""The command line with a vision-language model: train on image rows whose paths are relative to the data file
(samples and the saved adapter carry the images' processor), generate with --image equal to the API, export the
merged checkpoint (GGUF of a tower llama.cpp cannot compute is refused with the way out), generate with --video (a
folder of frames) equal to the API, and the user errors (a missing image, --image on a text model, --video on a
model whose processor reads no videos, --fps alone) as one message with exit code 2."""
import json

import pytest
from tiny_vision import save_qwen_vl, solid_image

from fasttune.cli import main


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl_cli")
    model = save_qwen_vl(root / "model")
    (root / "data" / "img").mkdir(parents=True)
    rows = []
    for i, (name, colour) in enumerate([("red", (200, 30, 30)), ("blue", (30, 40, 210))] * 3):
        solid_image(colour).save(root / "data" / "img" / f"{i}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img/{i}.png"},
                                         {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": name}]})
    (root / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root, model


def test_train_then_generate_with_an_image(vl_run, capsys):
    from fasttune import FastVisionModel
    from fasttune.generate import generate_vision_text

    root, model = vl_run
    out = root / "out"
    assert main(["train", "--model", str(model), "--data", str(root / "data" / "rows.jsonl"), "--output-dir",
                 str(out), "--max-steps", "2", "--lora-r", "4"]) == 0
    printed = capsys.readouterr().out
    assert "(qwen2_5_vl," in printed and "prompt: <image> Colour?" in printed
    assert {"adapter_model.safetensors", "preprocessor_config.json", "chat_template.jinja"} <= {
        p.name for p in (out / "adapter").iterdir()}

    image = str(root / "data" / "img" / "1.png")
    assert main(["generate", "--adapter", str(out / "adapter"), "--image", image, "--prompt", "Colour?",
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    loaded, proc = FastVisionModel.from_pretrained(str(out / "adapter"))
    reply = generate_vision_text(loaded, proc, [[{"type": "image", "image": image},
                                                 {"type": "text", "text": "Colour?"}]], max_new_tokens=4)[0]
    assert printed == f"### Colour?\n{reply}\n\n"

    assert main(["export", "--adapter", str(out / "adapter"), "--format", "merged", "--output", str(root / "m")]) == 0
    assert "AutoModelForImageTextToText" in capsys.readouterr().out
    assert (root / "m" / "preprocessor_config.json").exists()
    # this tiny Qwen2.5-VL attends in 56-pixel windows, which llama.cpp's clip cannot (tests/export/test_gguf_mmproj.py
    # exports the families it can)
    rc = main(["export", "--adapter", str(out / "adapter"), "--format", "gguf", "--output", str(root / "g")])
    assert rc == 2 and "windows of 56 pixels" in capsys.readouterr().err and not (root / "g").exists()


def test_missing_image_is_one_message(vl_run, tmp_path, capsys):
    root, model = vl_run
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": "nowhere.png"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "red"}]}))
    rc = main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
               "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Row 0, image 1" in err and "nowhere.png" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_image_on_a_text_model_is_refused(tiny_model_dir, tmp_path, capsys):
    solid_image("red").save(tmp_path / "a.png")
    rc = main(["generate", "--model", str(tiny_model_dir("llama")), "--image", str(tmp_path / "a.png"),
               "--prompt", "hi"])
    assert rc == 2 and "text-only model" in capsys.readouterr().err


def test_generate_with_a_video_equals_the_api(tmp_path, capsys):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from tiny_vision import qwen_vl_config, qwen_vl_video_processor, save_video_model

    from fasttune import FastVisionModel
    from fasttune.generate import generate_vision_text

    model = save_video_model(tmp_path / "m", Qwen2_5_VLForConditionalGeneration, qwen_vl_config(),
                             qwen_vl_video_processor())
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, colour in enumerate(["red", "blue", "red"]):
        solid_image(colour, (56, 28)).save(frames / f"{i:02d}.png")
    assert main(["generate", "--model", str(model), "--video", str(frames), "--fps", "2", "--prompt", "What happens?",
                 "--max-new-tokens", "4", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    loaded, proc = FastVisionModel.from_pretrained(str(model), dtype=torch.float32)
    reply = generate_vision_text(loaded, proc, [[{"type": "video", "video": str(frames), "fps": 2.0},
                                                 {"type": "text", "text": "What happens?"}]], max_new_tokens=4)[0]
    assert printed == f"### What happens?\n{reply}\n\n"
    rows = [{"messages": [{"role": "user", "content": [{"type": "video", "video": "frames", "fps": 2},
                                                       {"type": "text", "text": "What happens?"}]},
                          {"role": "assistant", "content": "it blinks"}]}] * 2  # (the folder relative to the data)
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["train", "--model", str(model), "--data", str(tmp_path / "rows.jsonl"), "--output-dir",
                 str(tmp_path / "out"), "--max-steps", "1", "--lora-r", "4"]) == 0
    assert "prompt: <video> What happens?" in capsys.readouterr().out


def test_video_flags_refused_with_one_message(vl_run, tmp_path, capsys):
    root, model = vl_run
    (tmp_path / "frames").mkdir()
    solid_image("red").save(tmp_path / "frames" / "0.png")
    rc = main(["generate", "--model", str(model), "--video", str(tmp_path / "frames"), "--prompt", "hi"])
    err = capsys.readouterr().err  # (this tiny Qwen2.5-VL's tokenizer has no video token)
    assert rc == 2 and "has a video item" in err and "Traceback" not in err
    rc = main(["generate", "--model", str(model), "--fps", "2", "--prompt", "hi"])
    assert rc == 2 and "--fps is the rate of --video frames" in capsys.readouterr().err
