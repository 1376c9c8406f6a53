"""`rlm`: the one command line of the project. Every subcommand is a typed function parsed by jsonargparse, so
each takes `--config FILE.yaml` and its `--help` lists every option with its type, default and documentation."""

import importlib
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

    from .loading import load_model, load_tokenizer

    from .generation import check_generation_args

    check_generation_args(num_steps, max_new_tokens, exit_criterion, exit_threshold, min_steps, draft_steps,
                          draft_length)  # before the model loads: bad settings fail at once
    if do_sample and not temperature > 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {temperature}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    net = load_model(model)
    tok = load_tokenizer(tokenizer or model)
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
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=TokenProgress(max_new_tokens),
        **sampling)
    new_ids = out.sequences[0, encoded.input_ids.shape[1]:]
    steps = out.steps_per_token[0].tolist()
    print(prompt + tok.decode(new_ids, skip_special_tokens=False))
    print("tokens: " + " ".join(repr(tok.decode([t])) for t in new_ids.tolist()))
    print("steps per token: " + " ".join(map(str, steps)))
    summary = f"{len(steps)} tokens, mean {sum(steps) / max(len(steps), 1):.2f} core steps per token"
    if out.acceptance_rate is not None:
        summary += f", draft acceptance rate {out.acceptance_rate:.2f} ({out.forward_passes} forward passes)"
    print(summary)


class TokenProgress:
    """A transformers streamer that shows a progress bar of generated tokens on stderr (on a terminal)."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="tok", desc="generating", leave=False, disable=None)
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:  # generate's first put is the prompt
            self.bar.update(value.shape[-1] if value.ndim > 1 else 1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def tasks_list() -> None:
    """List the reasoning tasks with their difficulty ranges."""
    from .tasks import TASKS

    print(f"{'task':<12} {'difficulty':<11} description")
    for task in TASKS.values():
        print(f"{task.name:<12} {f'{task.min_difficulty}..{task.max_difficulty}':<11} {task.description}")
    print("reasoning-gym:NAME  (any reasoning-gym dataset, with the reasoning-gym extra installed)")


def tasks_sample(name: str, difficulty: int = 1, n: int = 3, cot: bool = False, seed: int = 0) -> None:
    """Print problems as the model sees them: the prompt, then the completion it learns after "|".

    Args:
        name: the task (see `rlm tasks list`).
        difficulty: reasoning steps per problem.
        n: how many problems.
        cot: the chain-of-thought rendering instead of the direct-answer one.
        seed: problems are a pure function of (task, difficulty, seed).
    """
    from .tasks import get_task

    task = get_task(name)
    for problem in task.problems(difficulty, n, seed=seed):
        print(f"{task.prompt(problem, cot)} | {task.completion(problem, cot)}")


def tasks_export(name: str, out: Path, difficulties: str = "1-4", n: int = 100, seed: int = 0) -> None:
    """Write a fixed problem set to JSONL, to share and reuse as a test set (`--problems FILE` elsewhere).

    Args:
        name: the task.
        out: the JSONL file to write.
        difficulties: difficulties, e.g. "1,2,4" or "1-8".
        n: problems per difficulty.
        seed: the set is a pure function of (task, difficulties, n, seed).
    """
    from .tasks import get_task, parse_int_list, save_jsonl

    task = get_task(name)
    problems = [p for d in parse_int_list(difficulties, "--difficulties") for p in task.problems(d, n, seed=seed)]
    print(f"wrote {len(problems)} problems to {save_jsonl(problems, out)}")


def tokenizer_train(files: str, out: Path, vocab_size: int = 8192, min_frequency: int = 2) -> None:
    """Train a byte-level BPE tokenizer on text files and save it as a transformers fast tokenizer.

    Args:
        files: plain-text training files: comma-separated paths or glob patterns, e.g. "data/*.txt".
        out: directory to save it in (AutoTokenizer.from_pretrained loads it).
        vocab_size: vocabulary size, special tokens included.
        min_frequency: merges seen fewer times are not learned.
    """
    import glob

    from .tokenization import train_bpe_tokenizer

    paths = [match for pattern in files.split(",") for match in (sorted(glob.glob(pattern.strip())) or [pattern.strip()])]
    tokenizer = train_bpe_tokenizer(paths, vocab_size, min_frequency)
    tokenizer.save_pretrained(out)
    print(f"wrote a {len(tokenizer)}-token BPE tokenizer to {out}")


def tokenizer_tasks(out: Path, tasks: list[str] | None = None) -> None:
    """Save the character tokenizer of the synthetic tasks (all of them by default).

    Args:
        out: directory to save it in.
        tasks: task names whose characters it covers.
    """
    from .tasks import TASKS
    from .tokenization import task_tokenizer

    tokenizer = task_tokenizer(tasks or list(TASKS))
    tokenizer.save_pretrained(out)
    print(f"wrote a {len(tokenizer)}-token character tokenizer to {out}")


def export(checkpoint: Path, out: Path) -> None:
    """Export a training checkpoint (from `rlm train`) as a transformers directory: weights, config, tokenizer.

    Args:
        checkpoint: a .ckpt file written by `rlm train` (e.g. runs/NAME/checkpoints/last.ckpt).
        out: the directory to write; AutoModelForCausalLM.from_pretrained and `rlm generate` load it.
    """
    from .train.cli import export_checkpoint

    print(f"exported {checkpoint} to {export_checkpoint(checkpoint, out)}")


# name -> (function, whether its required arguments are positional), or a group of subcommands
COMMANDS = {
    "convert-huginn": (convert_huginn, True),
    "generate": (generate, False),
    "export": (export, True),
    "sweep": ("recurrent_lm.eval.sweep:sweep", False),
    "lm-eval": ("recurrent_lm.eval.lm_eval:lm_eval_sweep", False),
    "compare": ("recurrent_lm.eval.compare:compare", False),
    "demo": ("recurrent_lm.eval.demo:demo", False),
    "tasks": {"list": (tasks_list, False), "sample": (tasks_sample, True), "export": (tasks_export, True)},
    "tokenizer": {"train": (tokenizer_train, False), "tasks": (tokenizer_tasks, False)},
}


def _add_commands(parser: ArgumentParser, commands: dict, dest: str) -> None:
    subcommands = parser.add_subcommands(dest=dest)
    for name, entry in commands.items():
        if entry is None:  # parsed by its own parser (see OWN_PARSER): listed here for --help only
            subcommands.add_subcommand(name, ArgumentParser(), help=OWN_PARSER[name][2])
            continue
        if isinstance(entry, dict):
            group = ArgumentParser(description=f"rlm {name} subcommands")
            subcommands.add_subcommand(name, group, help=f"{name}: {', '.join(entry)}")
            _add_commands(group, entry, dest="subcommand")  # jsonargparse wants levels added top-down
            continue
        function, positional = entry
        try:
            function = _function(function)
        except ImportError as error:  # a command of an optional extra that is not installed
            subcommands.add_subcommand(name, ArgumentParser(), help=f"(unavailable: {error})")
            continue
        doc = inspect.getdoc(function)
        sub = ArgumentParser(description=doc.split("\n\n")[0])
        sub.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
        sub.add_function_arguments(function, as_positional=positional)
        subcommands.add_subcommand(name, sub, help=doc.split("\n")[0])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rlm", description="recurrent-lm: recurrent-depth language models. "
                            "Every subcommand takes --config FILE.yaml; `rlm SUBCOMMAND --help` lists its options.")
    _add_commands(parser, {**COMMANDS, **{name: None for name in OWN_PARSER}}, dest="command")
    return parser


# Commands with a parser of their own (LightningCLI), dispatched before the main parser sees their options.
OWN_PARSER = {"train": ("recurrent_lm.train.cli", "train_main", "Train a model with Lightning: rlm train --config FILE.yaml "
                        "(rlm train --help lists every option)")}


def _function(reference):
    """A command's function: given directly, or as "module:function" (imported only when the CLI runs)."""
    if isinstance(reference, str):
        module, name = reference.split(":")
        return getattr(importlib.import_module(module), name)
    return reference


def _resolve(argv: list[str]):
    """The command function that argv names (None before a full command is named), and its path."""
    entry, path = COMMANDS, []
    for arg in argv:
        if isinstance(entry, dict) and arg in entry:
            entry, path = entry[arg], path + [arg]
    return (_function(entry[0]) if isinstance(entry, tuple) else None), path


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept the usual spellings: --num-steps for --num_steps, and a bare boolean flag (--continuous-cot) for
    --continuous_cot true."""
    try:
        function, _ = _resolve(argv)
    except ImportError:
        function = None
    flags = set()
    if function is not None:
        flags = {f"--{n}" for n, p in inspect.signature(function).parameters.items() if p.annotation is bool}
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
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OWN_PARSER:
        module, function, _ = OWN_PARSER[argv[0]]
        try:
            getattr(importlib.import_module(module), function)(argv[1:])
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            sys.exit(f"rlm {argv[0]}: error: {error}")
        return
    argv = normalize_argv(argv)
    config = build_parser().parse_args(argv)
    try:
        function, path = _resolve(argv)
    except ImportError as error:
        sys.exit(f"rlm: error: {error}")
    options = config
    for name in path:
        options = options[name]
    options = {k: v for k, v in options.items() if k not in ("config", "subcommand")}
    try:
        result = function(**options)
        if isinstance(result, dict) and "out" in result:
            print(f"wrote the results to {result['out']}")
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:  # bad input: one clear line
        sys.exit(f"rlm {' '.join(path)}: error: {error}")


if __name__ == "__main__":
    main()
