"""A run whose loss or gradients turn non-finite stops, before the optimizer step that would spread them into the
weights: every checkpoint keeps finite weights, the last good one stays, nothing is exported, and `rlm train` /
`rlm finetune` say so in one line (TrainingDiverged is one of recurrent_lm.cli's BAD_INPUT errors).

RunCLI adds StopOnDivergence to every trainer it builds (train/cli.py), so both commands have it whatever the
config's callbacks are.
"""

import math
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from recurrent_lm.outputs import TrainingDiverged

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None


class StopOnDivergence(Callback):
    """Stop the run at the first optimizer step whose loss (any micro-batch of it, under gradient accumulation) or
    gradient is not finite, before that step runs, with a TrainingDiverged naming the step (trainer.global_step, the
    step column of the logs) and the last good checkpoint, which stays as it is.

    Why a callback of ours and not Lightning's options: Trainer(detect_anomaly=True) runs autograd's anomaly mode
    (several times slower, every step), and EarlyStopping(check_finite=True) looks only at a monitored metric when it
    is checked (after validation), long after the weights have turned non-finite. One fused check per optimizer step in
    on_before_optimizer_step (after backward, the gradient all-reduce and the unscaling of a GradScaler, before
    clipping and the step) sees exactly the loss and gradients the step would apply, for any LightningModule, so
    `rlm train` and `rlm finetune` share it.

    The check: one stack of the micro-batch losses and the gradients' max-norm (torch's fused foreach norm; NaN and
    inf propagate through it, finite values never overflow it), and one host sync. With several processes the verdict
    is summed over them (one tiny all-reduce), so every rank stops at the same step, even where only one rank sees
    the problem (its own loss, or its own shard of the gradients under FSDP). Under a GradScaler (precision 16-mixed)
    nothing is checked: the scaler skips a step with non-finite gradients and lowers its scale, by design.

    Finite gradients can still overflow a weight (under an enormous learning rate, say): the weights are checked too,
    where it is cheap and matters, before a checkpoint is written (the previous one then stays) and at the end of
    training (before the export).

    Lightning neither wraps nor swallows an exception raised in a hook: it calls the callbacks' on_exception, finalizes
    the loggers ("failed") and re-raises it from trainer.fit, so fit_and_export never exports, and own_run_dir releases
    run.lock in its finally.
    """

    def __init__(self):
        self._losses: list[torch.Tensor] = []
        self._saved_step: int | None = None  # the global step of the last checkpoint this run wrote
        self._resumed: tuple[str, int] | None = None  # the checkpoint this run resumed from, and its step

    # --- what is watched -----------------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self._losses, self._saved_step = [], None
        self._resumed = (str(trainer.ckpt_path), trainer.global_step) if trainer.ckpt_path else None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not _scaler_handles_it(trainer):
            self._losses.append(loss.detach().float().reshape(-1))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._losses = self._losses, []
        if _scaler_handles_it(trainer):
            return
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checked = [loss.to(pl_module.device) for loss in losses]
        if grads:
            checked.append(torch.nn.utils.get_total_norm(grads, norm_type=math.inf).float().reshape(1).to(
                pl_module.device))
        finite = torch.cat(checked).isfinite().all() if checked else torch.tensor(True, device=pl_module.device)
        if self._all_finite(trainer, finite):  # every rank gets here, each step: the all-reduce pairs up
            return
        step = trainer.global_step
        bad_loss = next((loss[~loss.isfinite()][0].item() for loss in losses if not loss.isfinite().all()), None)
        if bad_loss is not None:
            what = f"the loss is {bad_loss}"
        else:
            names = {id(p): name for name, p in pl_module.named_parameters()}
            bad = next(((p, g) for group in optimizer.param_groups for p in group["params"]
                        if p.grad is not None and not (g := _local(p.grad)).isfinite().all()), None)
            if bad is not None:
                what = f"the gradient of {names.get(id(bad[0]), 'a parameter')} is {_kind(bad[1])}"
            else:
                what = "a loss or gradient on another process is not finite"
        raise self._diverged(trainer, f"{what} at step {step}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Called before the checkpoint is written (on every rank): a non-finite weight stops the run there, and the
        previous checkpoint stays."""
        self._check_weights(trainer, pl_module)
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._check_weights(trainer, pl_module)  # before fit_and_export exports them

    # --- helpers -------------------------------------------------------------------------------------------------

    def _check_weights(self, trainer, pl_module) -> None:
        weights = [_local(p.detach()) for p in pl_module.parameters() if p.is_floating_point()]
        finite = (torch.nn.utils.get_total_norm(weights, norm_type=math.inf).isfinite().to(pl_module.device)
                  if weights else torch.tensor(True, device=pl_module.device))
        if self._all_finite(trainer, finite):
            return
        bad = next(((name, p) for name, p in pl_module.named_parameters()
                    if p.is_floating_point() and not _local(p.detach()).isfinite().all()), None)
        what = f"the weight {bad[0]} is {_kind(_local(bad[1].detach()))}" if bad else \
            "a weight on another process is not finite"
        raise self._diverged(trainer, f"{what} after step {max(trainer.global_step - 1, 0)}")

    @staticmethod
    def _all_finite(trainer, finite: torch.Tensor) -> bool:
        """Whether every process found its values finite: the one host sync of the check (and, with several
        processes, one all-reduce of a single number, so that all of them stop together)."""
        bad = (~finite).float().reshape(1)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        return not bool(bad.item())

    def _diverged(self, trainer, what: str) -> TrainingDiverged:
        kept = self._kept_checkpoint(trainer)
        # a resume replays the same batches and depth draws (and restores the optimizer's learning rate), so the
        # advice is a fresh run; the kept checkpoint is for inspection or a deliberate resume
        advice = "train again with a lower model.learning_rate (--overwrite true replaces this run)"
        if kept is None:
            where = "no checkpoint was saved before it"
        else:
            path, step = kept
            where = f"the last good checkpoint, {path} (step {step}), is kept"
        return TrainingDiverged(f"{what} (the run diverged): {where}; nothing was exported; {advice}")

    def _kept_checkpoint(self, trainer) -> tuple[str, int] | None:
        """The newest checkpoint on disk: the last one this run wrote, or else the one it resumed from."""
        if self._saved_step is not None:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    path = callback.last_model_path or callback.best_model_path
                    if path and Path(path).exists():
                        return path, self._saved_step
        return self._resumed


def _scaler_handles_it(trainer) -> bool:
    """A GradScaler (16-mixed) skips the steps whose gradients are not finite and lowers its scale: no stop then."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded (FSDP2 DTensor) tensor; a plain tensor as it is."""
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def _kind(tensor: torch.Tensor) -> str:
    return "nan" if bool(tensor.isnan().any()) else "inf"
