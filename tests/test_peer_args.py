"""peer_args.py: the peer's (Unsloth's) from_pretrained / get_peft_model arguments run as its scripts pass them
(each at the peer's default, and the common translations: device_map, use_gradient_checkpointing at load,
load_in_16bit), and the ones fasttune does not implement are named with their fix when set."""
import pytest

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError

# The peer's loader and adapter arguments at the values its signatures default to (2026 releases).
LOAD = dict(max_seq_length=64, dtype=None, load_in_4bit=False, load_in_8bit=False, load_in_16bit=False,
            full_finetuning=False, token=None, device_map="sequential", rope_scaling=None, fix_tokenizer=True,
            trust_remote_code=False, use_gradient_checkpointing="unsloth", resize_model_vocab=None, revision=None,
            use_exact_model_name=False, offload_embedding=False, float32_mixed_precision=None, fast_inference=False,
            gpu_memory_utilization=0.5, float8_kv_cache=False, random_state=3407, max_lora_rank=64,
            disable_log_stats=True, qat_scheme=None, load_in_fp8=False, unsloth_tiled_mlp=False)
PEFT = dict(r=16, target_modules=["q_proj", "v_proj"], lora_alpha=16, lora_dropout=0.0, bias="none",
            layers_to_transform=None, layers_pattern=None, use_gradient_checkpointing="unsloth", random_state=3407,
            max_seq_length=2048, use_rslora=False, modules_to_save=None, init_lora_weights=True, loftq_config={},
            temporary_location="_unsloth_temporary_saved_buffers", qat_scheme=None, target_parameters=None,
            ensure_weight_tying=False)


def test_the_peers_arguments_at_their_defaults_run(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    model, tok = FastLanguageModel.from_pretrained(folder, **LOAD)
    assert model.gradient_checkpointing == "offload"  # "unsloth" at load, as get_peft_model reads it
    model = FastLanguageModel.get_peft_model(model, **PEFT)
    assert model.lora_settings.target_modules == ["q_proj", "v_proj"]
    for device_map in ("auto", "cpu", {"": "cpu"}, None):
        model, _ = FastLanguageModel.from_pretrained(folder, device_map=device_map)
        assert model.device.type == "cpu"
    model, _ = FastLanguageModel.from_pretrained(folder, full_finetuning=True, use_gradient_checkpointing=False)
    assert model.gradient_checkpointing is False


@pytest.mark.parametrize("call, kw, match", [
    ("load", dict(revision="v2.0"), r"from_pretrained\(revision='v2.0'\) is not supported: .*download that revision"),
    ("load", dict(qat_scheme="int4"), "quantization-aware training is not implemented"),
    ("load", dict(load_in_fp8="block"), "FP8 with block scales is not implemented"),
    ("load", dict(resize_model_vocab=320), "add_new_tokens"),
    ("load", dict(device_map={"model.layers.0": 0, "lm_head": 1}), "spreads the model over several devices"),
    ("load", dict(load_in_16bit=True, load_in_4bit=True), "give one"),
    ("load", dict(use_gradient_checkpointing="sometimes"), "use_gradient_checkpointing='sometimes' is invalid"),
    ("load", dict(load_in_2bit=True), "from_pretrained got an unknown argument 'load_in_2bit'"),
    ("peft", dict(layers_to_transform=[0]), r"get_peft_model\(layers_to_transform=\[0\]\) is not supported"),
    ("peft", dict(ensure_weight_tying=True), "ensure_weight_tying off"),
    ("peft", dict(lora_alhpa=8), "get_peft_model got an unknown argument 'lora_alhpa'"),
])
def test_what_fasttune_does_not_implement_is_named(call, kw, match, tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    with pytest.raises(ConfigError, match=match):
        if call == "load":
            FastLanguageModel.from_pretrained(folder, **kw)
        else:
            FastLanguageModel.get_peft_model(FastLanguageModel.from_pretrained(folder)[0], **kw)


def test_the_peers_layer_switches_on_a_text_model(tiny_model_dir):
    """FastModel's switches as the peer's notebooks pass them (finetune_audio_layers=False included) train the
    language layers; a vision or audio switch on a text model is named."""
    from fasttune import FastModel

    folder = str(tiny_model_dir("llama"))
    switches = dict(finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
                    finetune_mlp_modules=True, finetune_audio_layers=False)
    model = FastModel.get_peft_model(FastModel.from_pretrained(folder)[0], **switches)
    assert "gate_proj" in model.lora_settings.target_modules
    for switch in ("finetune_vision_layers", "finetune_audio_layers"):
        with pytest.raises(ConfigError, match=f"{switch}=True: this is a text-only model"):
            FastModel.get_peft_model(FastModel.from_pretrained(folder)[0], **{**switches, switch: True})
