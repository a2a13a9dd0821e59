"""Tiny random vision-language checkpoints (hidden 64, 2 layers, a 2-block vision tower) with a working processor,
built offline: the byte-level tiny tokenizer plus the vision special tokens, transformers' image processor, and a
ChatML template that renders image items as the family's placeholder."""
from tiny_tokenizer import make_tiny_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]  # ids 259, 260, 261
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATCH, MERGE = 14, 2


def qwen_vl_config(**text_overrides):
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=256, pad_token_id=256)
    text.update(text_overrides)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=261, video_token_id=271, vision_start_token_id=259, vision_end_token_id=260,
        tie_word_embeddings=False)


def qwen_vl_processor(patch: int = PATCH, tok=None, max_side: int = 8):
    """fasttune's VisionProcessor of the tiny tokenizer (or `tok`) plus the vision tokens and transformers' PIL
    image processor (Qwen2.5-VL's 14-pixel patches; Qwen3-VL's are 16), images of 2 x 2 to `max_side` squared
    patches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=QWEN_VL_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=MERGE, temporal_patch_size=2,
                                      min_pixels=(2 * patch) ** 2, max_pixels=(max_side * patch) ** 2)
    return VisionProcessor(tok, images, QWEN_VL_TEMPLATE, "<|image_pad|>", MERGE)


QWEN_VIDEO_SIZE = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 16}  # (tests/fixtures/qwen2vl_video.npz's)
QWEN_VL_VIDEO_TEMPLATE = QWEN_VL_TEMPLATE.replace(
    "{% elif item['type'] == 'text' %}",
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}")


def qwen_vl_video_processor():
    """qwen_vl_processor's parts plus Qwen2-VL's video token (<|video_pad|>, id 262; a model for it needs
    config.video_token_id = 262) and video size limits (QWEN_VIDEO_SIZE); its template renders video items."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=QWEN_VL_VIDEO_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS + ["<|video_pad|>"]})  # ids 259-262
    images = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                      min_pixels=(2 * PATCH) ** 2, max_pixels=(8 * PATCH) ** 2)
    return VisionProcessor(tok, images, QWEN_VL_VIDEO_TEMPLATE, "<|image_pad|>", MERGE, video_token="<|video_pad|>",
                           video_settings=dict(QWEN_VIDEO_SIZE))


def save_video_model(folder, model_cls, config, processor, init=None):
    """A random tiny vision-language model (seed 0) whose config's video token is `processor`'s, saved with it (its
    video settings as video_preprocessor_config.json, as the processor writes them); returns the folder."""
    config.video_token_id = processor.video_token_id
    return _save(folder, model_cls, config, processor, seed=0, init=init)


def check_video_batch(model, hf, proc, batch: dict, prompt: list, pad_token_id: int):
    """Our logits on a collated batch with videos equal transformers' (`hf`, given mm_token_type_ids 2 on the video
    tokens), and greedy generation from a user turn `prompt` (content items) with a video equals its."""
    import torch

    marks = lambda ids: 2 * (ids == proc.video_token_id).long()  # noqa: E731  (transformers': 2 = video)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours, ref = model(**inputs).logits, hf(**inputs, mm_token_type_ids=marks(batch["input_ids"])).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    prompt = proc.prompt_inputs([prompt])
    with torch.no_grad():
        want = hf.generate(**prompt, mm_token_type_ids=marks(prompt["input_ids"]), max_new_tokens=4,
                           do_sample=False, pad_token_id=pad_token_id)
    assert torch.equal(model.generate(**prompt, max_new_tokens=4, do_sample=False), want)


def _save(folder, model_cls, config, processor, seed: int, init=None):
    """A random model of `config` (fp32, seeded; `init(model)` adjusts weights) and `processor` saved to `folder`."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if init is not None:
        with torch.no_grad():
            init(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_qwen_vl(folder, seed: int = 0):
    """Save a random tiny Qwen2.5-VL (fp32) with its processor to `folder`; returns the folder."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _save(folder, Qwen2_5_VLForConditionalGeneration, qwen_vl_config(), qwen_vl_processor(), seed)


def solid_image(color, size=(56, 56)):
    from PIL import Image

    return Image.new("RGB", size, color)


def noise_image(size, seed: int):
    """A PIL image of `size` (width, height) pixels of uniform random colours (seeded): unlike solid_image's, its tiles
    and patches all differ, so features out of order show."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def patterned_frames(frames: int, height: int, width: int):
    """A video's frames without randomness (so oracle files need not store them): uint8 (frames, height, width, 3),
    diagonal stripes per channel that move from frame to frame."""
    import numpy as np

    y, x = np.indices((height, width))
    return np.stack([np.stack([(y * (c + 1) + x * (3 - c) + 37 * f) % 256 for c in range(3)], -1)
                     for f in range(frames)]).astype(np.uint8)


GEMMA3_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]  # ids 259, 260, 261
GEMMA3_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<start_of_image>")
GEMMA3_TOKENS_PER_IMAGE = 4


def gemma3_config():
    from transformers import Gemma3Config

    text = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512,
                sliding_window=4, layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6,
                bos_token_id=None, eos_token_id=256, pad_token_id=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
                        boi_token_id=259, eoi_token_id=260, image_token_id=261, tie_word_embeddings=True)


def gemma3_processor(tok=None):
    """fasttune's VisionProcessor as Gemma3Processor expands images: each <start_of_image> becomes
    "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n". `tok`: another tokenizer than the tiny one."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=GEMMA3_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": GEMMA3_TOKENS})
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    sequence = "\n\n<start_of_image>" + "<image_soft_token>" * GEMMA3_TOKENS_PER_IMAGE + "<end_of_image>\n\n"
    return VisionProcessor(tok, images, GEMMA3_TEMPLATE, "<start_of_image>", None, "<image_soft_token>", sequence)


def save_gemma3(folder, seed: int = 0):
    """Save a random tiny Gemma 3 vision-language model (fp32) with its processor to `folder`; returns it.
    transformers initialises the projection to zeros (images would carry nothing): here it is random."""
    from transformers import Gemma3ForConditionalGeneration

    return _save(folder, Gemma3ForConditionalGeneration, gemma3_config(), gemma3_processor(), seed,
                 init=lambda m: m.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3))


GEMMA4_TOKENS = ["<|image>", "<image|>", "<|image|>"]  # ids 259, 260, 261: begin, end, soft token
GEMMA4_AUDIO_TOKENS = ["<|audio>", "<audio|>", "<|audio|>"]  # ids 262, 263, 264: begin, end, soft token
GEMMA4_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<|image|>").replace(
    "{% elif item['type'] == 'text' %}", "{% elif item['type'] == 'audio' %}{{ '<|audio|>' }}"
                                         "{% elif item['type'] == 'text' %}")


QWEN3_VIDEO_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 64}  # (tests/fixtures/qwen3vl_video.npz's)
# ... with Qwen3VLVideoProcessor's normalisation (0.5), where the tiny image processor keeps Qwen2-VL's CLIP mean / std
QWEN3_VIDEO = {**QWEN3_VIDEO_SIZE, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
GEMMA4_VIDEO_TEMPLATE = GEMMA4_TEMPLATE.replace("{% elif item['type'] == 'text' %}",
                                                "{% elif item['type'] == 'video' %}{{ '<|video|>' }}"
                                                "{% elif item['type'] == 'text' %}")


def qwen3_vl_video_processor():
    """Qwen3-VL's processor for the tiny models: 16-pixel patches merged 2 x 2, the video token <|video_pad|> (id
    262) with timestamps between the vision marks, the video settings QWEN3_VIDEO."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=QWEN_VL_VIDEO_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS + ["<|video_pad|>"]})  # ids 259-262
    images = Qwen2VLImageProcessorPil(patch_size=16, merge_size=MERGE, temporal_patch_size=2, min_pixels=32 * 32,
                                      max_pixels=(8 * 16) ** 2)
    return VisionProcessor(tok, images, QWEN_VL_VIDEO_TEMPLATE, "<|image_pad|>", MERGE, video_token="<|video_pad|>",
                           video_settings=dict(QWEN3_VIDEO), video_stamps=("<|vision_start|>", "<|vision_end|>"))


def gemma4_video_processor():
    """Gemma 4's processor for the tiny models with the video token <|video|> (id 265): images at 140 soft tokens,
    video frames at the video processor's 70."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=GEMMA4_VIDEO_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": GEMMA4_TOKENS + GEMMA4_AUDIO_TOKENS + ["<|video|>"]})
    return VisionProcessor(tok, Gemma4ImageProcessorPil(max_soft_tokens=140), GEMMA4_VIDEO_TEMPLATE, "<|image|>",
                           None, soft_token_marks=("<|image>", "<image|>"), video_token="<|video|>",
                           video_settings={"max_soft_tokens": 70})


def gemma4_config(audio: bool = False, video: bool = False, **text):
    """A tiny Gemma 4 vision-language config: the 31B's text layout (tests/tiny.py's gemma4_text, `text` overrides)
    with two-way attention inside images, a 2-layer tower of 16-pixel patches pooled 3 x 3; with `audio` a 2-layer
    audio tower (hidden 32; its subsampling's first convolution must have as many channels as mel bins, 128); with
    `video` a video token inside the vocabulary (265)."""
    from transformers import Gemma4Config
    from tiny import TINY

    text = {**dict(TINY, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                   sliding_window=4, layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                   final_logit_softcapping=30.0, use_bidirectional_attention="vision"), **text}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    heard = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[128, 4],
                 output_proj_dims=48) if audio else None
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=heard, boi_token_id=259, eoi_token_id=260,
                        image_token_id=261, boa_token_id=262, eoa_token_index=263, audio_token_id=264,
                        video_token_id=265 if video else 258_884)  # (outside the vocabulary: never generated)


def gemma4_processor(tok=None, audio: bool = False):
    """fasttune's VisionProcessor as Gemma4Processor expands images: each <|image|> becomes <|image> + one soft token
    per pooled patch group (Gemma4ImageProcessor's count, images resized to at most 70) + <image|>; with `audio`,
    each <|audio|> becomes <|audio> + one soft token per 40 ms of its clip + <audio|> (16 kHz clips)."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=GEMMA4_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": GEMMA4_TOKENS + GEMMA4_AUDIO_TOKENS})
    heard = dict(audio_extractor=Gemma4AudioFeatureExtractor(), audio_marks=("<|audio>", "<|audio|>", "<audio|>")) \
        if audio else {}
    return VisionProcessor(tok, Gemma4ImageProcessorPil(max_soft_tokens=70), GEMMA4_TEMPLATE, "<|image|>", None,
                           soft_token_marks=("<|image>", "<image|>"), **heard)


def save_gemma4(folder, seed: int = 0, audio: bool = False, video: bool = False, **text):
    """Save a random tiny Gemma 4 vision-language model (fp32) with its processor to `folder`; returns it. The
    embedder's projection is drawn wider than transformers' init so images change the logits clearly; the language
    model's norms and layer scalars are drawn away from one so a misplaced one shows."""
    from transformers import Gemma4ForConditionalGeneration

    def init(model):
        model.model.embed_vision.embedding_projection.weight.normal_(0, 0.3)
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
        for name, b in model.model.language_model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)

    return _save(folder, Gemma4ForConditionalGeneration, gemma4_config(audio, video, **text),
                 gemma4_processor(audio=audio), seed, init=init)


MISTRAL3_TOKENS = ["[IMG_BREAK]", "[IMG_END]", "[IMG]"]  # ids 259, 260, 261
MISTRAL3_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "[IMG]")
MISTRAL3_PATCH = 8  # tower patches of 8 pixels, merged 2 x 2: one token per 16 x 16 pixels


def mistral3_config(text_type: str = "ministral3"):
    """Mistral 3: a 2-layer Pixtral tower (patch 8) and the 2 x 2 patch-merging projector in front of a Ministral 3
    text model (yarn RoPE, Llama 4's query scaling from position 16), a Mistral one (Mistral Small 3.1's) or a
    Mistral 4 one (Mistral Small 4's: Ministral 3's RoPE and scaling with latent attention and experts)."""
    from transformers import Mistral3Config

    text = dict(model_type=text_type, vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=256, pad_token_id=256, sliding_window=None)
    if text_type in ("ministral3", "mistral4"):
        text["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                   "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
    if text_type == "mistral4":  # Mistral Small 4: latent attention, layer 0 dense, then softmax-routed experts
        text.update(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=8,
                    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True)
        del text["head_dim"]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=MISTRAL3_PATCH, image_size=64, head_dim=16)
    return Mistral3Config(text_config=text, vision_config=vision, image_token_index=261, spatial_merge_size=2,
                          vision_feature_layer=-1, tie_word_embeddings=False)


def mistral3_processor(tok=None, longest_edge: int = 64):
    """fasttune's VisionProcessor as PixtralProcessor expands images: rows of [IMG] per 16 pixels, each closed by
    [IMG_BREAK], the last by [IMG_END]; images resized to at most `longest_edge` pixels a side."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=MISTRAL3_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": MISTRAL3_TOKENS})
    images = PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                                      patch_size={"height": MISTRAL3_PATCH, "width": MISTRAL3_PATCH})
    side = 2 * MISTRAL3_PATCH
    return VisionProcessor(tok, images, MISTRAL3_TEMPLATE, "[IMG]", None, image_rows=("[IMG_BREAK]", "[IMG_END]", side))


def save_mistral3(folder, seed: int = 0, text_type: str = "ministral3"):
    """Save a random tiny Mistral 3 (fp32) with its processor to `folder`; returns the folder."""
    from transformers import Mistral3ForConditionalGeneration

    return _save(folder, Mistral3ForConditionalGeneration, mistral3_config(text_type), mistral3_processor(), seed)


def qwen3_vl_config():
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                bos_token_id=None, eos_token_id=256, pad_token_id=256)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=MERGE, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1], in_channels=3)
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=261, video_token_id=271,
                         vision_start_token_id=259, vision_end_token_id=260, tie_word_embeddings=False)


def save_qwen3_vl(folder, seed: int = 0):
    """Save a random tiny Qwen3-VL (fp32, 3 decoder layers, DeepStack from both vision blocks) with its processor."""
    from transformers import Qwen3VLForConditionalGeneration

    return _save(folder, Qwen3VLForConditionalGeneration, qwen3_vl_config(), qwen_vl_processor(patch=16), seed)


def qwen3_5_config():
    """Qwen3.5: Qwen3-VL's tower (no DeepStack) and a 4-layer text model, 3 gated-DeltaNet layers then attention;
    head_dim 32 with half of it rotated, in interleaved sections (3, 3, 2)."""
    from transformers import Qwen3_5Config

    text = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                layer_types=["linear_attention"] * 3 + ["full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.5},
                bos_token_id=None, eos_token_id=256, pad_token_id=256)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=MERGE, temporal_patch_size=2, num_position_embeddings=64, in_channels=3)
    return Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=261, video_token_id=271,
                         vision_start_token_id=259, vision_end_token_id=260, tie_word_embeddings=False)


def qwen3_5_moe_config():
    """Qwen3.5-MoE: qwen3_5_config's model with 4 experts (top 2) and a 48-wide shared expert in every layer."""
    from transformers import Qwen3_5MoeConfig

    base = qwen3_5_config()
    text = base.text_config.to_dict()
    for key in ("model_type", "intermediate_size"):
        text.pop(key, None)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    vision = base.vision_config.to_dict()
    vision.pop("model_type", None)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, image_token_id=261, video_token_id=271,
                            vision_start_token_id=259, vision_end_token_id=260, tie_word_embeddings=False)


def save_qwen3_5_moe(folder, seed: int = 0):
    """Save a random tiny Qwen3.5-MoE (fp32) with its processor."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    def init(model):
        _init_deltanet(model)
        _init_experts(model)

    return _save(folder, Qwen3_5MoeForConditionalGeneration, qwen3_5_moe_config(), qwen_vl_processor(patch=16),
                 seed, init)


def save_qwen3_5(folder, seed: int = 0):
    """Save a random tiny Qwen3.5 (fp32; decay and conv weights spread so the DeltaNet layers matter) with its
    processor."""
    from transformers import Qwen3_5ForConditionalGeneration

    return _save(folder, Qwen3_5ForConditionalGeneration, qwen3_5_config(), qwen_vl_processor(patch=16), seed,
                 _init_deltanet)


def _init_deltanet(model):
    """Spread Qwen3.5's decay rates and conv taps, so that the DeltaNet layers' arithmetic shows in the outputs."""
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias", "conv1d.weight")):
            p.normal_(0.0, 0.5)


def qwen3_vl_moe_config():
    """Qwen3-VL's tiny config with a Qwen3-MoE decoder: 4 experts of width 32, top 2, layer 1 dense
    (mlp_only_layers), hidden 64 (so 2 x 32 = 64: experts square in gate_up; the loader goes through transformers,
    which knows the layout)."""
    from transformers import Qwen3VLMoeConfig

    base = qwen3_vl_config()
    text = base.text_config.to_dict()
    text.pop("model_type", None)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1],
                decoder_sparse_step=1)
    vision = base.vision_config.to_dict()
    vision.pop("model_type", None)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=261, video_token_id=271,
                            vision_start_token_id=259, vision_end_token_id=260, tie_word_embeddings=False)


def save_qwen3_vl_moe(folder, seed: int = 0):
    """Save a random tiny Qwen3-VL-MoE (fp32) with the Qwen3-VL test processor; experts drawn like the other weights
    (transformers' init leaves the stacked experts as they were allocated)."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    return _save(folder, Qwen3VLMoeForConditionalGeneration, qwen3_vl_moe_config(), qwen_vl_processor(patch=16), seed,
                 init=_init_experts)


def _init_experts(model):
    """Draw a Qwen3-VL-MoE's stacked experts like its other weights (transformers' init leaves them unset)."""
    for layer in model.model.language_model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            experts.gate_up_proj.normal_(0, 0.02)
            experts.down_proj.normal_(0, 0.02)


def qwen2_vl_config():
    from transformers import Qwen2VLConfig

    text = qwen_vl_config().text_config.to_dict()
    text.pop("model_type", None)
    return Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=2, in_channels=3), image_token_id=261, video_token_id=271, vision_start_token_id=259,
        vision_end_token_id=260, tie_word_embeddings=False)


def save_qwen2_vl(folder, seed: int = 0):
    """Save a random tiny Qwen2-VL (fp32) with the Qwen2.5-VL test processor (the same image processing)."""
    from transformers import Qwen2VLForConditionalGeneration

    return _save(folder, Qwen2VLForConditionalGeneration, qwen2_vl_config(), qwen_vl_processor(), seed)


def save_with_bpe(folder, family: str, seed: int = 0, text_type: str = "ministral3", audio: bool = False,
                  tower: str = "siglip", **vision):
    """A tiny vision-language model of `family` ("gemma3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
    "qwen3_5", "mistral3" with a `text_type` text model, "gemma4" with an audio tower if `audio`, "llava" with a
    "siglip" or "clip" `tower`, "internvl", "smolvlm") whose tokenizer is a
    trained BPE one (tests/bpe_tokenizers.py, 400 tokens, then the vision tokens; llama.cpp needs merges) in a
    416-token embedding, the vision weights and the decoder's q/k scaled up 3x; `vision`: vision_config overrides
    (Qwen2.5-VL: window_size, fullatt_block_indexes). Images up to 16 x 16 patches. Returns the folder."""
    import transformers
    from bpe_tokenizers import make_bpe_tokenizer

    tok = make_bpe_tokenizer("gpt2")
    tok.chat_template = {"gemma3": GEMMA3_TEMPLATE, "mistral3": MISTRAL3_TEMPLATE, "gemma4": GEMMA4_TEMPLATE,
                         "llava": LLAVA_TEMPLATE, "internvl": INTERNVL_TEMPLATE,
                         "smolvlm": IDEFICS3_TEMPLATE}.get(family, QWEN_VL_TEMPLATE)
    patch = 16 if family.startswith("qwen3") else PATCH
    if family == "gemma3":
        processor = gemma3_processor(tok)
    elif family == "gemma4":
        processor = gemma4_processor(tok, audio=audio)
    elif family == "mistral3":
        processor = mistral3_processor(tok, longest_edge=128)
    elif family == "llava":  # 56-pixel images: 4 x 4 patches of 14
        processor = llava_processor(tok, side=56, siglip=tower == "siglip")
    elif family == "internvl":
        processor = internvl_processor(tok)
    elif family == "smolvlm":  # tiles of 56 pixels, images up to 112 (2 x 2 tiles and the whole image)
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        tok.add_tokens(["\n\n"])  # libmtmd looks "\n\n" up as one token, as SmolLM2's vocabulary has it
        processor = idefics3_processor(tok)
        processor.image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 2 * IDEFICS3_TILE},
                                                            max_image_size={"longest_edge": IDEFICS3_TILE})
    else:
        processor = qwen_vl_processor(patch, tok=tok, max_side=16)
    if family in ("llava", "smolvlm"):
        start = end = None
        image = tok.convert_tokens_to_ids("<image>")
    else:
        start, end, image = tok.convert_tokens_to_ids({"gemma3": GEMMA3_TOKENS, "mistral3": MISTRAL3_TOKENS,
                                                       "gemma4": GEMMA4_TOKENS, "internvl": INTERNVL_TOKENS}.get(
            family, VISION_TOKENS))
    if family == "gemma3":
        config = gemma3_config()
        config.boi_token_id, config.eoi_token_id = start, end
    elif family == "gemma4":  # the 31B's text layout
        config = gemma4_config(audio=audio)
        config.boi_token_id, config.eoi_token_id = start, end
        if audio:
            config.boa_token_id, config.eoa_token_index, config.audio_token_id = tok.convert_tokens_to_ids(
                GEMMA4_AUDIO_TOKENS)
    elif family == "mistral3":  # Ministral 3's text model; images up to 128 pixels a side (8 x 8 tokens)
        config = mistral3_config(text_type)
        config.vision_config.image_size = 128
    elif family == "llava":
        config = llava_config(siglip=tower == "siglip")
        config.vision_config.image_size = 56
    elif family == "internvl":
        config = internvl_config()
    elif family == "smolvlm":
        from transformers import SmolVLMConfig

        base = idefics3_config()
        config = SmolVLMConfig(text_config=base.text_config.to_dict(), vision_config=base.vision_config.to_dict(),
                               scale_factor=2, tie_word_embeddings=False)
    else:
        config = {"qwen2_5_vl": qwen_vl_config, "qwen2_vl": qwen2_vl_config, "qwen3_vl": qwen3_vl_config,
                  "qwen3_vl_moe": qwen3_vl_moe_config, "qwen3_5": qwen3_5_config,
                  "qwen3_5_moe": qwen3_5_moe_config}[family]()
        config.vision_start_token_id, config.vision_end_token_id, config.video_token_id = start, end, image + 1

    def init(model):  # sharper attention than the default init's, so positions and windows change the outputs
        if family in ("qwen3_vl_moe", "qwen3_5_moe"):
            _init_experts(model)
        if family in ("qwen3_5", "qwen3_5_moe"):
            _init_deltanet(model)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and any(k in name for k in (".visual.", ".vision_tower.", "q_proj", "k_proj")):
                p.mul_(3.0)
        if family == "gemma3":
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
        if family == "internvl":  # transformers starts these at zero: a position off by one would not show
            emb = model.model.vision_tower.embeddings
            for p in (emb.cls_token, emb.position_embeddings, emb.patch_embeddings.projection.bias):
                p.normal_(0, 0.5)
    config.image_token_id = image
    config.text_config.vocab_size = 416 if len(tok) <= 416 else 448  # (SmolVLM: 36 row / column tokens more)
    if family not in ("gemma3", "mistral3", "gemma4"):  # llama-cpp-python 0.3.36's qwen2vl ignores its RMSNorm eps
        config.text_config.rms_norm_eps = 1e-12
    config.text_config.eos_token_id = config.text_config.pad_token_id = tok.eos_token_id
    if family == "qwen3_vl_moe":  # llama.cpp's qwen3vlmoe makes every layer sparse
        config.text_config.mlp_only_layers = []
    if family in ("qwen3_vl", "qwen3_vl_moe"):  # sections that llama.cpp's interleaved M-RoPE splits as transformers does (its rule
        # sends the pairs that [2, 3, 3] leaves over to a fourth axis; export/gguf_mmproj.py warns about that)
        config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": [3, 3, 2]}
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    cls = {"gemma3": "Gemma3ForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration",
           "gemma4": "Gemma4ForConditionalGeneration", "llava": "LlavaForConditionalGeneration",
           "internvl": "InternVLForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
           "qwen2_vl": "Qwen2VLForConditionalGeneration",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration",
           "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}[family]
    return _save(folder, getattr(transformers, cls), config, processor, seed, init=init)


def trl_policy_on_tiny_qwen_vl(load, tmp):
    """For the TRL oracle scripts (tests/fixtures/make_vision_*_trl.py): the tiny Qwen2.5-VL saved under `tmp`, and
    transformers' model of it with PEFT carrying the adapter fasttune's `load(folder)` starts with (LoRA B zero),
    trainable, fp32. Returns (folder, PeftModel)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    folder = save_qwen_vl(tmp / "vl")
    model, _ = load(folder)
    model.save_pretrained(tmp / "init")
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    return folder, PeftModel.from_pretrained(hf, str(tmp / "init"), is_trainable=True)


IDEFICS3_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]  # ids 259, 260, 261, 262, then 263..298
IDEFICS3_TILE = 56  # tiles of 56 x 56 pixels: 4 x 4 patches of 14, pixel-shuffled by 2: 4 tokens a tile


def idefics3_config():
    """SmolVLM's layout (transformers' Idefics3Config): a 2-layer SigLIP-style tower on 56-pixel tiles and the
    pixel-shuffle connector (scale 2) in front of a Llama text model."""
    from transformers import Idefics3Config

    text = dict(model_type="llama", vocab_size=304, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                bos_token_id=None, eos_token_id=256, pad_token_id=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IDEFICS3_TILE, patch_size=14)
    return Idefics3Config(text_config=text, vision_config=vision, image_token_id=260, scale_factor=2,
                          tie_word_embeddings=False)


def idefics3_processor(tok=None):
    """fasttune's VisionProcessor as Idefics3Processor expands images: images up to 2 x 2 crops of 56 pixels (longest
    edge 112) plus the whole image, 4 tokens a tile."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=IDEFICS3_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * IDEFICS3_TILE},
                                       max_image_size={"longest_edge": IDEFICS3_TILE})
    return VisionProcessor(tok, images, IDEFICS3_TEMPLATE, "<image>", None,
                           image_tiles=("<fake_token_around_image>", "<global-img>", 4))


def save_idefics3(folder, seed: int = 0):
    """Save a random tiny Idefics3 (SmolVLM) model (fp32) with its processor to `folder`; returns the folder."""
    from transformers import Idefics3ForConditionalGeneration

    return _save(folder, Idefics3ForConditionalGeneration, idefics3_config(), idefics3_processor(), seed)


def save_smolvlm(folder, seed: int = 0):
    """Save a random tiny SmolVLM2 (transformers' SmolVLMForConditionalGeneration: Idefics3's layout) model (fp32)
    with Idefics3's tiny processor and SmolVLM's image processor; returns the folder."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    base = idefics3_config()
    config = SmolVLMConfig(text_config=base.text_config.to_dict(), vision_config=base.vision_config.to_dict(),
                           image_token_id=260, scale_factor=2, tie_word_embeddings=False)
    proc = idefics3_processor()
    proc.image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 2 * IDEFICS3_TILE},
                                                    max_image_size={"longest_edge": IDEFICS3_TILE})
    return _save(folder, SmolVLMForConditionalGeneration, config, proc, seed)


INTERNVL_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]  # ids 259, 260, 261


def internvl_config():
    """InternVL's layout (transformers' InternVLConfig): a 2-layer InternViT on 56-pixel patches of 14 (16 a patch,
    pixel-shuffled by 0.5: 4 tokens a patch) and the MLP projector in front of a Qwen2 text model."""
    from transformers import InternVLConfig

    text = dict(model_type="qwen2", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                bos_token_id=None, eos_token_id=256, pad_token_id=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[56, 56], patch_size=[14, 14])
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=261, downsample_ratio=0.5,
                          tie_word_embeddings=False)


def internvl_processor(tok=None):
    """fasttune's VisionProcessor as InternVLProcessor expands images: each image cut into up to 4 patches of 56
    pixels plus a thumbnail (GotOcr2's crop_to_patches), 4 <IMG_CONTEXT> tokens a patch between <img> and </img>."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=INTERNVL_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": INTERNVL_TOKENS})
    images = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    return VisionProcessor(tok, images, INTERNVL_TEMPLATE, "<IMG_CONTEXT>", None, patch_span=("<img>", "</img>", 4))


def save_internvl(folder, seed: int = 0):
    """Save a random tiny InternVL (fp32) with its processor to `folder`; returns the folder."""
    from transformers import InternVLForConditionalGeneration

    return _save(folder, InternVLForConditionalGeneration, internvl_config(), internvl_processor(), seed)


LLAVA_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")


def llava_config(siglip: bool = False):
    """LLaVA-1.5's layout (transformers' LlavaConfig): a 2-layer CLIP tower on 28-pixel images of 14-pixel patches
    (4 tokens an image: the second-to-last layer without its class token) and the MLP projector before a Llama;
    `siglip`: llava-interleave's instead, a SigLIP tower whose last layer gives every patch (4 tokens too)."""
    from transformers import LlavaConfig

    text = dict(model_type="llama", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=None, eos_token_id=256, pad_token_id=256)
    vision = dict(model_type="siglip_vision_model" if siglip else "clip_vision_model", hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                  **({} if siglip else dict(projection_dim=32)))
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=259,
                       vision_feature_layer=-1 if siglip else -2,
                       vision_feature_select_strategy="full" if siglip else "default", tie_word_embeddings=False)


def llava_processor(tok=None, side: int = 28, siglip: bool = False):
    """fasttune's VisionProcessor as LlavaProcessor expands images: each <image> becomes one per 14-pixel patch (the
    class token dropped: 4 at 28 pixels); CLIP's image processor at `side` pixels (`siglip`: SigLIP's)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=LLAVA_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id 259
    images = SiglipImageProcessorPil(size={"height": side, "width": side}) if siglip else \
        CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return VisionProcessor(tok, images, LLAVA_TEMPLATE, "<image>", None, image_sequence="<image>" * (side // 14) ** 2)


def save_llava(folder, seed: int = 0):
    """Save a random tiny LLaVA (fp32) with its processor to `folder`; returns the folder."""
    from transformers import LlavaForConditionalGeneration

    return _save(folder, LlavaForConditionalGeneration, llava_config(), llava_processor(), seed)


LLAVA_NEXT_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84]]  # grids of up to 2 x 2 tiles of 28


def llava_next_config():
    """LLaVA-NeXT's layout (transformers' LlavaNextConfig): LLaVA's tiny CLIP tower (28-pixel tiles of 14-pixel
    patches, 4 tokens a tile) on each image's grid of tiles (LLAVA_NEXT_PINPOINTS) plus the whole image, the MLP
    projector and the row-end image_newline, before a Llama."""
    from transformers import LlavaNextConfig

    base = llava_config()
    return LlavaNextConfig(text_config=base.text_config.to_dict(), vision_config=base.vision_config.to_dict(),
                           image_token_index=259, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)


def llava_next_processor(tok=None):
    """fasttune's VisionProcessor as LlavaNextProcessor expands images: each <image> becomes the image's feature count
    (its whole-image tile, its grid of tiles cut back to the image's aspect ratio, one newline token a row), with
    LlavaNextImageProcessor's tiles (transformers' PIL one)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=LLAVA_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id 259
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                       image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    return VisionProcessor(tok, images, LLAVA_TEMPLATE, "<image>", None,
                           anyres=(tuple(map(tuple, LLAVA_NEXT_PINPOINTS)), 28, 14, None))


def save_llava_next(folder, seed: int = 0):
    """Save a random tiny LLaVA-NeXT (fp32) with its processor to `folder`; returns the folder. image_newline is
    drawn N(0, 1) (transformers' init leaves it as allocated)."""
    from transformers import LlavaNextForConditionalGeneration

    return _save(folder, LlavaNextForConditionalGeneration, llava_next_config(), llava_next_processor(), seed,
                 init=lambda m: m.model.image_newline.normal_())


def llava_onevision_config():
    """LLaVA-OneVision's layout (transformers' LlavaOnevisionConfig): a 2-layer SigLIP tower (every patch kept: the
    "full" strategy, 4 tokens a 28-pixel tile), LLaVA-NeXT's tiles (LLAVA_NEXT_PINPOINTS) with grids of more than one
    tile's features interpolated down (anyres_max_1, so the tiny grids are), before a Qwen2."""
    from transformers import LlavaOnevisionConfig

    base = llava_config(siglip=True)
    text = {**base.text_config.to_dict(), "model_type": "qwen2"}
    return LlavaOnevisionConfig(text_config=text, vision_config=base.vision_config.to_dict(), image_token_index=259,
                                image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
                                tie_word_embeddings=False)


def llava_onevision_processor(tok=None):
    """fasttune's VisionProcessor as LlavaOnevisionProcessor expands images (LLaVA-NeXT's count, the grid's features
    capped at one tile's worth), with LlavaOnevisionImageProcessor's 28-pixel tiles (transformers' PIL one)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=LLAVA_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id 259
    images = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                             image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    return VisionProcessor(tok, images, LLAVA_TEMPLATE, "<image>", None,
                           anyres=(tuple(map(tuple, LLAVA_NEXT_PINPOINTS)), 28, 14, 1))


def save_llava_onevision(folder, seed: int = 0):
    """Save a random tiny LLaVA-OneVision (fp32) with its processor to `folder`; returns the folder."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return _save(folder, LlavaOnevisionForConditionalGeneration, llava_onevision_config(),
                 llava_onevision_processor(), seed, init=lambda m: m.model.image_newline.normal_())


LLAVA_VIDEO_TEMPLATE = LLAVA_TEMPLATE.replace("{% elif item['type'] == 'text' %}",
                                              "{% elif item['type'] == 'video' %}{{ '<video>\n' }}"
                                              "{% elif item['type'] == 'text' %}")
ONEVISION_VIDEO_PINPOINTS = [[42, 42], [42, 84], [84, 42], [84, 84]]


def save_llava_onevision_video(folder, seed: int = 0):
    """A random tiny LLaVA-OneVision (fp32) for videos, saved with its processor to `folder`: llava_onevision_config
    with a 42-pixel SigLIP tower (3 x 3 patches, so each frame's features pool to 2 x 2 by bilinear interpolation,
    not a trivial 2 x 2 -> 1) and <video> (id 260) beside <image> (259); the processor's videos are frames of 42 x 42
    pixels. Returns the folder."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from fasttune.data.vision import VisionProcessor

    base = llava_onevision_config().to_dict()
    vision = {**base["vision_config"], "image_size": 42}
    config = LlavaOnevisionConfig(text_config=base["text_config"], vision_config=vision, image_token_index=259,
                                  video_token_index=260, image_grid_pinpoints=ONEVISION_VIDEO_PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_1", tie_word_embeddings=False)
    tok = make_tiny_tokenizer(chat_template=LLAVA_VIDEO_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})  # ids 259, 260
    images = LlavaOnevisionImageProcessorPil(size={"height": 42, "width": 42},
                                             image_grid_pinpoints=ONEVISION_VIDEO_PINPOINTS)
    proc = VisionProcessor(tok, images, LLAVA_VIDEO_TEMPLATE, "<image>", None, video_token="<video>",
                           video_settings={"height": 42, "width": 42, "pooled": 3},
                           anyres=(tuple(map(tuple, ONEVISION_VIDEO_PINPOINTS)), 42, 14, 1))
    return _save(folder, LlavaOnevisionForConditionalGeneration, config, proc, seed,
                 init=lambda m: m.model.image_newline.normal_())


def oracle_inputs(folder, batch, proc) -> dict:
    """What transformers' model needs besides the processor output to see the images as its processor marks them:
    Qwen's mm_token_type_ids (its multimodal positions) or Gemma 3's token_type_ids (two-way image attention);
    Mistral 3 needs none (plain positions, causal attention over the image tokens); Idefics3 takes its tiles in its
    own (rows, images, C, H, W) layout (these keys replace the batch's); Llama 3.2 Vision its cross_attention_mask."""
    marks = (batch["input_ids"] == proc.image_token_id).long()
    if "mllama" in str(folder):  # MllamaProcessor's cross_attention_mask, by transformers' own functions
        return {"cross_attention_mask": mllama_cross_mask(batch)}
    if any(name in str(folder) for name in ("mistral3", "internvl", "llava", "aya")):  # image tokens found by id
        return {}
    if "paligemma" in str(folder):  # a collated batch marks its answers (an objective's batch: its completions); a
        if "token_type_ids" in batch:  # prompt from the processor is all prefix (two-way), as PaliGemmaProcessor's
            return {}
        types, done = batch["input_ids"] * 0, batch.get("completion_mask")  # (GRPO's: the last columns only)
        if done is not None:
            types[:, types.shape[1] - done.shape[1]:] = done.long()
        return {"token_type_ids": types}
    if "idefics3" in str(folder) or "smolvlm" in str(folder):  # transformers' layout of the tiles: (rows, images,
        # ...); here one row holds them all
        return {"pixel_values": batch["pixel_values"][None],
                "pixel_attention_mask": batch["pixel_attention_mask"][None]}
    return {"token_type_ids": marks} if "gemma3" in str(folder) else {"mm_token_type_ids": marks.int()}  # (Gemma 4:
    # its image tokens see each other both ways in the sliding layers)


def image_count(batch: dict, proc) -> int:
    """The images a collated batch carries: Qwen's grids, Idefics3's whole-image tiles (one <global-img> each),
    InternVL's spans (one <img> each), else the pixel_values' images."""
    if "pixel_attention_mask" in batch:
        return int((batch["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<global-img>")).sum())
    if "aspect_ratio_ids" in batch:  # Llama 3.2 Vision: per row its images, padding ones with id 0
        return int((batch["aspect_ratio_ids"] > 0).sum())
    if proc.patch_span is not None:  # InternVL: one <img> an image
        return int((batch["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.patch_span[0])).sum())
    return batch.get("image_grid_thw", batch["pixel_values"]).shape[0]


MLLAMA_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<|image|>")
MLLAMA_RATIOS = [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [2, 2], [4, 1]]


def mllama_config(cross_layers=(1,)):
    """Llama 3.2 Vision's layout (transformers' MllamaConfig): a 3-layer Llama text model whose layer 1 is a
    cross-attention layer, behind MllamaVisionModel on 28-pixel tiles of 14-pixel patches (5 positions a tile with
    the class token, up to 4 tiles an image), 2 local layers (both given as intermediate features) and 1 global one;
    <|image|> is id 259, the first of the embedding's 8 rows past the 259-token vocabulary."""
    from transformers import MllamaConfig

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=list(cross_layers), vocab_size=259, pad_token_id=256,
                bos_token_id=257, eos_token_id=256, rope_theta=10000.0, max_position_embeddings=512)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=28, patch_size=14, max_num_tiles=4, vision_output_dim=96,
                  intermediate_layers_indices=[0, 1], supported_aspect_ratios=MLLAMA_RATIOS)
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=259)


def mllama_processor(tok=None):
    """fasttune's VisionProcessor as MllamaProcessor writes images (one <|image|> each, id 259), with
    MllamaImageProcessor's 28-pixel tiles, up to 4 an image (transformers' PIL one)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=MLLAMA_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})  # id 259
    images = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4)
    return VisionProcessor(tok, images, MLLAMA_TEMPLATE, "<|image|>", None, image_sequence="<|image|>",
                           cross_images=True)


def save_mllama(folder, seed: int = 0):
    """Save a random tiny Llama 3.2 Vision (fp32) with its processor to `folder`; returns the folder. The
    cross-attention layers' tanh gates are drawn N(0, 1) (transformers starts them at 0, which would hide the
    layers)."""
    from transformers import MllamaForConditionalGeneration

    def init(model):
        for layer in model.model.language_model.layers:
            for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if hasattr(layer, name):
                    getattr(layer, name).normal_()

    return _save(folder, MllamaForConditionalGeneration, mllama_config(), mllama_processor(), seed, init=init)


def mllama_cross_mask(batch: dict):
    """MllamaProcessor's cross_attention_mask (B, T, images, tiles) for a batch of fasttune's processor, computed by
    transformers' get_cross_attention_token_mask / convert_sparse_cross_attention_mask_to_dense (the oracle)."""
    import torch
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    ids = batch["input_ids"]
    spans = [get_cross_attention_token_mask(row.tolist(), 259) for row in ids]
    tiles = [[int(n) for n in row[:len(s)]] for row, s in zip(batch["aspect_ratio_mask"].sum(-1), spans)]
    return torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(spans, tiles, 4, ids.shape[1]))


AYA_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
AYA_TOKENS = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>"]  # ids 259, 260, 261


def aya_vision_config():
    """Aya Vision's layout (transformers' AyaVisionConfig): a 2-layer SigLIP tower on 56-pixel patches of 14 (every
    patch of its last layer, pixel-shuffled 2 x 2 by the projector: 4 tokens a tile) before a Cohere 2 text model
    (4 layers, the last one full)."""
    from transformers import AyaVisionConfig

    text = dict(model_type="cohere2", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"], logit_scale=0.25,
                bos_token_id=257, eos_token_id=256, pad_token_id=256)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14)
    return AyaVisionConfig(text_config=text, vision_config=vision, image_token_index=261, downsample_factor=2,
                           tie_word_embeddings=True)


def aya_vision_processor(tok=None):
    """fasttune's VisionProcessor as AyaVisionProcessor expands images: GotOcr2's crops of 56 pixels (up to 4) and a
    thumbnail, each tile 4 <|IMG_PATCH|> tokens after its TILE_<k> (the thumbnail's after TILE_GLOBAL), between
    <|START_OF_IMG|> and <|END_OF_IMG|>."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=AYA_TEMPLATE) if tok is None else tok
    tok.add_special_tokens({"additional_special_tokens": AYA_TOKENS})
    images = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    return VisionProcessor(tok, images, AYA_TEMPLATE, "<image>", None, feature_token="<|IMG_PATCH|>",
                           aya_tiles=("<|START_OF_IMG|>", "<|END_OF_IMG|>", "TILE", "TILE_GLOBAL", 4))


def save_aya_vision(folder, seed: int = 0):
    """Save a random tiny Aya Vision (fp32) with its processor to `folder`; returns the folder."""
    from transformers import AyaVisionForConditionalGeneration

    return _save(folder, AyaVisionForConditionalGeneration, aya_vision_config(), aya_vision_processor(), seed)


def paligemma_config(text_type: str = "gemma"):
    """PaliGemma's layout (transformers' PaliGemmaConfig): a 2-layer SigLIP tower on 28-pixel images of 14-pixel
    patches (4 tokens an image) through the linear projector before a Gemma (`text_type` "gemma2": PaliGemma 2's Gemma
    2, its sliding layer's window 4 cutting through the prefix)."""
    from transformers import PaliGemmaConfig

    text = dict(model_type=text_type, vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rms_norm_eps=1e-6, bos_token_id=257, eos_token_id=256, pad_token_id=256)
    if text_type == "gemma2":
        text.update(sliding_window=4, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, projection_dim=64)
    return PaliGemmaConfig(text_config=text, vision_config=vision, image_token_id=259, projection_dim=64)


def paligemma_processor(tok=None):
    """fasttune's VisionProcessor as PaliGemmaProcessor lays rows out: each image's 4 <image> tokens first, then <bos>
    (here <|im_start|>), the prompt and "\\n" (the prefix), the answer and <eos>; SigLIP's image processor at 28
    pixels. The template is data/vision_settings.py's PaliGemma one (its checkpoints ship none)."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from fasttune.data.vision import VisionProcessor
    from fasttune.data.vision_settings import PALIGEMMA_TEMPLATE

    tok = make_tiny_tokenizer(chat_template=None) if tok is None else tok
    tok.bos_token = "<|im_start|>"  # id 257
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id 259
    images = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    return VisionProcessor(tok, images, PALIGEMMA_TEMPLATE, "<image>", None, image_sequence="<image>" * 4,
                           prefix_lm=True)


def save_paligemma(folder, seed: int = 0, text_type: str = "gemma"):
    """Save a random tiny PaliGemma (PaliGemma 2 with text_type "gemma2"; fp32) with its processor; returns the
    folder."""
    from transformers import PaliGemmaForConditionalGeneration

    return _save(folder, PaliGemmaForConditionalGeneration, paligemma_config(text_type), paligemma_processor(), seed)


def save_paligemma2(folder, seed: int = 0):
    return save_paligemma(folder, seed, "gemma2")
