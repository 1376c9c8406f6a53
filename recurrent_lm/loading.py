"""Loading a trained model and its tokenizer from a directory (or a shipped checkpoint's name), with clear errors
for anything else."""

import json
from pathlib import Path

from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from .model import RecurrentLM
from .recipes import checkpoint_names, resolve_model_dir


def model_type(path: str | Path) -> str | None:
    """The model_type of a model directory's config.json."""
    config = resolve_model_dir(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json (shipped checkpoints, "
                                f"usable by name: {', '.join(checkpoint_names())})")
    return json.loads(config.read_text()).get("model_type")


def load_model(path: str | Path):
    """A RecurrentLM from a directory, in eval mode."""
    kind = model_type(path)
    if kind != "recurrent_lm":
        hint = " (convert it first with `rlm convert-huginn`)" if kind == "huginn_raven" else ""
        raise ValueError(f"{path} holds a {kind!r} model, not a RecurrentLM{hint}")
    directory = resolve_model_dir(path)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in directory.glob(pattern))
        found = f" (only pickled {', '.join(pickled)})" if pickled else ""
        raise ValueError(f"{path} holds no safetensors weights{found}: recurrent-lm loads safetensors and never "
                         "unpickles")
    for file in weights:  # a truncated or garbled file: say which, not safetensors' internal error
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as error:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt): {error}") from None
    return RecurrentLM.from_pretrained(directory).eval()


def load_any_causal_lm(path: str | Path):
    """A RecurrentLM, or any transformers causal LM directory (the CoT baseline may be an ordinary transformer)."""
    if model_type(path) == "recurrent_lm":
        return load_model(path)
    return AutoModelForCausalLM.from_pretrained(resolve_model_dir(path)).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a directory (a model directory, or one written by `rlm tokenizer`)."""
    path = resolve_model_dir(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: pass --tokenizer DIR")
    return AutoTokenizer.from_pretrained(path)
