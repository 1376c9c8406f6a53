"""Retrofitted recurrence on CPU: accuracy against test-time depth before and after continued training (a
measurement, not a test).

1. The source: a small Llama (d 128, 4 heads, 2 key/value heads, 4 layers) built here with random weights and the
   task's character tokenizer (no pretrained model can be downloaded on this machine), or --source DIR: any local
   Llama / Mistral / Qwen2 checkpoint (the task text is then encoded by its own tokenizer).
2. `rlm retrofit` into prelude 1 / core 2 / coda 1 (every layer kept; adapter [0 | I]): r = 1 is the source model.
3. Two continuations from the same retrofitted weights, the same data stream and the same number of optimizer steps:
   "recurrent": configs/retrofit-llama.yaml (mean depth ramping 1 -> 4 over 75% of the steps, "1-sqrt");
   "no recurrence": the same recipe at a fixed depth of 1, i.e. the source transformer trained on as it is.
4. Greedy answers on fresh problems (EVAL_SEED, never drawn by training) at every difficulty and depth, with 95%
   Wilson intervals, before and after; JSON and a plot per arm.

    python benchmarks/retrofit.py                       # about 25 minutes on 2 idle CPU cores
    python benchmarks/retrofit.py --steps-train 200     # a quick look
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recurrent_lm.eval.latent import LatentDepth
from recurrent_lm.eval.methods import run_methods
from recurrent_lm.eval.report import line_plot, select
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.retrofit import retrofit
from recurrent_lm.tasks import get_task, task_tokenizer
from recurrent_lm.train.cli import train_main

BENCHMARKS = Path(__file__).parent
EVAL_SEED = 777_002  # problem seeds "task/difficulty/777002": the training stream draws "train/..." ones


def random_llama(out: Path, task: str, seed: int) -> Path:
    tokenizer = task_tokenizer([task])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=320, num_hidden_layers=4, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def evaluate(model_dir: Path, problems: dict, depths: list[int], label: str) -> list[dict]:
    rows = run_methods([LatentDepth(load_model(model_dir), load_tokenizer(model_dir), depths)], problems, desc=label)
    return [{k: v for k, v in row.items() if k not in ("answers",)} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="a local Llama-family checkpoint (default: a random small Llama)")
    parser.add_argument("--task", default="permutation")
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--n", type=int, default=200, help="fresh problems per difficulty")
    parser.add_argument("--steps-train", type=int, default=1500, help="optimizer steps of each continuation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs/retrofit-benchmark"))
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-retrofit.json")
    args = parser.parse_args()

    args.runs.mkdir(parents=True, exist_ok=True)
    source = args.source or random_llama(args.runs / "source", args.task, args.seed)
    retrofitted = retrofit(source, args.runs / "retrofitted", prelude=1, core=2, coda=1, mean_recurrence=4,
                           mean_backprop_depth=2, overwrite=True)
    task = get_task(args.task)
    problems = {d: task.problems(d, args.n, seed=EVAL_SEED) for d in args.difficulties}
    results = {"source": str(args.source or "random small Llama (d 128, 4 layers)"), "task": args.task,
               "trained_max_difficulty": 4, "eval_seed": EVAL_SEED, "n": args.n, "seed": args.seed,
               "steps_train": args.steps_train, "split": "prelude 1 / core 2 / coda 1",
               "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU float32",
               "before": evaluate(retrofitted, problems, args.depths, "before"), "arms": {}}
    arms = {"recurrent": [], "no recurrence": ["--model.fixed_num_steps", "1", "--model.recurrence_curriculum", "null"]}
    for name, extra in arms.items():
        run = args.runs / name.replace(" ", "-")
        started = time.perf_counter()
        train_main(["--config", "retrofit-llama", "--model.init_from", str(retrofitted), "--data.tokenizer",
                    str(retrofitted), "--trainer.max_steps", str(args.steps_train), "--seed_everything", str(args.seed),
                    "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
                    "--trainer.enable_progress_bar", "false", *extra])
        seconds = time.perf_counter() - started
        results["arms"][name] = {"train_seconds": round(seconds, 1), "model": str(run / "model"),
                                 "rows": evaluate(run / "model", problems, args.depths, name)}
        args.out.write_text(json.dumps(results, indent=1))
    curves = {"before (any depth)": results["before"], **{f"after: {n}": a["rows"] for n, a in results["arms"].items()}}
    for difficulty in args.difficulties:
        print(f"k={difficulty}: " + "; ".join(
            f"{label} " + " ".join(f"r{r['steps']}={r['accuracy']:.2f}" for r in select(rows, difficulty=difficulty))
            for label, rows in curves.items()), flush=True)
    for label, rows in curves.items():
        series = {f"k={d}": ([r["steps"] for r in select(rows, difficulty=d)],
                             [r["accuracy"] for r in select(rows, difficulty=d)]) for d in args.difficulties}
        slug = label.split(":")[-1].strip().split(" (")[0].replace(" ", "-")
        line_plot(args.out.with_name(f"{args.out.stem}-{slug}.png"), series, "test-time depth (core steps)",
                  "accuracy", f"retrofitted Llama, {label} ({args.steps_train} steps, k <= 4 trained)", logx=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
