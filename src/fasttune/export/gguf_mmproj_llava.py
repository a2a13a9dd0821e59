"""The mmproj of a LLaVA model with a SigLIP tower (transformers' LlavaForConditionalGeneration: SigLIP and the
two-layer MLP projector, as llava-interleave's) for llama.cpp's clip, projector type "mlp" (clip_graph_llava).

Layout and keys follow what llama.cpp's tools/mtmd reads for LLaVA (the files its
legacy-models/convert_image_encoder_to_gguf.py writes; convert_hf_to_gguf.py has no LLaVA-1.5 path):
- the tower: `v.patch_embd.{weight,bias}`, `v.position_embd.weight`, `v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,
  ln2,ffn_up,ffn_down}` with fc1 as ffn_up and fc2 as ffn_down (clip swaps the legacy files' reversed pair by shape
  itself); the tower's post_layernorm and pooling head are not written (clip would apply the norm to the selected
  layer's states, transformers does not) nor the layers past the deepest selected one;
- the projector `mm.0` / `mm.2` (linear_1 / linear_2, zero biases when the model has none: clip adds them);
- `clip.vision.feature_layer`: the selected hidden states as transformers indexes them (0: the embeddings, n: after
  layer n), concatenated along the channels in that order by both; `clip.vision.block_count` the deepest of them;
  `clip.use_gelu` (SigLIP's tanh GELU).

Refused: CLIP towers (LLaVA-1.5): llama.cpp's clip (llama-cpp-python 0.3.36's build) appends the class token after
the patches, gives it the last position embedding, and returns it in place of the first patch (tested: its rows
0..n-2 are transformers' patches 1..n-1 once the position table is rotated), so no file computes transformers'
model; SigLIP towers selected with vision_feature_select_strategy "default" (transformers then drops a patch, clip
keeps every one).
"""
from __future__ import annotations

import re

import torch

from fasttune.errors import ConfigError
from fasttune.export.gguf_mmproj_tower import renamed, siglip_encoder, write_tower_sizes

SIGLIP = "siglip_vision_model"

_TOWER = r"vision_tower\.(?:vision_model\.)?"
LLAVA = siglip_encoder(_TOWER)
_UNUSED = re.compile(_TOWER + r"(post_layernorm|head)\.")


def feature_layers(model) -> list[int]:
    """transformers' vision_feature_layer (an index or a list; negative from the end of hidden_states, which holds
    num_hidden_layers + 1 states) as clip's non-negative hidden-state indices."""
    cfg = model.hf_config
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else \
        [cfg.vision_feature_layer]
    states = int(cfg.vision_config.num_hidden_layers) + 1
    return [int(i) if int(i) >= 0 else states + int(i) for i in layers]


def check_llava(model) -> None:
    """ConfigError when clip's llava graph would compute another model: a CLIP tower (see the module docstring) or
    any but SigLIP, rows selected otherwise than clip keeps them, feature layers out of order, another tower or
    projector activation."""
    cfg, vision = model.hf_config, model.hf_config.vision_config
    tower = vision.model_type
    if tower == "clip_vision_model":
        raise ConfigError("GGUF export of LLaVA models with a CLIP vision tower (LLaVA-1.5) is refused: llama.cpp's "
                          "clip puts the class token after the patches and returns it in place of the first patch, "
                          "so the GGUF would compute another model than this one. Save the merged model with "
                          "save_pretrained_merged instead.")
    if tower != SIGLIP:
        raise ConfigError(f"This LLaVA model's vision tower is {tower}; the GGUF export runs LLaVA with SigLIP "
                          f"towers, so it cannot be exported. Save the merged model with save_pretrained_merged.")
    if cfg.vision_feature_select_strategy != "full":
        raise ConfigError(f"This LLaVA model selects its image features with vision_feature_select_strategy="
                          f"{cfg.vision_feature_select_strategy!r}, which drops the first patch of its SigLIP tower; "
                          f"llama.cpp's clip keeps every patch ('full'), so it cannot be exported to GGUF.")
    layers = feature_layers(model)
    if layers != sorted(set(layers)) or layers[-1] == 0:
        raise ConfigError(f"This LLaVA model concatenates the tower's hidden states {cfg.vision_feature_layer} "
                          f"(vision_feature_layer); llama.cpp's clip takes them in increasing order of depth, after "
                          f"at least one layer, so it cannot be exported to GGUF.")
    if vision.hidden_act != "gelu_pytorch_tanh":
        raise ConfigError(f"This LLaVA vision tower uses hidden_act={vision.hidden_act!r}; llama.cpp's clip computes "
                          f"gelu_pytorch_tanh for it, so it cannot be exported to GGUF.")
    if cfg.projector_hidden_act != "gelu":
        raise ConfigError(f"This LLaVA projector uses projector_hidden_act={cfg.projector_hidden_act!r}; llama.cpp's "
                          f"clip computes GELU between its two layers, so it cannot be exported to GGUF.")


def llava_tensor(model, short: str, t: torch.Tensor) -> dict:
    """{clip name: tensor} for one transformers tensor `short` (without the leading "model.") of a LLaVA model's
    tower or projector (empty for those clip does not read). Raises ConfigError for a name with no place."""
    if _UNUSED.match(short):
        return {}
    layer = re.match(_TOWER + r"encoder\.layers\.(\d+)\.", short)
    if layer and int(layer[1]) >= max(feature_layers(model)):  # past the deepest selected state: never run
        return {}
    proj = re.fullmatch(r"multi_modal_projector\.linear_([12])\.(weight|bias)", short)
    if proj:
        return {f"mm.{2 * int(proj[1]) - 2}.{proj[2]}": t}
    return renamed(LLAVA, short, t, "LLaVA (mlp)")


def add_missing_biases(tensors: dict) -> None:
    """Zero biases for a projector built without them (multimodal_projector_bias=False): clip's mlp adds mm.0 /
    mm.2 biases unconditionally."""
    for i in (0, 2):
        if f"mm.{i}.bias" not in tensors:
            tensors[f"mm.{i}.bias"] = torch.zeros(tensors[f"mm.{i}.weight"].shape[0])


def write_llava_metadata(writer, model) -> None:
    """clip's hyperparameters of a LLaVA tower (see the module docstring); the projector type, head count, patch
    size and image mean / std are written by export/gguf_mmproj.py's write_mmproj."""
    vision = model.hf_config.vision_config
    layers = feature_layers(model)
    write_tower_sizes(writer, vision, vision.image_size, max(layers))
    writer.add_array("clip.vision.feature_layer", layers)
    writer.add_vision_use_gelu(True)  # (SigLIP's tanh GELU)
