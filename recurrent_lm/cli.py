"""`rlm`: the one command line of the project. Every subcommand is a typed function parsed by jsonargparse, so
each takes `--config FILE.yaml` and its `--help` lists every option with its type, default and documentation."""

import inspect
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser


def convert_huginn(src: Path, dst: Path, dtype: str | None = None, overwrite: bool = False) -> None:
    """Convert a Huginn-0125 checkpoint directory (reference config.json + safetensors) into a RecurrentLM directory.

    Args:
        src: the Huginn checkpoint directory (e.g. a local copy of tomg-group-umd/huginn-0125).
        dst: where to write the converted model; `RecurrentLM.from_pretrained(dst)` loads it.
        dtype: cast the weights, e.g. float32 or bfloat16; by default they keep the checkpoint's dtype.
        overwrite: replace dst if it already exists.
    """
    from .huginn import convert_huginn_checkpoint

    out = convert_huginn_checkpoint(src, dst, dtype=dtype, overwrite=overwrite)
    print(f"wrote {out}")


def generate(
    model: Path,
    prompt: str,
    num_steps: int | None = None,
    max_new_tokens: int = 64,
    exit_criterion: Literal["kl", "entropy-diff", "latent-diff", "cosine", "argmax-stability"] | None = None,
    exit_threshold: float | None = None,
    min_steps: int = 1,
    continuous_cot: bool = False,
    draft_steps: int | None = None,
    draft_length: int = 4,
    core_slots: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    init_scale: float | None = None,
    seed: int = 0,
    tokenizer: Path | None = None,
) -> None:
    """Generate text from a prompt and print it with the core steps each generated token used.

    Args:
        model: a RecurrentLM directory (trained here, exported, or converted from Huginn-0125).
        prompt: the text to continue.
        num_steps: core steps per token (the maximum with adaptive exit); default: the model's mean_recurrence.
        max_new_tokens: tokens to generate at most.
        exit_criterion: adaptive per-token exit; kl and entropy-diff compare successive next-token
            distributions, latent-diff and cosine successive latent states, argmax-stability the top token.
        exit_threshold: the criterion's threshold (defaults: kl 1e-3, entropy-diff 1e-3, latent-diff 0.03,
            cosine 1e-3, argmax-stability 5 steps).
        min_steps: no token exits before this many steps.
        continuous_cot: start each token's latent state from the previous token's final state.
        draft_steps: self-speculative decoding: draft at this depth, verify at num_steps (greedy only).
        draft_length: tokens drafted per verification.
        core_slots: bound the cache to this many slots per core layer (a ring); default: one per step.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        init_scale: scale of the random initial latent state (0: zero state); default: the model's.
        seed: seeds sampling and the random initial states.
        tokenizer: tokenizer directory, if the model directory has none.
    """
    import torch
    from transformers import AutoTokenizer

    net = load_model(model)
    tokenizer_dir = Path(tokenizer or model)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}: pass --tokenizer DIR")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    encoded = tok(prompt, return_tensors="pt")
    if encoded.input_ids.shape[1] + max_new_tokens > net.config.max_position_embeddings:
        raise ValueError(f"prompt ({encoded.input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings ({net.config.max_position_embeddings})")
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    out = net.generate(
        **encoded, num_steps=num_steps, max_new_tokens=max_new_tokens, exit_criterion=exit_criterion,
        exit_threshold=exit_threshold, min_steps=min_steps, continuous_cot=continuous_cot, draft_steps=draft_steps,
        draft_length=draft_length, core_slots=core_slots, init_scale=init_scale,
        generator=torch.Generator().manual_seed(seed), return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
    new_ids = out.sequences[0, encoded.input_ids.shape[1]:]
    steps = out.steps_per_token[0].tolist()
    print(prompt + tok.decode(new_ids, skip_special_tokens=False))
    print("tokens: " + " ".join(repr(tok.decode([t])) for t in new_ids.tolist()))
    print("steps per token: " + " ".join(map(str, steps)))
    summary = f"{len(steps)} tokens, mean {sum(steps) / max(len(steps), 1):.2f} core steps per token"
    if out.acceptance_rate is not None:
        summary += f", draft acceptance rate {out.acceptance_rate:.2f} ({out.forward_passes} forward passes)"
    print(summary)


def load_model(path: Path):
    """A RecurrentLM from a directory, in eval mode, with a clear error for anything else."""
    import json

    from .model import RecurrentLM

    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "recurrent_lm":
        hint = " (convert it first with `rlm convert-huginn`)" if model_type == "huginn_raven" else ""
        raise ValueError(f"{path} holds a {model_type!r} model, not a RecurrentLM{hint}")
    return RecurrentLM.from_pretrained(path).eval()


# name -> (function, whether its required arguments are positional: `rlm convert-huginn SRC DST`)
COMMANDS = {"convert-huginn": (convert_huginn, True), "generate": (generate, False)}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rlm", description="recurrent-lm: recurrent-depth language models. "
                            "Every subcommand takes --config FILE.yaml; `rlm SUBCOMMAND --help` lists its options.")
    subcommands = parser.add_subcommands(dest="command")
    for name, (function, positional) in COMMANDS.items():
        sub = ArgumentParser(description=inspect.getdoc(function).split("\n\n")[0])
        sub.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
        sub.add_function_arguments(function, as_positional=positional)
        subcommands.add_subcommand(name, sub, help=inspect.getdoc(function).split("\n")[0])
    return parser


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept the usual spellings: --num-steps for --num_steps, and a bare boolean flag (--continuous-cot) for
    --continuous_cot true."""
    command = next((a for a in argv if a in COMMANDS), None)
    flags = set()
    if command is not None:
        signature = inspect.signature(COMMANDS[command][0])
        flags = {f"--{n}" for n, p in signature.parameters.items() if p.annotation is bool}
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("-", "_").replace("__", "--", 1) + eq + value
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            if arg in flags and following.lower() not in ("true", "false", "yes", "no", "1", "0"):
                out += [arg, "true"]
                continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = normalize_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config = parser.parse_args(argv)
    function = COMMANDS[config.command][0]
    options = {k: v for k, v in config[config.command].items() if k != "config"}
    try:
        function(**options)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: one clear line, no traceback
        sys.exit(f"rlm {config.command}: error: {error}")


if __name__ == "__main__":
    main()
