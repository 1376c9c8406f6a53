"""Training checkpoints without Lightning: the architecture a run records, reading a checkpoint safely (tensors and
plain data only), and `rlm export`, which turns one into a transformers directory. Kept apart from the training
code so that exporting (and its --help) never waits for Lightning to import."""

import dataclasses
import pickle
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoTokenizer

from recurrent_lm.config import PRESETS, ConfigFieldError, RecurrentConfig
from recurrent_lm.loading import require_finite_weights
from recurrent_lm.model import RecurrentLM
from recurrent_lm.outputs import claimed_output
from recurrent_lm.tasks import task_tokenizer

SHARDED_METADATA = "meta.pt"  # Lightning's name for a sharded checkpoint's non-tensor part


# The architecture as a typed dataclass: a named shape (recurrent_lm.config.PRESETS) and any RecurrentConfig field
# to override in it, built from RecurrentConfig's own fields (one list of options, not two) so that LightningCLI
# validates every `model.architecture.*` key and lists it in --help. A field left at None keeps the preset's value.
_OWN_FIELDS = [f for f in dataclasses.fields(RecurrentConfig) if f.name in RecurrentConfig.__annotations__
               and f.name not in ("use_cache",)]
ArchitectureSpec = dataclasses.make_dataclass(
    "ArchitectureSpec",
    [("preset", Literal[tuple(PRESETS)] | None, dataclasses.field(default=None))]
    + [(f.name, f.type | None, dataclasses.field(default=None)) for f in _OWN_FIELDS], frozen=True)
ArchitectureSpec.__doc__ = ("A model shape: `preset` names one of recurrent_lm.config.PRESETS (none: RecurrentConfig's "
                            "defaults, Huginn-0125's shape); every other field overrides the preset's value.\n\n"
                            + RecurrentConfig.__doc__)
ArchitectureSpec.__module__ = __name__  # importable by name, so DDP-spawned processes can unpickle it


def build_config(spec) -> RecurrentConfig:
    """The RecurrentConfig of an architecture spec; an impossible shape is a one-line error naming the field."""
    fields = {name: value for name, value in dataclasses.asdict(spec).items() if value is not None and name != "preset"}
    try:
        return RecurrentConfig.preset(spec.preset, **fields) if spec.preset else RecurrentConfig(**fields)
    except ConfigFieldError as error:  # named as the recipe names it
        raise error.read_from("model.architecture") from None


def resolved_spec(config: RecurrentConfig) -> "ArchitectureSpec":
    """Every field of a config written out (no preset): what checkpoints record, so a run resumes and exports
    the same shape even if a preset changes later."""
    return ArchitectureSpec(**{f.name: getattr(config, f.name) for f in _OWN_FIELDS})


def saved_architecture(checkpoint: dict) -> dict | None:
    """The architecture a training checkpoint recorded (under "model" before it was named "architecture")."""
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    return hyper_parameters.get("architecture", hyper_parameters.get("model"))


def save_model_dir(model, tokenizer, out: str | Path) -> Path:
    """A transformers directory: weights (safetensors), config, tokenizer."""
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, read with torch's restricted (weights-only) unpickler: tensors and plain data only,
    never arbitrary objects. A sharded checkpoint (a directory FSDP2 wrote) gives its metadata only: its weights
    come with `load_sharded_weights`."""
    path = Path(path)
    if path.is_dir() and (path / SHARDED_METADATA).is_file():
        path = path / SHARDED_METADATA
    elif path.is_dir():
        kind = "a model folder, which needs no export" if (path / "config.json").is_file() else "a folder"
        raise IsADirectoryError(f"checkpoint {path} is {kind}: give a .ckpt file (or a sharded checkpoint folder) "
                                "that `rlm train` wrote")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as file:
        if not file.read(2).startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (or a bare pickle)
            raise ValueError(f"{path} is not a checkpoint (a file that `rlm train` wrote with torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise unsafe_checkpoint(path) from None
    except Exception as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]  # an empty file's error has no text
        raise ValueError(f"{path} is not a readable checkpoint (truncated or damaged): {reason}") from None


def load_sharded_weights(path: Path, model: RecurrentLM) -> None:
    """Read a sharded checkpoint's weights into a plain model in this one process, whatever number of processes
    wrote it (torch.distributed.checkpoint reshards on load)."""
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=True)


def unsafe_checkpoint(path) -> ValueError:
    return ValueError(f"{path} is not a safe checkpoint: it holds pickled objects beyond tensors and plain data, and "
                      "rlm never runs pickled code")


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Export a training checkpoint as a transformers directory (weights, config, tokenizer)."""
    state = load_checkpoint(checkpoint)
    architecture = saved_architecture(state)
    if architecture is None:
        raise ValueError(f"{checkpoint} is not a checkpoint of `rlm train`")
    model = RecurrentLM(build_config(ArchitectureSpec(**architecture)))
    if "state_dict" in state:
        model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=True)
    else:  # FSDP2's sharded checkpoint: the metadata above, the weights in shards beside it
        load_sharded_weights(Path(checkpoint), model)
    require_finite_weights(model, checkpoint)  # a diverged run's weights never become a model directory
    data = state.get("datamodule_hyper_parameters", {})
    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"]) if data.get("tokenizer") else task_tokenizer(data["tasks"])
    return save_model_dir(model, tokenizer, out)


def export(checkpoint: Path, out: Path, overwrite: bool = False) -> None:
    """Export a training checkpoint (from `rlm train`) as a transformers directory: weights, config, tokenizer.

    Args:
        checkpoint: a .ckpt file written by `rlm train` (e.g. runs/NAME/checkpoints/last.ckpt).
        out: the directory to write; AutoModelForCausalLM.from_pretrained and `rlm generate` load it.
        overwrite: replace an existing `out` whole.
    """
    with claimed_output(out, option="OUT", overwrite=overwrite, inputs=[checkpoint], command="rlm export") as output:
        export_checkpoint(checkpoint, output.path)
    print(f"exported {checkpoint} to {out}")


