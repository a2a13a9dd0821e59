"""GGUF export of vision-language models: the text model's GGUF plus an mmproj file, run by llama.cpp's own libmtmd
(llama-cpp-python's build). On tiny random Gemma 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Mistral 3, Gemma 4,
LLaVA (SigLIP tower) and InternVL models with LoRA on the language model
and the vision tower: llama.cpp's image embeddings, and its logits after a prompt with an image (so positions,
Gemma 3's two-way image attention and Qwen2.5-VL's windows count), equal ours; the refusals leave nothing behind."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llama_cpp_check import compare_logits, mtmd_run
from tiny_vision import save_with_bpe

from fasttune import FastVisionModel
from fasttune.cli import main
from fasttune.errors import ConfigError
from fasttune.export.gguf_mmproj import _pool_size, _window_pattern, imrope_fourth_axis_pairs

# llama.cpp's fixed Qwen2.5 window
FAMILIES = {"gemma3": {}, "qwen2_vl": {}, "qwen2_5_vl": dict(window_size=112), "qwen3_vl": {}, "qwen3_vl_moe": {},
            "qwen3_5": {}, "qwen3_5_moe": {}, "mistral3": {}, "mistral3:mistral4": {"text_type": "mistral4"},
            "gemma4": {}, "gemma4:audio": {"audio": True}, "llava": {}, "internvl": {}, "smolvlm": {}}
WRAP = {"gemma3": ("<start_of_image>", "<end_of_image>"), "qwen2_vl": ("<|vision_start|>", "<|vision_end|>"),
        "qwen2_5_vl": ("<|vision_start|>", "<|vision_end|>"), "qwen3_vl": ("<|vision_start|>", "<|vision_end|>"),
        "qwen3_vl_moe": ("<|vision_start|>", "<|vision_end|>"), "qwen3_5": ("<|vision_start|>", "<|vision_end|>"),
        "qwen3_5_moe": ("<|vision_start|>", "<|vision_end|>"), "mistral3": ("", ""), "gemma4": ("<|image>", "<image|>"),
        "llava": ("", ""), "internvl": ("<img>", "</img>")}
# (width, height): Gemma 3's fixed size; for Qwen 16 x 8 patches, two of Qwen2.5-VL's 112-pixel windows (Qwen3-VL:
# its 8 x 8 position table resized to 16 x 8)
IMAGE_SIZE = {"gemma3": (28, 28), "qwen2_vl": (224, 112), "qwen2_5_vl": (224, 112), "qwen3_vl": (256, 128),
              "qwen3_vl_moe": (256, 128), "qwen3_5": (256, 128), "qwen3_5_moe": (256, 128), "mistral3": (128, 96),
              "gemma4": (480, 336), "llava": (56, 56), "internvl": (56, 56),
              "smolvlm": (112, 112)}  # (Gemma 4: 10 x 7 tokens of 48 pixels, the processor's 70-token budget exactly)


@pytest.fixture(scope="module")
def bpe_vl(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_with_bpe(tmp_path_factory.mktemp(family.replace(":", "_")) / "m", _base(family),
                                         **FAMILIES[family])
        return made[family]

    return get


def _base(family: str) -> str:
    """The vision family of a FAMILIES key ("mistral3:mistral4": Mistral Small 4, Mistral 3's tower before a Mistral 4
    text model; "gemma4:audio": Gemma 4 with an audio tower, both towers in one mmproj)."""
    return family.split(":")[0]


def _lora_model(folder):
    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, finetune_vision_layers=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter, so the merge into both halves counts
    return model, proc


def _image(family):
    from PIL import Image

    width, height = IMAGE_SIZE[family]
    if family == "smolvlm":  # one colour: the whole image shrunk to one tile is then the same pixels on both sides
        return Image.new("RGB", (width, height), (200, 40, 90))  # (libmtmd's resize kernel is not the processor's)
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _ours(model, proc, family, before, image, after):
    """(image features (tokens, hidden; Qwen3-VL: its DeepStack features follow), last logits (vocab,), token count) of
    our model on the prompt libmtmd builds:
    before + start + one placeholder per image token + end + after."""
    if _base(family) == "mistral3":
        return _ours_pixtral(model, proc, before, image, after)
    if _base(family) == "smolvlm":
        return _ours_tiles(model, proc, before, image, after)
    start, end = WRAP[_base(family)]
    pix = proc.image_processor(images=[image], return_tensors="pt")
    grid = pix.get("image_grid_thw", pix.get("image_position_ids"))  # (Gemma 4: each patch's position)
    with torch.no_grad():
        feats, deep = model.image_features(pix["pixel_values"], grid)
        feats = torch.cat([feats, *deep], dim=-1)  # Qwen3-VL: as libmtmd lays them out
        ids = (proc.tokenizer(before + start)["input_ids"] + [model.image_token_id] * feats.shape[0]
               + proc.tokenizer(end + after)["input_ids"])
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pix["pixel_values"], image_grid_thw=grid).logits
    return feats.numpy(), logits[0, -1].numpy(), len(ids)


def _ours_tiles(model, proc, before, image, after):
    """_ours for SmolVLM: the prompt as our processor (Idefics3Processor's layout) expands the image into its tiles'
    row / column tokens and the whole image's, each tile's features in that order."""
    batch = proc(text=before + proc.image_token + after, images=[image], return_tensors="pt")
    with torch.no_grad():
        feats, _ = model.image_features(batch["pixel_values"], batch["pixel_attention_mask"])
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       pixel_attention_mask=batch["pixel_attention_mask"]).logits
    return feats.numpy(), logits[0, -1].numpy(), batch["input_ids"].shape[1]


def _ours_pixtral(model, proc, before, image, after):
    """_ours for Mistral 3: the image's rows of features with the [IMG_BREAK] embedding between them (as libmtmd's
    image chunk holds them; [IMG_END] follows as text)."""
    pix = proc.process_images([image])
    size = pix["image_sizes"][0].tolist()
    ids = proc.tokenizer(before)["input_ids"] + proc.tokenizer(proc._rows(size), add_special_tokens=False)[
        "input_ids"] + proc.tokenizer(after, add_special_tokens=False)["input_ids"]
    brk = proc.tokenizer.convert_tokens_to_ids(proc.image_rows[0])
    with torch.no_grad():
        feats, _ = model.image_features(pix["pixel_values"], pix["image_sizes"])
        rows = feats.view(size[0] // proc.image_rows[2], size[1] // proc.image_rows[2], -1)
        between = model.model.embed_tokens.weight[brk][None]
        feats = torch.cat([torch.cat([row, between]) if i < len(rows) - 1 else row for i, row in enumerate(rows)])
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pix["pixel_values"],
                       image_sizes=pix["image_sizes"]).logits
    return feats.numpy(), logits[0, -1].numpy(), len(ids)


def _break_rows_only(family, feats) -> bool:
    """Whether NaN sits in llama.cpp's image embedding, and only in Pixtral's [IMG_BREAK] rows (Mistral 3)."""
    rows = set(np.argwhere(np.isnan(feats))[:, 0].tolist())
    per_row = IMAGE_SIZE["mistral3"][0] // 16 + 1  # 8-pixel patches merged 2 x 2, then the break
    return _base(family) == "mistral3" and bool(rows) and not any((r + 1) % per_row for r in rows)


def _mtmd_run(family, text, projector, before, image, after, tries: int = 4):
    """mtmd_run, again while NaN sits only in Pixtral's [IMG_BREAK] rows: llama.cpp builds those rows as an
    uninitialised tensor times 0.0 plus the embedding (clip's build_pixtral), so stale NaN / inf bits in its compute
    buffer leak through now and then (seen in CI, in runs of the whole suite; our file is not involved). NaN
    anywhere else still fails."""
    for _ in range(tries):
        feats, logits, count = mtmd_run(text, projector, before, np.asarray(image), after)
        if not _break_rows_only(family, feats):
            break
    return feats, logits, count


def _rel(a, b):
    return float(np.abs(a - b).max() / (b.max() - b.min()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_runs_the_exported_model_as_ours(family, bpe_vl, tmp_path):
    model, proc = _lora_model(bpe_vl(family))
    text = model.save_pretrained_gguf(tmp_path / "g", proc, quantization_method="f32")
    projector = tmp_path / "g" / "mmproj.F32.gguf"
    assert text == tmp_path / "g" / "model.F32.gguf" and projector.exists()
    assert (tmp_path / "g" / "Modelfile").read_text().startswith("FROM ./model.F32.gguf\nFROM ./mmproj.F32.gguf\n")

    image, before, after = _image(_base(family)), "Look at this: ", " What is it?"
    feats, logits, count = _ours(model, proc, family, before, image, after)
    their_feats, their_logits, their_count = _mtmd_run(family, text, projector, before, image, after)
    assert their_count == count
    assert not np.isnan(feats).any() and not np.isnan(logits).any(), "NaN in our features / logits"
    if _break_rows_only(family, their_feats):  # every retry hit llama.cpp's stale buffer: what our file sets
        rows = np.isnan(their_feats).any(1)  # (the other rows) must still match, the logits cannot be compared
        assert _rel(their_feats[~rows], feats[~rows]) < 5e-4
        pytest.xfail("llama.cpp's Pixtral [IMG_BREAK] rows read an uninitialised buffer (NaN) on every retry")
    nan_rows = sorted(set(np.argwhere(np.isnan(their_feats))[:, 0].tolist()))
    assert not nan_rows and not np.isnan(their_logits).any(), f"NaN in llama.cpp's (image rows {nan_rows})"
    # ggml's GELU runs through an fp16 table, hence ~5e-4 rather than fp32's 1e-6; a wrong position or window
    # moves these by > 2e-2 (tried: plain positions for Qwen2.5-VL's image tokens, 56-pixel windows)
    # Mistral 3's SiLU tower has no such table: 4e-5 (its q/k rows left in transformers' RoPE order: 2e-3)
    assert _rel(their_feats, feats) < (5e-4 if _base(family) == "mistral3" else 2e-3)
    assert _rel(their_logits, logits) < 3e-3 and their_logits.argmax() == logits.argmax()
    # text alone through the text GGUF (Qwen's multimodal RoPE is plain RoPE there; Gemma's GELU is ggml's table)
    worst, agree, _ = compare_logits(model, proc.tokenizer, text, ["The quick brown fox", "Paris is the capital"],
                                     f32_cache=True)
    assert worst < 1e-3 and agree == 1.0


def test_llama_cpp_tiles_internvl_images_as_its_processor(bpe_vl, tmp_path):
    """An InternVL image of two tiles: libmtmd crops it as transformers' processor does (two 56-pixel tiles, then
    the thumbnail, all between <img> and </img>), and the embeddings and logits equal ours. One colour, so that the
    thumbnail's downscaling gives the same pixels on both sides whatever kernels the two resizes use."""
    from PIL import Image

    model, proc = _lora_model(bpe_vl("internvl"))
    text = model.save_pretrained_gguf(tmp_path / "g", proc, quantization_method="f32")
    image = Image.new("RGB", (112, 56), (200, 40, 90))
    feats, logits, count = _ours(model, proc, "internvl", "Look: ", image, " What?")
    their_feats, their_logits, their_count = mtmd_run(text, tmp_path / "g" / "mmproj.F32.gguf", "Look: ",
                                                      np.asarray(image), " What?")
    assert feats.shape[0] == 3 * 4 and their_count == count
    assert _rel(their_feats, feats) < 2e-3
    assert _rel(their_logits, logits) < 3e-3 and their_logits.argmax() == logits.argmax()


def test_llama_cpp_cuts_smolvlm_tiles_in_the_processors_order(bpe_vl, tmp_path):
    """A SmolVLM image of 2 x 2 tiles with different pixels everywhere: libmtmd's tiles (cut without resizing, as the
    processor cuts them) give our tiles' embeddings in the same order; only the whole image, shrunk to one tile by
    other kernels on the two sides, is left out."""
    model, proc = _lora_model(bpe_vl("smolvlm"))
    text = model.save_pretrained_gguf(tmp_path / "g", proc, quantization_method="f32")
    image = _image("qwen2_vl").resize((112, 112))  # random pixels
    feats, _, count = _ours(model, proc, "smolvlm", "Look: ", image, " What?")
    their_feats, _, their_count = mtmd_run(text, tmp_path / "g" / "mmproj.F32.gguf", "Look: ", np.asarray(image),
                                           " What?")
    tiles = 4 * 4  # four tiles of 4 tokens, then the whole image's 4
    assert their_count == count and feats.shape[0] == their_feats.shape[0] == tiles + 4
    assert _rel(their_feats[:tiles], feats[:tiles]) < 2e-3
    assert _rel(their_feats[:tiles], feats[[*range(4, tiles), *range(4)]]) > 2e-2  # (the order shows)


def test_default_export_quantizes_the_text_model_and_keeps_the_tower_f16(bpe_vl, tmp_path):
    import gguf

    family = "qwen2_5_vl"
    model, proc = _lora_model(bpe_vl(family))
    text = model.save_pretrained_gguf(tmp_path / "g", proc)  # q8_0
    projector = tmp_path / "g" / "mmproj.F16.gguf"
    assert text.name == "model.Q8_0.gguf" and sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        "Modelfile", "mmproj.F16.gguf", "model.Q8_0.gguf"]
    reader = gguf.GGUFReader(str(projector))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["v.blk.0.attn_q.weight"] == "F16" and kinds["v.blk.0.ln1.weight"] == "F32"
    assert kinds["v.patch_embd.weight"] == kinds["v.patch_embd.weight.1"] == "F32"
    field = reader.fields["clip.projector_type"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2.5vl_merger"
    assert int(reader.fields["clip.vision.n_wa_pattern"].parts[-1][0]) == 2

    image = _image(family)
    _, logits, _ = _ours(model, proc, family, "A: ", image, " B")
    _, their_logits, _ = mtmd_run(text, projector, "A: ", np.asarray(image), " B")
    assert _rel(their_logits, logits) < 8e-2


def test_cli_export_writes_the_projector_and_says_how_to_run_it(bpe_vl, tmp_path, capsys):
    model, proc = _lora_model(bpe_vl("gemma3"))
    model.save_pretrained(tmp_path / "adapter")
    proc.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--quantization", "f16",
                 "--output", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'g' / 'mmproj.F16.gguf'}" in printed and "--mmproj" in printed
    assert "FROM model.F16.gguf, FROM mmproj.F16.gguf" in printed

    image = _image("gemma3")
    _, logits, _ = _ours(model, proc, "gemma3", "Hi ", image, " there")
    _, theirs, _ = mtmd_run(tmp_path / "g" / "model.F16.gguf", tmp_path / "g" / "mmproj.F16.gguf", "Hi ",
                            np.asarray(image), " there")
    assert _rel(theirs, logits) < 2e-2


def test_imatrix_weights_the_text_model(bpe_vl, tmp_path):
    """An importance matrix measured on text through the vision-language model names every decoder projection
    (the text GGUF's blk.N tensors; the tower goes to the mmproj unweighted), and libmtmd runs the files."""
    import gguf

    model, proc = _lora_model(bpe_vl("qwen2_5_vl"))
    text = model.save_pretrained_gguf(tmp_path / "g", proc, quantization_method="q5_0", progress=False,
                                      imatrix=["The quick brown fox jumps over the lazy dog. " * 8], imatrix_tokens=64)
    field = gguf.GGUFReader(str(text)).fields["quantize.imatrix.entries_count"]
    assert int(field.parts[-1][0]) == 7 * model.arch.num_layers
    image = _image("qwen2_5_vl")
    _, logits, _ = _ours(model, proc, "qwen2_5_vl", "A: ", image, " B")
    _, theirs, _ = mtmd_run(text, tmp_path / "g" / "mmproj.F16.gguf", "A: ", np.asarray(image), " B")
    assert _rel(theirs, logits) < 8e-2


def test_the_processor_beside_the_weights_is_used_when_none_is_given(bpe_vl, tmp_path):
    model, proc = FastVisionModel.from_pretrained(str(bpe_vl("qwen2_vl")), dtype=torch.float32)
    model.save_pretrained_gguf(tmp_path / "g", quantization_method="f16")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["Modelfile", "mmproj.F16.gguf", "model.F16.gguf"]


def test_towers_llama_cpp_cannot_compute_are_refused_before_writing(qwen3_vl_dir, qwen_vl_dir, bpe_vl, tmp_path):
    model, proc = FastVisionModel.from_pretrained(str(qwen3_vl_dir), dtype=torch.float32)
    # its mrope_section [2, 3, 3] leaves pair 6 of 8 to llama.cpp's fourth axis (a warning); its tokenizer has no
    # merges, which llama.cpp needs (refused)
    with pytest.warns(UserWarning, match=r"rotates pairs \[6\] of this model's 8"), \
            pytest.raises(ConfigError, match="merges"):
        model.save_pretrained_gguf(tmp_path / "a", proc)
    model, proc = FastVisionModel.from_pretrained(str(qwen_vl_dir), dtype=torch.float32)
    with pytest.raises(ConfigError, match="windows of 56 pixels .* fixes the window at 112.*save_pretrained_merged"):
        model.save_pretrained_gguf(tmp_path / "b", proc)
    model, proc = FastVisionModel.from_pretrained(str(bpe_vl("gemma3")), dtype=torch.float32)
    with pytest.raises(ConfigError, match="needs its image processor"):
        model.save_pretrained_gguf(tmp_path / "c", proc.tokenizer)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_llava_towers_llama_cpp_computes_otherwise_are_refused(llava_vl_dir, bpe_vl, tmp_path):
    """LLaVA-1.5's CLIP tower (llama.cpp's clip returns the class token in place of the first patch), a SigLIP tower
    whose features drop a patch ("default"), feature layers out of order: refused before anything is written."""
    model, proc = FastVisionModel.from_pretrained(str(llava_vl_dir), dtype=torch.float32)
    with pytest.raises(ConfigError, match="CLIP vision tower .* class token .*save_pretrained_merged"):
        model.save_pretrained_gguf(tmp_path / "a", proc)
    model, proc = FastVisionModel.from_pretrained(str(bpe_vl("llava")), dtype=torch.float32)
    model.hf_config.vision_feature_select_strategy = "default"
    with pytest.raises(ConfigError, match="vision_feature_select_strategy='default'"):
        model.save_pretrained_gguf(tmp_path / "b", proc)
    model.hf_config.vision_feature_select_strategy, model.hf_config.vision_feature_layer = "full", [-1, -2]
    with pytest.raises(ConfigError, match=r"hidden states \[-1, -2\]"):
        model.save_pretrained_gguf(tmp_path / "c", proc)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_internvl_towers_llama_cpp_computes_otherwise_are_refused(bpe_vl, tmp_path):
    """InternViT-6B's RMS / q-k norms, features from another layer, a fractional merge: refused, nothing written."""
    model, proc = FastVisionModel.from_pretrained(str(bpe_vl("internvl")), dtype=torch.float32)
    cfg = model.hf_config
    cases = [("a", cfg.vision_config, "use_qk_norm", True, "RMS norms or q/k norms"),
             ("b", cfg, "vision_feature_layer", -2, "vision layer -2"),
             ("c", cfg, "downsample_ratio", 0.4, "downsample_ratio=0.4")]
    for folder, owner, key, value, message in cases:
        before = getattr(owner, key)
        setattr(owner, key, value)
        with pytest.raises(ConfigError, match=message):
            model.save_pretrained_gguf(tmp_path / folder, proc)
        setattr(owner, key, before)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_smolvlm_towers_or_tokenizers_llama_cpp_reads_otherwise_are_refused(bpe_vl, tmp_path):
    """Another tower activation, a tokenizer without "\\n\\n" as one token (libmtmd looks it up): refused."""
    from fasttune.export.gguf_mmproj_idefics3 import check_idefics3

    model, proc = FastVisionModel.from_pretrained(str(bpe_vl("smolvlm")), dtype=torch.float32)
    model.hf_config.vision_config.hidden_act = "gelu"
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        model.save_pretrained_gguf(tmp_path / "a", proc)
    model.hf_config.vision_config.hidden_act = "gelu_pytorch_tanh"
    split = SimpleNamespace(image_processor=proc.image_processor,
                            tokenizer=lambda text, add_special_tokens: {"input_ids": [201] * len(text)})
    with pytest.raises(ConfigError, match="several tokens"):
        check_idefics3(model, split)
    proc.image_processor.do_image_splitting = False
    with pytest.raises(ConfigError, match="do_image_splitting=False"):
        check_idefics3(model, proc)
    proc.image_processor.do_image_splitting = True
    check_idefics3(model, proc)
    assert not (tmp_path / "a").exists()


def test_llava_projector_without_biases_gets_zero_ones():
    """clip's mlp projector adds mm.0 / mm.2 biases unconditionally: a projector built without them gets zeros."""
    from fasttune.export.gguf_mmproj_llava import add_missing_biases, feature_layers

    tensors = {"mm.0.weight": torch.ones(6, 4), "mm.2.weight": torch.ones(5, 6), "mm.2.bias": torch.ones(5)}
    add_missing_biases(tensors)
    assert torch.equal(tensors["mm.0.bias"], torch.zeros(6)) and torch.equal(tensors["mm.2.bias"], torch.ones(5))
    cfg = SimpleNamespace(vision_feature_layer=[-3, -1], vision_config=SimpleNamespace(num_hidden_layers=4))
    assert feature_layers(SimpleNamespace(hf_config=cfg)) == [2, 4]  # hidden_states holds 5: embeddings + 4 layers


def test_imrope_pairs_llama_cpp_sends_to_its_fourth_axis():
    assert imrope_fourth_axis_pairs([3, 3, 2], 8) == [] and imrope_fourth_axis_pairs([2, 3, 3], 8) == [6]
    assert imrope_fourth_axis_pairs([24, 20, 20], 64) == [61, 62]  # Qwen3-VL-8B's sections, head_dim 128


def test_mmproj_file_names():
    from pathlib import Path

    from fasttune.export.gguf_mmproj import mmproj_target

    assert mmproj_target(Path("o/model.Q8_0.gguf"), "f16") == Path("o/mmproj.F16.gguf")
    assert mmproj_target(Path("o/smol.gguf"), "f32") == Path("o/mmproj-smol.F32.gguf")
    assert mmproj_target(Path("o/smol.Q4_K_M.gguf"), "f16") == Path("o/mmproj-smol.F16.gguf")


def test_layouts_clip_fixes():
    vision = SimpleNamespace(depth=8, fullatt_block_indexes=[3, 7])
    assert _window_pattern(vision) == 4
    for full in ([2, 7], [3], []):
        with pytest.raises(ConfigError, match="every n-th layer"):
            _window_pattern(SimpleNamespace(depth=8, fullatt_block_indexes=full))

    def gemma(image_size, tokens):
        return SimpleNamespace(hf_config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=image_size, patch_size=14), mm_tokens_per_image=tokens))

    assert _pool_size(gemma(896, 256)) == 4 and _pool_size(gemma(28, 4)) == 1
    for tokens in (255, 9):  # not a square; 64 patches a side do not split into 3
        with pytest.raises(ConfigError, match="cannot pool"):
            _pool_size(gemma(896, tokens))

