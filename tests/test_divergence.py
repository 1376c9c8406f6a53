"""A run whose loss or gradients turn non-finite stops (train/divergence.py): one line naming the step, the last
good checkpoint kept with finite weights, nothing exported; a normal run is not stopped."""

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from recurrent_lm.tasks import task_tokenizer
from recurrent_lm.train.divergence import StopOnDivergence, TrainingDiverged

from .test_cli import one_line_error, rlm
from .test_finetune import save, tiny_llama

ROOT = Path(__file__).parent.parent
DEBUG = str(ROOT / "configs" / "debug.yaml")


class BlankLabelsAt(Callback):
    """Test-only: at one step no token of the batch is supervised, so its loss is 0/0 = nan."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["labels"].fill_(-100)


class PoisonGradientAt(Callback):
    """Test-only: at one step a gradient turns nan after backward; records the weights when the run stops."""

    stopped: dict = {}

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            dict(pl_module.named_parameters())["model.embed_tokens.weight"].grad[0, 0] = float("nan")

    def on_exception(self, trainer, pl_module, exception):
        PoisonGradientAt.stopped = {"step": trainer.global_step,
                                    "finite": all(bool(p.isfinite().all()) for p in pl_module.parameters())}


def train(root: Path, *overrides: str):
    with warnings.catch_warnings():  # a library's deprecation warning on stderr is not the error line
        warnings.simplefilter("ignore")
        return rlm("train", "--config", DEBUG, "--trainer.default_root_dir", str(root),
                   "--trainer.logger.init_args.save_dir", str(root), "--trainer.limit_val_batches", "0",
                   "--trainer.enable_progress_bar", "false", *overrides)


def finite_checkpoint(path: Path) -> int:
    """The global step of a checkpoint whose weights are all finite."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, v in state["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
    assert not bad, bad
    return state["global_step"]


def test_a_nan_loss_stops_the_run_at_its_step(tmp_path):
    root = tmp_path / "run"
    result = train(root, "--trainer.max_steps", "12", "--trainer.callbacks.init_args.every_n_train_steps", "5",
                   "--trainer.callbacks+=tests.test_divergence.BlankLabelsAt", "--trainer.callbacks.init_args.step", "7")
    last = root / "checkpoints" / "last.ckpt"
    one_line_error(result, f"rlm train: error: the loss is nan at step 7 (the run diverged): the last good checkpoint, "
                           f"{last} (step 5), is kept; nothing was exported; train again with a lower "
                           "model.learning_rate (--overwrite true replaces this run)")
    assert finite_checkpoint(last) == 5
    assert not (root / "model").exists() and "exported" not in result.stdout
    assert not (root / "run.lock").exists()


def test_a_nan_gradient_stops_before_the_optimizer_step(tmp_path):
    root = tmp_path / "run"
    PoisonGradientAt.stopped = {}
    result = train(root, "--trainer.max_steps", "6", "--trainer.callbacks+=tests.test_divergence.PoisonGradientAt",
                   "--trainer.callbacks.init_args.step", "3")
    one_line_error(result, "the gradient of model.embed_tokens.weight is nan at step 3 (the run diverged): no "
                           "checkpoint was saved before it; nothing was exported")
    assert PoisonGradientAt.stopped == {"step": 3, "finite": True}  # the step with the nan never ran
    assert not (root / "model").exists() and not (root / "run.lock").exists()


def test_a_learning_rate_of_1e30_stops_rlm_train_with_exit_1(tmp_path):
    """The issue's run, as a user runs it: a process, its exit status and its last line."""
    root = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "recurrent_lm.cli", "train", "--config", DEBUG, "--trainer.default_root_dir", str(root),
         "--trainer.logger.init_args.save_dir", str(root), "--trainer.limit_val_batches", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "20",
         "--trainer.callbacks.init_args.every_n_train_steps", "1", "--model.learning_rate", "1e30"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("rlm train: error: the loss is ") and "(the run diverged)" in line, line
    step = int(line.split(" at step ")[1].split(" ")[0])
    assert finite_checkpoint(root / "checkpoints" / "last.ckpt") <= step
    assert all(finite_checkpoint(path) <= step for path in (root / "checkpoints").glob("*.ckpt"))
    assert not (root / "model").exists() and not (root / "run.lock").exists()


def test_rlm_finetune_stops_too_under_gradient_accumulation(tmp_path):
    tokenizer = task_tokenizer(["chain"])
    llama = save(tiny_llama(len(tokenizer), tokenizer), tokenizer, tmp_path / "llama")
    traces = tmp_path / "traces.jsonl"
    result = rlm("tasks", "export", "chain", str(traces), "--difficulties", "1-2", "--n", "4", "--format", "traces")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "run"
    result = rlm("finetune", "--config", "s1", "--model.model", str(llama), "--data.train_files", f"[{traces}]",
                 "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.devices", "1",
                 "--trainer.accumulate_grad_batches", "2", "--data.batch_size", "2", "--data.max_length", "64",
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "6",
                 "--model.learning_rate", "1e30", "--model.warmup_ratio", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # (transformers' loading bar
    line = result.stderr.strip().splitlines()[-1]                                       # comes before the line)
    assert line.startswith("rlm finetune: error: ") and " at step " in line and "nothing was exported" in line, line
    if (root / "checkpoints" / "last.ckpt").exists():
        finite_checkpoint(root / "checkpoints" / "last.ckpt")
    assert not (root / "model").exists() and not (root / "run.lock").exists()


def test_a_normal_run_is_not_stopped(tmp_path):
    root = tmp_path / "run"
    result = train(root, "--trainer.max_steps", "4")
    assert result.returncode == 0, result.stderr
    assert (root / "model" / "model.safetensors").is_file()


# --- the check itself, hook by hook ---------------------------------------------------------------------------------


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def fake_trainer(tmp_path, scaler=None, world_size=1, other_ranks_bad=False):
    reduce = (lambda tensor, reduce_op: tensor + 1) if other_ranks_bad else (lambda tensor, reduce_op: tensor)
    return SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), world_size=world_size, global_step=4,
                           ckpt_path=None, checkpoint_callbacks=[], default_root_dir=str(tmp_path),
                           strategy=SimpleNamespace(reduce=reduce))


def one_step(callback, trainer, module, losses, grad):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    callback.on_train_start(trainer, module)
    for loss in losses:  # the micro-batches of one optimizer step
        callback.on_before_backward(trainer, module, torch.tensor(loss))
    for p in module.parameters():
        p.grad = torch.full_like(p, grad)
    callback.on_before_optimizer_step(trainer, module, optimizer)


def test_every_micro_batch_counts_and_a_grad_scaler_is_left_to_skip(tmp_path):
    module, callback = Tiny(), StopOnDivergence()
    one_step(callback, fake_trainer(tmp_path), module, [1.0, 2.0], 0.5)  # finite: no stop
    with pytest.raises(TrainingDiverged, match=r"^the loss is nan at step 4 \(the run diverged\): no checkpoint"):
        one_step(callback, fake_trainer(tmp_path), module, [float("nan"), 2.0], 0.5)  # the first of two micro-batches
    with pytest.raises(TrainingDiverged, match=r"^the gradient of layer\.weight is inf at step 4"):
        one_step(callback, fake_trainer(tmp_path), module, [1.0], float("inf"))
    # 16-mixed: the GradScaler skips the step and lowers its scale
    one_step(callback, fake_trainer(tmp_path, scaler=object()), module, [float("nan")], float("nan"))


def test_every_rank_stops_when_one_rank_sees_it(tmp_path):
    """DDP/FSDP: the verdict is all-reduced, so a rank whose own loss and gradient shard are finite stops too."""
    with pytest.raises(TrainingDiverged, match="a loss or gradient on another process is not finite at step 4"):
        one_step(StopOnDivergence(), fake_trainer(tmp_path, world_size=2, other_ranks_bad=True), Tiny(), [1.0], 0.5)


def test_a_weight_overflowed_by_finite_gradients_is_never_checkpointed(tmp_path):
    """Checked before a checkpoint is written (raising there leaves the previous one as it is) and before export."""
    module, callback, trainer = Tiny(), StopOnDivergence(), fake_trainer(tmp_path)
    callback.on_save_checkpoint(trainer, module, {})  # finite: written
    with torch.no_grad():
        module.layer.bias[1] = float("inf")
    for hook in (callback.on_save_checkpoint, lambda trainer, module, _: callback.on_train_end(trainer, module)):
        with pytest.raises(TrainingDiverged, match=r"^the weight layer\.bias is inf after step 3 \(the run diverged\)"):
            hook(trainer, module, {})


def test_export_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    result = rlm("train", "--config", DEBUG, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                 "--trainer.default_root_dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(iter(state["state_dict"]))
    state["state_dict"][name].view(-1)[0] = float("nan")
    broken = tmp_path / "broken.ckpt"
    torch.save(state, broken)
    one_line_error(rlm("export", str(broken), str(tmp_path / "model")), f"{broken} holds non-finite weights")
    assert not (tmp_path / "model").exists()
