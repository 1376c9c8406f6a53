"""`rlm train` (LightningCLI: every option in YAML, overridable on the command line) and `rlm export`.

    rlm train --config debug [--trainer.max_steps 200] [--ckpt_path last] [--print_config]

--config takes a YAML file or the name of a recipe that ships with the package (recurrent_lm.recipes); print one
with `rlm train --config debug --print_config` to start a recipe of your own.

A run owns its directory, {trainer.default_root_dir}: its logs, its checkpoints (in checkpoints/, a fixed place,
so `--ckpt_path last` finds them; written atomically) and at the end the trained model, exported as a transformers
directory (weights, config, tokenizer) that AutoModelForCausalLM.from_pretrained and `rlm generate` load. A second
run in a directory that a live run holds, or that already holds a run it does not resume, is refused.
"""

import contextlib
from argparse import ArgumentError  # what jsonargparse raises for a bad option (with exit_on_error=False)
import os
import pickle
import shutil
import signal
import sys
import warnings
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from recurrent_lm.loading import load_tokenizer, require_finite_weights
from recurrent_lm.options import check_number, parse_error_line, parse_range
from recurrent_lm.outputs import Interrupted, check_not_an_input, check_output_path, claimed_output, held_lock
from recurrent_lm.recipes import resolve_recipe

from .data import RecurrentDataModule
from .divergence import StopOnDivergence
from .checkpoints import load_checkpoint, save_model_dir, unsafe_checkpoint
from .module import RecurrentLMModule
from .parallel import check_strategy, full_state_dict, is_sharded, uses_fsdp2


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file beside it, then rename: a run killed mid-write leaves the previous
    checkpoint intact, never a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def keep_last_checkpoint(**init_args) -> list[dict]:
    """Default callbacks: a ModelCheckpoint that keeps last.ckpt (what --ckpt_path last resumes)."""
    return [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, **init_args}}]


# The Lightning trainer's numeric options that `rlm train` and `rlm finetune` check before any set-up (max_steps,
# -1 or >= 1, apart); the others are Lightning's own to check
TRAINER_RANGES = {"accumulate_grad_batches": ">= 1", "val_check_interval": "> 0", "log_every_n_steps": ">= 1",
                  "check_val_every_n_epoch": ">= 1", "gradient_clip_val": ">= 0", "max_epochs": ">= -1",
                  "min_steps": ">= -1", "limit_train_batches": "> 0", "limit_val_batches": ">= 0",
                  "num_sanity_val_steps": ">= -1", "num_nodes": ">= 1"}


class RunCLI(LightningCLI):
    """What every `rlm` command that trains with Lightning shares (`rlm train`, `rlm finetune`): logs under the run's
    own root, checkpoints written atomically, --ckpt_path and --export_dir, and the defaults of `run_defaults`
    (which a config file may replace; LightningCLI's trainer_defaults would make them permanent)."""

    # wandb, offline unless WANDB_MODE=online, with its files under the run's root
    run_defaults: dict = {"trainer.logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                             "init_args": {"project": "recurrent-lm", "save_dir": "runs"}}}

    def before_instantiate_classes(self) -> None:
        """The trainer's numeric options are in range (TRAINER_RANGES: Lightning would fail later, some with a
        ZeroDivisionError, or ignore them); logs go under the run's own root, whatever directory the recipe's
        logger names."""
        trainer = self.config.trainer
        for name, allowed in TRAINER_RANGES.items():
            check_number(f"trainer.{name}", trainer.get(name), parse_range(allowed))
        if trainer.get("max_steps") is not None and trainer.max_steps != -1 and trainer.max_steps < 1:
            raise ValueError(f"--trainer.max_steps must be >= 1, got {trainer.max_steps}")
        self.check_outputs()
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args:
                init_args.save_dir = trainer.default_root_dir

    # the options naming files or folders the run reads (never written over), as "section.option"
    input_options: tuple[str, ...] = ()

    def inputs(self) -> list:
        """What the run reads, from its options: the model it starts from, tokenizer, data files."""
        found = []
        for option in self.input_options:
            section, name = option.split(".")
            value = (self.config.get(section) or {}).get(name)
            found += value if isinstance(value, list) else [value]
        return [value for value in found if value is not None]

    def check_outputs(self) -> None:
        """Before the model loads (minutes, for a large one): the run's directory and its export folder have the
        right shape, the export is no input and not the run itself, and holds nothing unless overwritten."""
        root = Path(self.config.trainer.default_root_dir)
        check_output_path(root, "dir", "--trainer.default_root_dir")
        export_dir = Path(self.config.get("export_dir") or root / "model")
        if export_dir.resolve() == root.resolve() or export_dir.resolve() in root.resolve().parents:
            raise ValueError(f"--export_dir {export_dir} is (or holds) the run's own directory {root}: its "
                             "checkpoints would go; give the model a folder of its own")
        check_output_path(export_dir, "dir", "--export_dir")
        check_not_an_input(export_dir, self.inputs(), "--export_dir")

    def instantiate_trainer(self, **kwargs):
        # kwargs replace the config's own trainer options: extend the config's plugins and callbacks, never drop them
        configured = self._get(self.config_init, "trainer", default={})

        def extended(name: str, extra) -> list:
            given = kwargs.get(name, configured.get(name))
            return [*([] if given is None else given if isinstance(given, list) else [given]), extra]

        kwargs["plugins"] = extended("plugins", AtomicCheckpointIO())
        # a non-finite loss or gradient stops the run, whatever callbacks the config lists (train/divergence.py)
        kwargs["callbacks"] = extended("callbacks", StopOnDivergence())
        return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this checkpoint, or 'last' for the run's last one")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="where to export the trained model (default: {trainer.default_root_dir}/model)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace an earlier run in trainer.default_root_dir (and an existing --export_dir) "
                                 "whole, instead of refusing to start")
        parser.set_defaults(self.run_defaults)


class TrainCLI(RunCLI):
    input_options = ("model.init_from", "data.tokenizer", "data.text_files", "data.val_problems", "data.step_chains")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        check_strategy(trainer.strategy)  # refused at start, not when the processes are up
        return trainer
    run_defaults = {**RunCLI.run_defaults, "trainer.max_steps": 1000, "trainer.log_every_n_steps": 10,
                    "trainer.default_root_dir": "runs/default",
                    "trainer.callbacks": keep_last_checkpoint(every_n_train_steps=100)}


def build_cli(cli_class: type[RunCLI], module_class, data_class, argv: list[str], prog: str) -> RunCLI:
    """Parse argv (recipe names resolved) and instantiate the module, the data and the trainer, not running them.
    Nothing leaves the machine unless the user opts in (wandb offline); a trainer option that Lightning refuses is
    one line."""
    os.environ.setdefault("WANDB_MODE", "offline")
    # The options come in `argv`; sys.argv stays as it is, since the "ddp" launcher re-runs it on every rank.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        return cli_class(module_class, data_class, args=with_recipe_paths(argv), run=False, seed_everything_default=0,
                         save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": prog, "exit_on_error": False})
    except MisconfigurationException as error:  # Lightning's own check of a trainer option: one line
        raise ValueError(f"trainer: {error}") from None
    except ArgumentError as error:  # a misspelt or ill-typed option: jsonargparse's message, on one line
        raise ValueError(f"{parse_error_line(error)} ({prog} --help lists the options)") from None


def fit_and_export(cli: RunCLI, model, tokenizer, command: str) -> Path | None:
    """Fit cli.model on cli.datamodule in the run's own directory (checkpoints in {root}/checkpoints, so that
    `--ckpt_path last` finds them), then export `model` and `tokenizer` as a transformers directory (on rank 0;
    returns its path there, None elsewhere). What the run reads (cli.inputs()) is never written over."""
    trainer = cli.trainer
    root, ckpt_path = Path(trainer.default_root_dir), cli.config.get("ckpt_path")
    overwrite = bool(cli.config.get("overwrite"))
    if ckpt_path is not None and overwrite:
        raise ValueError("--overwrite replaces the run that --ckpt_path would resume: give one of them")
    if ckpt_path == "last" and not (root / "checkpoints" / "last.ckpt").exists():
        raise FileNotFoundError(f"--ckpt_path last: {root / 'checkpoints'} holds no last.ckpt to resume; "
                                "drop --ckpt_path to train from the start")
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(root / "checkpoints")
    resume = root / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path) if ckpt_path else None
    if resume is not None and resume.is_dir() and not uses_fsdp2(trainer.strategy):
        raise ValueError(f"--ckpt_path {ckpt_path}: a sharded checkpoint (FSDP2) resumes under trainer.strategy "
                         "recurrent_lm.train.parallel.FSDP2Strategy, on any number of processes; `rlm export` turns "
                         "it into a model directory")
    if resume is not None and resume.is_dir():  # its shards load before any hook: check its metadata first
        cli.model.on_load_checkpoint(load_checkpoint(resume))
    export_dir = Path(cli.config.get("export_dir") or root / "model")
    own_export = export_dir == root / "model"  # the run's own: replaced by a resumed run
    with own_run_dir(root, resuming=ckpt_path is not None, command=command, overwrite=overwrite), \
            claimed_by_rank_zero(export_dir, option="--export_dir", overwrite=overwrite or own_export,
                                 inputs=[resume, *cli.inputs()], command=command) as export:
        if resume is not None and resume.is_file():  # read once the run holds its directory
            check_resumable(resume, ckpt_path, trainer.max_steps)
        try:
            trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        except pickle.UnpicklingError:  # torch's advice (load with weights_only=False) would run the file's code
            raise unsafe_checkpoint(ckpt_path) from None
        except SystemExit:  # Lightning ends an interrupted fit with sys.exit(1)
            if trainer.interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left Ctrl-C ignored
                raise Interrupted(f"at step {trainer.global_step} of {trainer.max_steps}; {kept_checkpoint(root)}; "
                                  "nothing was exported") from None
            raise
        if is_sharded(model):  # FSDP2: every rank sends its shards; rank 0 writes a plain model
            weights = full_state_dict(model)
            if trainer.is_global_zero:
                model = type(model)(model.config)
                model.load_state_dict(weights)
        if not trainer.is_global_zero:
            return None
        save_model_dir(model, tokenizer, export.path)
    print(f"exported the trained model to {export_dir}")
    return export_dir


def check_resumable(resume: Path, ckpt_path: str, max_steps: int) -> None:
    """A checkpoint to resume holds finite weights (a diverged run's would only diverge again) and leaves steps to
    train (Lightning would train nothing, then export)."""
    state = load_checkpoint(resume)
    require_finite_weights(state.get("state_dict", {}), resume)
    done = state.get("global_step", 0)
    if max_steps != -1 and done >= max_steps:
        raise ValueError(f"--ckpt_path {ckpt_path}: the checkpoint is at step {done}, --trainer.max_steps is "
                         f"{max_steps}: nothing is left to train; raise --trainer.max_steps")


def kept_checkpoint(root: Path) -> str:
    """What a stopped run leaves to resume from."""
    last = root / "checkpoints" / "last.ckpt"
    if not last.exists():
        return "no checkpoint was written yet"
    return f"the last checkpoint, {last}, is kept: resume with --ckpt_path last"


def is_launcher_rank_zero() -> bool:
    """The process a launcher started first (processes it started for other ranks share its directories)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


@contextlib.contextmanager
def claimed_by_rank_zero(path: Path, **claim):
    """claimed_output on the first process of a launch; the other ranks write nothing there."""
    if not is_launcher_rank_zero():
        yield None
        return
    with claimed_output(path, **claim) as output:
        yield output


def train_main(argv: list[str]) -> None:
    cli = build_cli(TrainCLI, RecurrentLMModule, RecurrentDataModule, argv, prog="rlm train")
    module, data = cli.model, cli.datamodule
    if module.model.config.vocab_size < len(data.tokenizer):
        raise ValueError(f"model.vocab_size ({module.model.config.vocab_size}) is smaller than the tokenizer "
                         f"({len(data.tokenizer)} tokens)")
    init_from = module.hparams.get("init_from")
    if init_from is not None and load_tokenizer(init_from).get_vocab() != data.tokenizer.get_vocab():
        raise ValueError(f"model.init_from {init_from} reads another tokenizer than the data's: set "
                         f"data.tokenizer: {init_from}")
    fit_and_export(cli, module.model, data.tokenizer, command="rlm train")


@contextlib.contextmanager
def own_run_dir(root: Path, resuming: bool, command: str = "rlm train", overwrite: bool = False):
    """Hold {root}/run.lock for the run (of `command`, named in the errors). Refused: a directory a live run holds
    (its lock names a running pid), and a directory that already holds a run (checkpoints or an exported model)
    that this one does not resume, unless `overwrite`, which empties it first. A lock left by a killed run is taken
    over. Processes that a launcher started for ranks > 0 share rank 0's."""
    if not is_launcher_rank_zero():
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    what = f"--trainer.default_root_dir {root}"
    with held_lock(root / "run.lock", what, command):
        earlier = [p for p in (root / "checkpoints", root / "model") if p.exists() and any(p.iterdir())]
        if earlier and not resuming and not overwrite:
            raise FileExistsError(f"{root} already holds a run ({earlier[0]}); resume it with --ckpt_path last, "
                                  "replace it with --overwrite true, or give this run its own "
                                  "--trainer.default_root_dir")
        if overwrite:  # the earlier run goes whole: no stale checkpoint, log or model of it survives
            for entry in root.iterdir():
                if entry.name != "run.lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        yield


def with_recipe_paths(argv: list[str]) -> list[str]:
    """argv with every `--config NAME` of a shipped recipe replaced by its path (files are kept as given)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(resolve_recipe(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = f"--config={resolve_recipe(arg.removeprefix('--config='))}"
    return out


if __name__ == "__main__":
    train_main(sys.argv[1:])
