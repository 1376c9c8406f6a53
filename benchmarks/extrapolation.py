"""Does thinking longer solve harder problems than any trained on? (a measurement, not a test)

For each training seed: train a recipe with `rlm train` (or reuse a model trained before), then answer fresh
problems (seeds the training stream never uses) at every difficulty and test-time depth, greedy from a zero initial
state, with 95% Wilson intervals. The issue's bar, checked per seed on every difficulty >= 2D (D: the recipe's
hardest trained difficulty): accuracy >= 0.8 at some depth above the training depth (mean_recurrence) while the
same model at its training depth stays <= 0.3. Writes a JSON of every cell and a plot of accuracy against depth per
difficulty and seed.

    python benchmarks/extrapolation.py --config pointer-latent --seeds 0 1 2
    python benchmarks/extrapolation.py --config pointer-latent --reuse   # evaluate (or finish) runs trained before
"""

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from recurrent_lm.eval.latent import LatentDepth
from recurrent_lm.eval.methods import run_methods
from recurrent_lm.eval.report import line_plot, select
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.recipes import resolve_recipe
from recurrent_lm.tasks import get_task
from recurrent_lm.train.cli import train_main

BENCHMARKS = Path(__file__).parent
EVAL_SEED = 777_001  # problem seeds of the form "task/difficulty/seed": the training stream draws "train/..." ones


def train(config: Path, seed: int, run: Path, extra: list[str]) -> tuple[Path, float]:
    start = time.perf_counter()
    train_main(["--config", str(config), "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed",
                str(seed), "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
                *extra])
    return run / "model", time.perf_counter() - start


def bar(rows: list[dict], trained_max: int, training_depth: int) -> list[dict]:
    """Per difficulty >= 2 * trained_max: the accuracy at the training depth and the best above it."""
    checks = []
    for difficulty in sorted({r["difficulty"] for r in rows if r["difficulty"] >= 2 * trained_max}):
        curve = {r["steps"]: r for r in select(rows, difficulty=difficulty)}
        at_training = curve.get(training_depth)
        deeper = [r for depth, r in curve.items() if depth > training_depth]
        best = max(deeper, key=lambda r: r["accuracy"]) if deeper else None
        checks.append({"difficulty": difficulty, "training_depth": training_depth,
                       "accuracy_at_training_depth": at_training and at_training["accuracy"],
                       "best_deeper_accuracy": best and best["accuracy"], "best_deeper_steps": best and best["steps"],
                       "holds": bool(at_training and best and at_training["accuracy"] <= 0.3 and best["accuracy"] >= 0.8)})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pointer-latent", help="a recipe name or YAML file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 10, 12])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    parser.add_argument("--n", type=int, default=200, help="fresh problems per difficulty")
    parser.add_argument("--runs", type=Path, default=Path("runs/extrapolation"))
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate a seed's model trained before (RUNS/{config}-seed{seed}/model) if there is one")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="extra `rlm train` options")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results-extrapolation-{config}.json")
    args = parser.parse_args()

    config = resolve_recipe(args.config)
    recipe = yaml.safe_load(config.read_text())
    task_name, trained_max = recipe["data"]["tasks"][0], recipe["data"]["max_difficulty"]
    task = get_task(task_name)
    problems = {d: task.problems(d, args.n, seed=EVAL_SEED) for d in args.difficulties}
    results = {"config": str(config), "task": task_name, "trained_max_difficulty": trained_max, "n": args.n,
               "eval_seed": EVAL_SEED, "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
               "train_args": args.train_args, "seeds": {}}
    out = args.out or BENCHMARKS / f"results-extrapolation-{config.stem}.json"
    for seed in args.seeds:
        run = args.runs / f"{config.stem}-seed{seed}"
        reuse = args.reuse and (run / "model" / "config.json").is_file()
        model_dir, seconds = (run / "model", None) if reuse else train(config, seed, run, args.train_args)
        model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
        training_depth = model.config.mean_recurrence
        rows = run_methods([LatentDepth(model, tokenizer, args.steps)], problems, desc=f"seed {seed}")
        results["seeds"][seed] = {"model": str(model_dir), "train_seconds": seconds, "training_depth": training_depth,
                                  "bar": bar(rows, trained_max, training_depth), "rows": rows}
        out.write_text(json.dumps(results, indent=1))
        series = {f"k={d}": ([r["steps"] for r in select(rows, difficulty=d)],
                             [r["accuracy"] for r in select(rows, difficulty=d)]) for d in args.difficulties}
        line_plot(out.with_name(f"{out.stem}-seed{seed}.png"), series, "test-time depth (core steps)", "accuracy",
                  f"{task_name}: trained on k <= {trained_max}, depth {training_depth} (seed {seed})", logx=True)
        for check in results["seeds"][seed]["bar"]:
            print(f"seed {seed}, k={check['difficulty']}: {check['accuracy_at_training_depth']} at the training depth, "
                  f"best {check['best_deeper_accuracy']} at r={check['best_deeper_steps']}: "
                  + ("holds" if check["holds"] else "fails"), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
