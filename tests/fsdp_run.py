"""A training run for tests/test_parallel.py: the debug model, fixed global batches, one process or several under
FSDP2Strategy (Lightning relaunches this script for every other rank). Writes, on rank 0, a JSON of every step's
depth, the loss averaged over ranks (the global batch's loss: every rank holds the same number of tokens) and the
FSDP2 units rank 0 all-gathered during that step.

    python tests/fsdp_run.py OUT.json --devices 2 --global-batch 8 --steps 20 [--reshard-core] [--skew-depth]
        [--activation-checkpointing]
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recurrent_lm.depth import StepCounts  # noqa: E402
from recurrent_lm.train.module import RecurrentLMModule  # noqa: E402
from recurrent_lm.train.parallel import FSDP2Strategy  # noqa: E402

VOCAB, LENGTH = 48, 24


def global_batch(step: int, size: int) -> torch.Tensor:
    """Counting sequences mod VOCAB with a random start and stride: learnable, the same for any number of ranks."""
    generator = torch.Generator().manual_seed(10_000 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    stride = torch.randint(1, 4, (size, 1), generator=generator)
    return (start + stride * torch.arange(LENGTH)) % VOCAB


class RankSlices(torch.utils.data.IterableDataset):
    def __init__(self, size: int, rank: int, world: int):
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self):
        step, share = 0, self.size // self.world
        while True:
            ids = global_batch(step, self.size)[self.rank * share : (self.rank + 1) * share]
            yield {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
            step += 1


class Data(L.LightningDataModule):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(RankSlices(self.size, self.trainer.global_rank, self.trainer.world_size),
                                           batch_size=None)


class Record(L.Callback):
    """Per step: the depth, the loss averaged over ranks, and rank 0's all-gather count."""

    def __init__(self, out: Path):
        self.out, self.rows, self.gathers = out, [], 0

    def on_train_start(self, trainer, module):
        # one call per FSDP2 unit gathered (test-only: a private hook point of torch's FSDP2)
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

        original = param_group.foreach_all_gather

        def counting(*args, **kwargs):
            self.gathers += 1
            return original(*args, **kwargs)

        param_group.foreach_all_gather = counting

    def on_train_batch_start(self, trainer, module, batch, index):
        self.gathers = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, index):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        depth = module.num_steps_for(trainer.global_step - 1)
        self.rows.append({"step": trainer.global_step - 1, "loss": float(loss), "depth": list(depth),
                          "all_gathers": self.gathers})
        if trainer.is_global_zero:
            self.out.write_text(json.dumps(self.rows))


class SkewedDepth(RecurrentLMModule):
    """A module whose depth draw depends on the rank: what the lockstep check must catch."""

    def num_steps_for(self, global_step, difficulty=None):
        no_grad, grad = super().num_steps_for(global_step, difficulty)
        return StepCounts(no_grad + self.global_rank, grad)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reshard-core", action="store_true")
    parser.add_argument("--skew-depth", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    module_class = SkewedDepth if args.skew_depth else RecurrentLMModule
    torch.manual_seed(0)  # the same initial weights in every process
    module = module_class({"preset": "debug", "vocab_size": VOCAB, "mean_recurrence": 4, "mean_backprop_depth": 2,
                           "init_scale": 0.0},  # a random initial state would be drawn per rank's rows
                          learning_rate=3e-3, warmup_steps=2, seed=0,
                          sharding={"reshard_core_after_forward": args.reshard_core},
                          activation_checkpointing=args.activation_checkpointing)
    strategy = FSDP2Strategy() if args.devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Record(args.out)])
    trainer.fit(module, datamodule=Data(args.global_batch))


if __name__ == "__main__":
    main()
