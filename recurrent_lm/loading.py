"""Loading a trained model and its tokenizer from a directory (or a shipped checkpoint's name), with clear errors
for anything else (config.json, weights that are not safetensors or not finite)."""

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .config import RecurrentConfig, read_config_json
from .model import RecurrentLM
from .recipes import checkpoint_names, resolve_model_dir
from .sources import INSTALLED, is_assembled, is_gguf, materialized, safetensors_files


def model_dir(path: str | Path) -> Path:
    """The directory a --model names: a directory, a shipped checkpoint's name, a GGUF file or an installed
    model's short name (a transformers directory built from it once), or a shipped result that holds only its
    trained tensors (the whole model, assembled once from its installed source). Every loader reads through this."""
    if is_gguf(path) and (str(path).lower() in INSTALLED or Path(path).is_file()):
        return materialized(path)
    directory = resolve_model_dir(path)
    if is_assembled(directory):
        from .retrofit import assembled

        return assembled(directory)
    return directory


def model_type(path: str | Path) -> str | None:
    """The model_type of a model directory's config.json."""
    directory = model_dir(path)
    if directory.is_file():
        raise NotADirectoryError(f"{path} is a file, not a model directory; give its folder ({Path(path).parent})")
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json (shipped checkpoints, "
                                f"usable by name: {', '.join(checkpoint_names())})")
    kind = read_config_json(config).get("model_type")
    if kind is None:
        raise ValueError(f"{config}: field 'model_type' is missing (a RecurrentLM's is 'recurrent_lm')")
    return kind


def require_recurrent(path: str | Path) -> Path:
    """The directory of a RecurrentLM (by path or shipped name); anything else is a one-line error."""
    kind = model_type(path)
    if kind != "recurrent_lm":
        hint = " (convert it first with `rlm convert-huginn`)" if kind == "huginn_raven" else ""
        raise ValueError(f"{path} holds a {kind!r} model, not a RecurrentLM{hint}")
    return model_dir(path)


def load_config(path: str | Path) -> RecurrentConfig:
    """A RecurrentLM's config from a directory, without reading its weights."""
    return RecurrentConfig.from_pretrained(require_recurrent(path))


def load_model(path: str | Path):
    """A RecurrentLM from a directory, in eval mode."""
    directory = require_recurrent(path)
    shapes = {}
    for file in safetensors_files(directory, path):  # a truncated or garbled file: say which, not safetensors' own
        try:
            with safe_open(file, framework="pt") as reader:
                slices = {name: reader.get_slice(name) for name in reader.keys()}
                shapes.update({name: list(piece.get_shape()) for name, piece in slices.items()})
                integer = [name for name, piece in slices.items()
                           if not getattr(piece, "get_dtype", lambda: "F")().startswith(("F", "BF"))]
        except Exception as error:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt): {error}") from None
        if integer:  # every weight of a RecurrentLM is floating point: these would be read as numbers they are not
            raise ValueError(f"{file} holds non-floating-point weights: {integer[:5]}")
    config = load_config(directory)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # an id past the vocabulary never comes out
        ids = getattr(config, name, None)
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and not 0 <= token < config.vocab_size:
                raise ValueError(f"{directory / 'config.json'}: field {name!r}: {token} is outside the vocabulary "
                                 f"[0, {config.vocab_size})")
    with torch.device("meta"):  # the shapes the config implies, without allocating them
        expected = {name: list(tensor.shape) for name, tensor in RecurrentLM(config).state_dict().items()}
    missing = sorted(set(expected) - set(shapes) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        what = (f"lacks {missing[:5]}" if missing else "") + (" and " if missing and unexpected else "") + \
            (f"holds tensors its config has no place for, {unexpected[:5]}" if unexpected else "")
        raise ValueError(f"the weights of {directory} do not match its config.json: the safetensors files {what}")
    for name, shape in shapes.items():
        if name in expected and expected[name] != shape:
            raise ValueError(f"{directory / 'config.json'} does not match the weights: {name} is {shape} in the "
                             f"safetensors files, the config implies {expected[name]}")
    generation = directory / "generation_config.json"
    if generation.is_file():  # transformers would skip a broken one silently, or blame its values on the command
        read_config_json(generation)
        try:
            GenerationConfig.from_pretrained(directory).validate(strict=True)
        except Exception as error:
            raise ValueError(f"{generation}: {' '.join(str(error).split())}") from None
    model = RecurrentLM.from_pretrained(directory).eval()
    require_finite_weights(model, path)
    return model


def load_any_causal_lm(path: str | Path):
    """A RecurrentLM, or any transformers causal LM directory (the CoT baseline may be an ordinary transformer)."""
    if model_type(path) == "recurrent_lm":
        return load_model(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir(path)).eval()
    require_finite_weights(model, path)
    return model


def require_finite_weights(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], name: str | Path) -> None:
    """Refuse weights holding NaN or inf (`name`, the model's directory or file, in the one-line error): a model whose
    training diverged would otherwise generate garbage, or score NaN, without a word."""
    tensors = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
               else model_or_state_dict)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int(tensor.numel() - torch.isfinite(tensor).sum())
            raise ValueError(f"{name} holds non-finite weights ({key}: {count} NaN/inf values of {tensor.numel()}): "
                             "the run that wrote it diverged")


def require_fitting_tokenizer(tokenizer, config, name: str | Path) -> None:
    """A tokenizer whose ids reach past the model's embedding would feed it ids it has no row for."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= config.vocab_size:
        raise ValueError(f"the tokenizer of {name} has ids up to {largest}, past the model's vocab_size "
                         f"({config.vocab_size}): a tokenizer of another model?")


def load_model_and_tokenizer(path: str | Path, tokenizer: str | Path | None = None):
    """A RecurrentLM and its tokenizer (from `tokenizer`, or the model's directory), the cheap checks first: the
    config, then the tokenizer and whether its ids fit the model, then the weights."""
    config = load_config(path)
    tok = load_tokenizer(tokenizer or path)
    require_fitting_tokenizer(tok, config, tokenizer or path)
    return load_model(path), tok


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a directory (a model directory, or one written by `rlm tokenizer`)."""
    path = model_dir(path)
    if path.is_file():
        raise NotADirectoryError(f"{path} is a file, not a tokenizer folder (one holding tokenizer.json)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: pass --tokenizer DIR")
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):  # AutoTokenizer reads these
        if (path / name).is_file():  # too, and its errors name none of them
            read_config_json(path / name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # a truncated or garbled tokenizer file: name it, not the parser's position alone
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path / 'tokenizer.json'} (or the tokenizer files beside it) cannot be read: {reason}") \
            from None
