"""Training FLOPs of a run, measured: the compute axis on which the retrofitting study's arms are matched.

A run is replayed without training it: its saved config (`{run}/version_0/config.yaml`, or any `rlm train` /
`rlm finetune` config) builds the same module, data and trainer through the same CLI; the data stream yields the
same batches (their padded shapes) and the module draws the same depth for every step (`num_steps_for`: a pure
function of seed and step). Each distinct (sequence length, steps without gradient, steps with gradient) is run
once, forward and backward at batch 1, under torch's FlopCounterMode (every matmul and attention product, forward
and backward, as they execute: frozen weights get no weight gradient, truncated backprop stops where it stops),
and the run's total is the sum over its steps of batch size x that count. A run that distills from a teacher
(model.distill_from) also pays the teacher's forward on every sequence: counted the same way and added.

    python benchmarks/training_flops.py runs/retrofit-smollm2-s0 runs/cot-smollm2 [--steps 650] [--json OUT]

--steps replays a config for another number of optimizer steps (how many steps of an arm fit a budget).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from recurrent_lm import RecurrentLM
from recurrent_lm.train.cli import TrainCLI, build_cli
from recurrent_lm.train.data import RecurrentDataModule
from recurrent_lm.train.finetune import FinetuneCLI, FinetuneModule, TraceDataModule
from recurrent_lm.train.module import RecurrentLMModule


def build(config: Path, steps: int | None):
    """The run's module, data and trainer, as `rlm train` or `rlm finetune` builds them (chosen by the config)."""
    text = config.read_text()
    argv = ["--config", str(config), *(["--trainer.max_steps", str(steps)] if steps else [])]
    if "init_from:" in text or "architecture:" in text:
        return build_cli(TrainCLI, RecurrentLMModule, RecurrentDataModule, argv, prog="rlm train")
    return build_cli(FinetuneCLI, FinetuneModule, TraceDataModule, argv, prog="rlm finetune")


def batches(cli):
    """The run's training batches in order, and how many optimizer steps it takes."""
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    if isinstance(data, TraceDataModule):
        data.use_tokenizer(module.tokenizer)
        data.setup("fit")
        torch.manual_seed(cli.config.seed_everything)  # the shuffle order; it changes only the padding
        loader = data.train_dataloader()
        total = trainer.max_steps if trainer.max_steps > 0 else len(loader) * trainer.max_epochs
    else:
        loader, total = data.train_dataloader(), trainer.max_steps
    taken = 0
    while taken < total:
        for batch in loader:
            yield batch
            taken += 1
            if taken == total:
                return


def step_flops(model, length: int, num_steps) -> int:
    """Forward and backward FLOPs of one training sequence of `length` tokens, counted as they run."""
    input_ids = torch.randint(0, model.config.vocab_size, (1, length))
    kwargs = {"num_steps": num_steps} if isinstance(model, RecurrentLM) else {}
    with FlopCounterMode(display=False) as counter:
        model(input_ids, labels=input_ids, **kwargs).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def teacher_flops(teacher, length: int) -> int:
    """The forward FLOPs of a distillation teacher on one sequence of `length` tokens (0 without a teacher)."""
    if teacher is None:
        return 0
    input_ids = torch.randint(0, teacher.model.config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        teacher.logits(input_ids, torch.ones_like(input_ids))
    return counter.get_total_flops()


def training_flops(config: Path, steps: int | None = None) -> dict:
    cli = build(config, steps)
    module = cli.model
    module.trainer = cli.trainer  # the depth curriculum reads trainer.max_steps
    model = module.model.train()
    measured, total, count, tokens = {}, 0, 0, 0
    for step, batch in enumerate(batches(cli)):
        size, length = batch["input_ids"].shape
        if isinstance(module, RecurrentLMModule):
            difficulty = int(batch["difficulty"][0]) if "difficulty" in batch else None
            num_steps = tuple(module.num_steps_for(step, difficulty))
        else:
            num_steps = module.hparams.num_steps if isinstance(model, RecurrentLM) else None
        key = (length, num_steps)
        if key not in measured:
            measured[key] = step_flops(model, length, num_steps) + teacher_flops(getattr(module, "teacher", None),
                                                                                 length)
        total += size * measured[key]
        tokens += size * length
        count += 1
    return {"config": str(config), "optimizer_steps": count, "training_flops": total,
            "flops_per_step": total / count, "tokens": tokens, "shapes_measured": len(measured)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (their version_0/config.yaml) or configs")
    parser.add_argument("--steps", type=int, help="replay for this many optimizer steps instead of the run's")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        config = run / "version_0" / "config.yaml" if run.is_dir() else run
        if not config.is_file():
            sys.exit(f"{config}: no such config (a run directory holds version_0/config.yaml)")
        result = training_flops(config, args.steps)
        print(f"{run}: {result['optimizer_steps']} steps, {result['training_flops']:.3e} training FLOPs "
              f"({result['flops_per_step']:.3e} per step, {result['tokens']} tokens)", flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
