"""Import Huginn-0125 checkpoints (seal-rg/recurrent-pretraining, "raven") into RecurrentLM.

The reference checkpoint is a config.json with its own field names and safetensors shards with its own parameter
names. Conversion maps both, shard by shard: one source shard is in memory at a time, so the 7 GB bf16 checkpoint
converts on a machine that could not hold it twice.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigFieldError, RecurrentConfig, read_config_json
from .loading import require_finite_weights
from .outputs import claimed_output
from .model import RecurrentLM

# Huginn config field -> RecurrentConfig field
CONFIG_FIELDS = {
    "n_embd": "hidden_size",
    "n_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
    "block_size": "max_position_embeddings",
    "n_layers_in_prelude": "num_prelude_layers",
    "n_layers_in_recurrent_block": "num_core_layers",
    "n_layers_in_coda": "num_coda_layers",
    "mean_recurrence": "mean_recurrence",
    "mean_backprop_depth": "mean_backprop_depth",
    "rope_base": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "qk_bias": "qk_bias",
    "tie_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
REQUIRED_FIELDS = ("n_embd", "n_heads", "intermediate_size", "n_layers_in_recurrent_block")
# The variant this model implements; a checkpoint of another variant would load but compute something else.
SUPPORTED_VARIANT = {"injection_type": "linear", "block_class_name": "SandwichBlock", "mlp_class_name": "GatedMLP",
                     "nonlin_name": "SiLU", "bias": False, "test_time_noise": 0}

BLOCK_RENAMES = {"norm_1": "attn_in_norm", "norm_2": "attn_out_norm", "norm_3": "mlp_in_norm",
                 "norm_4": "mlp_out_norm", "attn.Wqkv": "attn.qkv"}
STACK_RENAMES = {"prelude": "prelude", "core_block": "core", "coda": "coda"}
SKIPPED = {"freqs_cis", "transformer.freqs_cis"}  # rotary tables the reference saves; we compute them
BLOCK_KEY = re.compile(r"^transformer\.(prelude|core_block|coda)\.(\d+)\.(.+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class NotAHuginnCheckpoint(ValueError):
    pass


def huginn_config(src: Path) -> RecurrentConfig:
    """Read a Huginn config.json and return the equivalent RecurrentConfig (clear errors for anything else)."""
    path = src / "config.json"
    if not path.is_file():
        raise NotAHuginnCheckpoint(f"{src} is not a Huginn checkpoint: it has no config.json")
    raw = read_config_json(path)
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        raise NotAHuginnCheckpoint(f"{src} is not a Huginn checkpoint: config.json lacks {missing} "
                                   f"(model_type {raw.get('model_type')!r})")
    for name, expected in SUPPORTED_VARIANT.items():
        if name in raw and raw[name] != expected:
            raise NotAHuginnCheckpoint(f"unsupported Huginn variant: {name} = {raw[name]!r}, only {expected!r} is implemented")
    if raw.get("num_key_value_heads", raw["n_heads"]) != raw["n_heads"]:
        raise NotAHuginnCheckpoint("unsupported Huginn variant: grouped-query attention (num_key_value_heads != n_heads)")
    if "padded_vocab_size" not in raw:
        raw["padded_vocab_size"] = raw["vocab_size"]
    fields = {ours: raw[theirs] for theirs, ours in CONFIG_FIELDS.items() if raw.get(theirs) is not None}
    fields["rope_theta"] = fields.get("rope_theta", 50000.0)
    try:
        return RecurrentConfig(**fields)
    except ConfigFieldError as error:  # named as the reference's config.json names it
        theirs = next((t for t, ours in CONFIG_FIELDS.items() if ours == error.field and t in raw), error.field)
        raise ConfigFieldError(theirs, error.problem, path) from None


def rename(name: str) -> str | None:
    """Reference parameter name -> ours; None for tensors that are not parameters of ours."""
    if name in SKIPPED:
        return None
    if name == "transformer.wte.weight":
        return "embed_tokens.weight"
    if name == "transformer.adapter.weight":
        return "adapter.weight"
    if name == "transformer.ln_f.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    match = BLOCK_KEY.match(name)
    if not match:
        raise NotAHuginnCheckpoint(f"unexpected tensor {name!r}: not a Huginn-0125 parameter name")
    stack, index, rest = match.groups()
    for theirs, ours in BLOCK_RENAMES.items():
        if rest.startswith(theirs + "."):
            rest = ours + rest[len(theirs):]
    return f"{STACK_RENAMES[stack]}.{index}.{rest}"


def _source_shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / name for name in names]
    shards = sorted(src.glob("model*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        hint = f" (found {pickles}: pickled weights are never loaded, convert them to safetensors)" if pickles else ""
        raise NotAHuginnCheckpoint(f"{src} has no safetensors weights{hint}")
    return shards


def _expected_shapes(config: RecurrentConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = RecurrentLM(config)
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def convert_huginn_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
                              overwrite: bool = False) -> Path:
    """Convert the Huginn checkpoint directory `src` into a RecurrentLM directory `dst`.

    dtype: cast the weights ("float32", "bfloat16", ...); None keeps the checkpoint's dtype.
    The result appears at `dst` only when complete (it is written to a temporary sibling and renamed).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"Huginn checkpoint directory {src} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is a file; give the Huginn checkpoint's directory")
    config = huginn_config(src)
    expected = _expected_shapes(config)
    cast = getattr(torch, dtype, None) if dtype else None
    if cast is not None and not (isinstance(cast, torch.dtype) and cast.is_floating_point):
        raise ValueError(f"--dtype {dtype!r} is not a floating-point torch dtype (e.g. float32, bfloat16)")

    with claimed_output(dst, option="DST", overwrite=overwrite, inputs=[src], command="rlm convert-huginn") as output:
        work = output.path
        shards = _source_shards(src)
        weight_map, seen, total_bytes = {}, set(), 0
        for number, shard in enumerate(shards, start=1):
            out_name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            with safe_open(shard, framework="pt") as reader:
                for name in reader.keys():
                    ours = rename(name)
                    if ours is None or (ours == "lm_head.weight" and config.tie_word_embeddings):
                        continue  # tied heads are rebuilt from the embedding
                    tensor = reader.get_tensor(name)
                    if ours.endswith("attn.qk_bias"):
                        tensor = tensor.transpose(1, 2).contiguous()  # (2, 1, heads, d) -> (2, heads, 1, d)
                    if ours not in expected:
                        raise NotAHuginnCheckpoint(f"tensor {name!r} has no place in a model of this config")
                    if tensor.shape != expected[ours]:
                        raise NotAHuginnCheckpoint(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                                                   f"implies {tuple(expected[ours])}")
                    tensors[ours] = tensor.to(cast) if cast is not None else tensor
            require_finite_weights(tensors, shard)  # a diverged checkpoint never becomes a model directory
            save_file(tensors, work / out_name, metadata={"format": "pt"})
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({name: out_name for name in tensors})
            seen.update(tensors)
            del tensors
        missing = sorted(set(expected) - seen)
        if missing:
            raise NotAHuginnCheckpoint(f"{src} lacks weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if cast is not None:
            config.dtype = cast
        config.architectures = ["RecurrentLM"]
        config.save_pretrained(work)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, work / name)
    return dst
