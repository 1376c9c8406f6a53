"""Loading a trained model and its tokenizer from a directory, with clear errors for anything else."""

import json
from pathlib import Path


def model_type(path: str | Path) -> str | None:
    """The model_type of a model directory's config.json."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
    return json.loads(config.read_text()).get("model_type")


def load_model(path: str | Path):
    """A RecurrentLM from a directory, in eval mode."""
    from .model import RecurrentLM

    kind = model_type(path)
    if kind != "recurrent_lm":
        hint = " (convert it first with `rlm convert-huginn`)" if kind == "huginn_raven" else ""
        raise ValueError(f"{path} holds a {kind!r} model, not a RecurrentLM{hint}")
    return RecurrentLM.from_pretrained(path).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a directory (a model directory, or one written by `rlm tokenizer`)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: pass --tokenizer DIR")
    return AutoTokenizer.from_pretrained(path)
