"""`rlm`: the one command line of the project, a dispatcher over typed functions. Each subcommand is a function
parsed by jsonargparse (litgpt's shape: a dict of functions), so each takes `--config FILE.yaml` and its `--help`
lists every option with its type, default and documentation. `rlm train` and `rlm finetune` are LightningCLI's own
parsers."""

import importlib
import inspect
import signal
from argparse import ArgumentError  # what jsonargparse raises for a bad option (with exit_on_error=False)
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from jsonargparse import ActionConfigFile, ArgumentParser

from .options import parse_error_line
from .outputs import TrainingDiverged

# name -> ("module:function", whether its required arguments are positional), or a group of subcommands. The
# function is imported only when its command runs (or lists its options): `rlm --help` and the light commands never
# wait for Lightning or matplotlib.
COMMANDS: dict = {
    "convert-huginn": ("recurrent_lm.commands:convert_huginn", True),
    "retrofit": ("recurrent_lm.retrofit:retrofit", True),
    "generate": ("recurrent_lm.commands:generate", False),
    "models": ("recurrent_lm.commands:models", False),
    "export": ("recurrent_lm.train.checkpoints:export", True),
    "sweep": ("recurrent_lm.eval.sweep:sweep", False),
    "lm-eval": ("recurrent_lm.eval.lm_eval:lm_eval_sweep", False),
    "compare": ("recurrent_lm.eval.compare:compare", False),
    "label-steps": ("recurrent_lm.eval.step_labels:label_steps", False),
    "select-traces": ("recurrent_lm.train.selection:select_traces", False),
    "demo": ("recurrent_lm.eval.demo:demo", False),
    "serve": ("recurrent_lm.serving:serve", False),
    "tasks": {"list": ("recurrent_lm.commands:tasks_list", False),
              "sample": ("recurrent_lm.commands:tasks_sample", True),
              "export": ("recurrent_lm.commands:tasks_export", True)},
    "tokenizer": {"train": ("recurrent_lm.commands:tokenizer_train", False),
                  "tasks": ("recurrent_lm.commands:tokenizer_tasks", False)},
}

# `rlm --help`'s line per command, so that listing them imports none of them (tests/test_cli.py keeps each equal to
# the first line of its function's docstring)
HELP = {
    "convert-huginn": "Convert a Huginn-0125 checkpoint directory (reference config.json + safetensors) into a "
                      "RecurrentLM directory.",
    "retrofit": "Turn a local Llama-family checkpoint (Llama, Mistral, Qwen2) into a RecurrentLM directory.",
    "generate": "Generate text from a prompt and print it with the core steps each generated token used.",
    "models": "List every name that --model resolves besides a directory: shipped models, shipped results "
              "assembled with an",
    "export": "Export a training checkpoint (from `rlm train`) as a transformers directory: weights, config, "
              "tokenizer.",
    "sweep": "Evaluate a RecurrentLM on the same fixed problems at every test-time depth, and with adaptive exit.",
    "lm-eval": "Run lm-evaluation-harness tasks at every depth and write the metrics per depth.",
    "compare": "Compare thinking deeper in latent space with thinking longer in tokens, on the same problems and one",
    "label-steps": "Sample chains of thought from a policy and label their steps, for training or judging a process "
                   "reward",
    "select-traces": "Select N reasoning traces from a pool by s1's three rules (quality, difficulty, diversity) and "
                     "write them as JSONL.",
    "demo": "Train (or load) the two studies' tiny latent and CoT models, compare depth, budget and votes on "
            "held-out",
    "serve": "Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming) with per-request "
             "depth.",
    "tasks list": "List the reasoning tasks with their difficulty ranges.",
    "tasks sample": "Print problems as the model sees them: the prompt, then the completion it learns after \"|\".",
    "tasks export": "Write a fixed problem set to JSONL, to share and reuse as a test set (`--problems FILE` "
                    "elsewhere), or as",
    "tokenizer train": "Train a byte-level BPE tokenizer on text files and save it as a transformers fast tokenizer.",
    "tokenizer tasks": "Save the character tokenizer of the synthetic tasks (all of them by default).",
}

# Commands with a parser of their own (LightningCLI), given the rest of argv: name -> ("module:function", help line)
OWN_PARSER: dict[str, tuple[str, str]] = {
    "train": ("recurrent_lm.train.cli:train_main", "Train a model with Lightning: rlm train --config FILE.yaml "
              "(rlm train --help lists every option)"),
    "finetune": ("recurrent_lm.train.finetune:finetune_main", "Fine-tune any causal LM on reasoning traces (s1): "
                 "rlm finetune --config s1 --model.model DIR --data.train_files [FILE] (rlm finetune --help lists "
                 "every option)"),
}

# reported as one line, no traceback: bad values, paths (missing, taken, of the wrong shape, unreadable: OSError), a
# missing optional extra, a diverged run
BAD_INPUT = (ValueError, OSError, ImportError, TrainingDiverged)


def command_function(target: str) -> Callable:
    """The function a "module:function" entry names, imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _add_commands(parser: ArgumentParser, commands: dict, dest: str, named: list[str], prefix: str = "") -> None:
    """Subcommands under `parser`: the one `named` (the command line's path) with all its options, each other one
    as a name and a help line (its module is not imported)."""
    subcommands = parser.add_subcommands(dest=dest)
    for name, entry in commands.items():
        if isinstance(entry, dict):
            group = ArgumentParser(description=f"rlm {name} subcommands", exit_on_error=False)
            subcommands.add_subcommand(name, group, help=f"{name}: {', '.join(entry)}")
            _add_commands(group, entry, "subcommand", named[1:] if named[:1] == [name] else [], f"{name} ")  # top-down
            continue
        target, positional = entry
        if named[:1] != [name]:
            subcommands.add_subcommand(name, ArgumentParser(exit_on_error=False), help=HELP[prefix + name])
            continue
        function = command_function(target)
        doc = inspect.getdoc(function)
        sub = ArgumentParser(description=doc.split("\n\n")[0], exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
        required_options = keyword_only_required(function)
        sub.add_function_arguments(function, as_positional=positional, skip=set(required_options))
        for option, annotation in required_options.items():  # `rlm retrofit SRC DST --prelude P ...`
            sub.add_argument(f"--{option}", type=annotation, required=True,
                             help=argument_help(doc, option))
        subcommands.add_subcommand(name, sub, help=doc.split("\n")[0])
    if commands is COMMANDS:  # listed for --help; main hands their arguments to their own parser
        for name, (_, help_line) in OWN_PARSER.items():
            subcommands.add_subcommand(name, ArgumentParser(), help=help_line)


def keyword_only_required(function) -> dict[str, type]:
    """The keyword-only parameters without a default: required options (--name), never positional, whatever
    jsonargparse release reads the signature."""
    return {name: p.annotation for name, p in inspect.signature(function).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty}


def argument_help(doc: str, name: str) -> str:
    """An argument's text in a Google-style docstring's Args section (continuation lines joined)."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:"):
            text = [line.strip()[len(name) + 1:].strip()]
            indent = len(line) - len(line.lstrip())
            for following in lines[i + 1:]:
                if not following.strip() or len(following) - len(following.lstrip()) <= indent:
                    break
                text.append(following.strip())
            return " ".join(text)
    return ""


def build_parser(named: list[str] = ()) -> ArgumentParser:
    """The parser of `rlm`, with the options of the command `named` (a path such as ["tasks", "export"])."""
    parser = ArgumentParser(prog="rlm", exit_on_error=False,  # its errors become one line in main
                            description="recurrent-lm: recurrent-depth language models. "
                            "Every subcommand takes --config FILE.yaml; `rlm SUBCOMMAND --help` lists its options.")
    _add_commands(parser, COMMANDS, "command", list(named))
    return parser


def _resolve(argv: list[str]) -> tuple[Callable | None, list[str]]:
    """The command function that argv names, imported (None before a full command is named), and its path."""
    entry, path = COMMANDS, []
    for arg in argv:
        if isinstance(entry, dict) and arg in entry:
            entry, path = entry[arg], path + [arg]
    return (command_function(entry[0]) if isinstance(entry, tuple) else None), path


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept the usual spellings: --num-steps for --num_steps, and a bare boolean flag (--continuous-cot) for
    --continuous_cot true."""
    function, _ = _resolve(argv)
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
    if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_interrupted_while_starting":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is a KeyboardInterrupt again
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OWN_PARSER:
        reported(argv[0], lambda: check_config_files(argv) or command_function(OWN_PARSER[argv[0]][0])(argv[1:]))
        return
    argv = normalize_argv(argv)
    function, path = _resolve(argv)
    command = " ".join(path) or "rlm"
    reported(command, lambda: check_config_files(argv))
    try:
        config = build_parser(path).parse_args(argv)
    except ArgumentError as error:  # jsonargparse's own message, on one line
        sys.exit(f"rlm {command}: error: {parse_error_line(error)} (rlm {command} --help lists the options)"
                 .replace("rlm rlm", "rlm"))
    options = config
    for name in path:
        options = options[name]
    options = {k: v for k, v in options.items() if k not in ("config", "subcommand")}
    result = reported(" ".join(path), lambda: function(**options))
    if isinstance(result, dict) and "out" in result:
        print(f"wrote the results to {result['out']}")


class NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (*name): options never need them, and nested aliases can expand a small file into
    billions of nodes; and without a key given twice (YAML would keep the last silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*{self.peek_event().anchor}) are not accepted in an options file")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:
            raise yaml.YAMLError(f"the key {repeated!r} is given twice (line {node.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def check_config_files(argv: list[str]) -> None:
    """Every `--config FILE` is a YAML mapping of options: anything else (a folder, a binary or empty file, broken
    YAML, aliases, a list; for train and finetune, a trainer / model / data section that is not a mapping) is one
    line naming the file, not a parser's traceback."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2] \
            if arg.startswith("--config=") else None
        if value is None or not Path(value).exists():
            continue  # a shipped recipe's name (rlm train), or a missing file the parser names
        path = Path(value)
        if path.is_dir():
            raise IsADirectoryError(f"--config {path} is a folder; give a YAML file")
        try:
            options = yaml.load(path.read_text(encoding="utf-8"), Loader=NoAliasLoader)
        except UnicodeDecodeError:
            raise ValueError(f"--config {path} is not a text file; give a YAML file of options") from None
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(options, dict):
            held = "nothing" if options is None else f"a {type(options).__name__}"
            raise ValueError(f"--config {path} holds {held}, not a mapping of options (option: value lines)")
        function, command_path = _resolve(argv)
        unknown = sorted(set(options) - set(inspect.signature(function).parameters)) if function else []
        if unknown:  # said here: jsonargparse's own message for a nested subcommand is only its name
            raise ValueError(f"--config {path}: rlm {' '.join(command_path)} has no options {unknown}")
        if argv[0] in OWN_PARSER:  # LightningCLI's sections
            for section in ("trainer", "model", "data"):
                if options.get(section) is not None and not isinstance(options[section], dict):
                    raise ValueError(f"--config {path}: {section} must be a mapping of options, got "
                                     f"{options[section]!r}")


def reported(command: str, run: Callable[[], object]) -> object:
    """Run a command; bad input ends in one line (exit 1), Ctrl-C in one line saying what was kept (exit 130)."""
    try:
        return run()
    except BAD_INPUT as error:
        sys.exit(f"rlm {command}: error: {error}")
    except KeyboardInterrupt as interrupt:
        print(f"rlm {command}: interrupted" + (f": {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
