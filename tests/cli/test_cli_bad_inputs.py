"""A corpus of malformed inputs through the CLI: each exits non-zero, names the culprit, prints no traceback and
leaves the output directory as it was."""
import json

import pytest

from fasttune.cli import main


def _jsonl(t, name, rows):
    p = t / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD = [_msgs(("user", "hi"), ("assistant", "hello there"))] * 4

# name: (extra CLI args built from (tmp_path, tiny model folder), text the message must contain, or a function of
# tmp_path giving it)
CASES = {
    "data file missing": (lambda t, m: ["--data", str(t / "missing.jsonl")], "missing.jsonl"),
    "data unknown extension": (lambda t, m: ["--data", str(_txt(t))], "notes.txt"),
    "data empty file": (lambda t, m: ["--data", str(_jsonl(t, "empty.jsonl", []))], "empty.jsonl"),
    "data bad json line": (lambda t, m: ["--data", str(_jsonl(t, "bad.jsonl", [GOOD[0], "{oops"]))], "line 2"),
    "data no usable column": (lambda t, m: ["--data", str(_jsonl(t, "q.jsonl", [{"question": "a"}]))], "question"),
    "data text not a string": (lambda t, m: ["--data", str(_jsonl(t, "n.jsonl", [{"text": 5}]))], "text"),
    "data text empty": (lambda t, m: ["--data", str(_jsonl(t, "e.jsonl", [{"text": ""}]))], "text"),
    "data messages empty": (lambda t, m: ["--data", str(_jsonl(t, "m.jsonl", [{"messages": []}]))], "messages"),
    "data unknown role": (lambda t, m: ["--data", str(_jsonl(t, "r.jsonl", [_msgs(("wizard", "x"),
                                                                                  ("assistant", "y"))]))], "wizard"),
    "data no assistant turn": (lambda t, m: ["--data", str(_jsonl(t, "u.jsonl", [_msgs(("user", "x"))]))],
                               "assistant"),
    "data sharegpt bad from": (lambda t, m: ["--data", str(_jsonl(t, "s.jsonl", [
        {"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}]))], "alien"),
    "data input_ids not ints": (lambda t, m: ["--data", str(_jsonl(t, "i.jsonl", [{"input_ids": "abc"}]))],
                                "input_ids"),
    "data labels length": (lambda t, m: ["--data", str(_jsonl(t, "l.jsonl", [{"input_ids": [5, 6, 7],
                                                                              "labels": [5]}]))], "labels"),
    "data token id out of vocab": (lambda t, m: ["--data", str(_jsonl(t, "v.jsonl", [{"input_ids": [5, 99999]}]))],
                                   "99999"),
    "data every row too short": (lambda t, m: ["--data", str(_jsonl(t, "s1.jsonl", [{"input_ids": [5]}] * 3))],
                                 "no"),
    "data forced wrong format": (lambda t, m: ["--data", str(_jsonl(t, "tx.jsonl", [{"text": "a b"}])),
                                               "--data-format", "messages"], "messages"),
    "yaml not a mapping": (lambda t, m: ["--config", str(_file(t, "l.yaml", "- 1\n- 2\n"))], "l.yaml"),
    "yaml syntax error": (lambda t, m: ["--config", str(_file(t, "s.yaml", "a: [1,\n"))], "s.yaml"),
    "yaml unknown key": (lambda t, m: ["--config", str(_file(t, "k.yaml", "lerning_rate: 1\n"))], "learning_rate"),
    "yaml wrong value type": (lambda t, m: ["--config", str(_file(t, "v.yaml", "learning_rate: fast\n"))],
                              "learning_rate"),
    "config file missing": (lambda t, m: ["--config", str(t / "nope.yaml")], "nope.yaml"),
    "flag scheduler": (lambda t, m: ["--lr-scheduler-type", "wavy"], "wavy"),
    "flag optimizer": (lambda t, m: ["--optim", "lomo"], "lomo"),
    "flag max seq length cuts every response": (lambda t, m: ["--max-seq-length", "5"],
                                                "max_seq_length=5 cuts off every response in good.jsonl: all 4 rows "
                                                "left are truncated before the first response token"),
    "flag batch size zero": (lambda t, m: ["--batch-size", "0"], "per_device_train_batch_size"),
    "flag lora rank zero": (lambda t, m: ["--lora-r", "0"], "r=0"),
    "flag target module": (lambda t, m: ["--target-modules", "foo_proj"], "foo_proj"),
    "flag modules to save": (lambda t, m: ["--modules-to-save", "norm"], "norm"),
    "flag dtype": (lambda t, m: ["--dtype", "float8"], "float8"),
    "flag quantization": (lambda t, m: ["--quantization", "fp3"], "fp3"),
    "flag method": (lambda t, m: ["--method", "ppo"], "ppo"),
    "model missing": (lambda t, m: ["--model", str(t / "no-model")], "no-model"),
    "model file not gguf": (lambda t, m: ["--model", str(_file(t, "w.bin", "x"))], "w.bin"),
    "model dir without config": (lambda t, m: ["--model", str(_dir(t, "empty-model"))], "config.json"),
    # GPT-2 trains through the transformers fallback now; these two are what is still unsupported.
    "model unknown model_type": (lambda t, m: ["--model", str(_unknown_arch(t))],
                                 lambda t: f"transformers cannot read {t / 'wizard' / 'config.json'} "
                                           "(model_type 'wizardformer')"),
    "model not a causal LM": (lambda t, m: ["--model", str(_t5(t))],
                              lambda t: f"transformers cannot load '{t / 't5'}' as a causal language model"),
    "model an unsupported vision-language family": (
        lambda t, m: ["--model", str(_video_llava(t))],
        lambda t: f"'{t / 'video-llava'}' is a llava_next_video vision-language model, which fasttune does not run "
                  "yet; "
                  "its vision-language families are aya_vision, gemma3, gemma4, idefics3, internvl, llava"),
    "model a vision-language tokenizer without the image token": (
        lambda t, m: ["--model", str(_llava(t))], "image_token_id 299 is not a token of this tokenizer"),
    "adapter with missing base": (lambda t, m: ["--model", str(_adapter(t))], "gone-base"),
    "resume without checkpoint": (lambda t, m: ["--resume"], "no complete checkpoint"),
    "resume path not a checkpoint": (lambda t, m: ["--resume", str(_dir(t, "not-ckpt"))], "not-ckpt"),
}


def _txt(t):
    return _file(t, "notes.txt", "hello")


def _file(t, name, text):
    (t / name).write_text(text)
    return t / name


def _dir(t, name):
    (t / name).mkdir()
    return t / name


def _unknown_arch(t):
    d = _dir(t, "wizard")
    (d / "config.json").write_text(json.dumps({"model_type": "wizardformer", "hidden_size": 64,
                                               "architectures": ["WizardformerForCausalLM"]}))
    return d


def _llava(t):
    """A LLaVA checkpoint whose tokenizer lacks its image token (id 299 of a 259-token tokenizer)."""
    from tiny_tokenizer import make_tiny_tokenizer
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=299)) \
        .save_pretrained(t / "llava")
    make_tiny_tokenizer().save_pretrained(t / "llava")
    return t / "llava"


def _video_llava(t):
    """A LLaVA-NeXT-Video checkpoint: a vision-language family fasttune does not run, which AutoModelForCausalLM
    refuses."""
    from tiny_tokenizer import make_tiny_tokenizer
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    text = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    config = LlavaNextVideoConfig(text_config=text, vision_config=vision, image_token_index=298,
                                  video_token_index=299, image_grid_pinpoints=[[32, 32]])
    LlavaNextVideoForConditionalGeneration(config).save_pretrained(t / "video-llava")
    make_tiny_tokenizer().save_pretrained(t / "video-llava")
    return t / "video-llava"


def _t5(t):
    """An encoder-decoder that transformers knows but AutoModelForCausalLM does not take."""
    from tiny_tokenizer import make_tiny_tokenizer
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                        vocab_size=259)).save_pretrained(t / "t5")
    make_tiny_tokenizer().save_pretrained(t / "t5")
    return t / "t5"


def _adapter(t):
    d = _dir(t, "adapter")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                        "base_model_name_or_path": str(t / "gone-base")}))
    return d


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tiny_model_dir, tmp_path, capsys):
    make_args, culprit = CASES[case]
    culprit = culprit(tmp_path) if callable(culprit) else culprit
    model = tiny_model_dir("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    before = _snapshot(out)
    data = _jsonl(tmp_path, "good.jsonl", GOOD)
    args = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--no-sample", "--lora-r", "4"] + make_args(tmp_path, model)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0
    assert culprit in err, err
    assert "Traceback" not in err
    assert _snapshot(out) == before


def test_resume_with_other_rank_names_the_setting(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    data = _jsonl(tmp_path, "good.jsonl", GOOD)
    common = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
              "--no-sample", "--max-steps", "3", "--save-steps", "2", "--batch-size", "1"]
    assert main(common + ["--lora-r", "4"]) == 0
    before = _snapshot(tmp_path / "o")
    assert main(common + ["--lora-r", "8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "'r': 4" in err and "Traceback" not in err
    assert _snapshot(tmp_path / "o") == before


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--max-steps", "abc"])
    assert e.value.code == 2 and "--max-steps" in capsys.readouterr().err
