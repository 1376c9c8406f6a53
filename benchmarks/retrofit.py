"""Retrofitted recurrence on CPU: accuracy against test-time depth before and after continued training (a
measurement, not a test).

1. The source: a small Llama (d 128, 4 heads, 2 key/value heads, 4 layers) built here with random weights and the
   task's character tokenizer, or --source: any local Llama / Mistral / Qwen2 checkpoint, a .gguf file, or an
   installed model's short name (smollm2-135m-instruct: the task text is then encoded by its own tokenizer).
2. `rlm retrofit` into --split (default prelude 1 / core 2 / coda 1 of every layer; --layers picks a selection),
   adapter [0 | I], the first injection skipped: r = 1 is the selected layers of the source.
3. Continuations from the same retrofitted weights, the same data stream and the same number of optimizer steps:
   "recurrent" (one per --seeds): the --recipe (mean depth ramping 1 -> 4 over 75% of the steps, "1-sqrt");
   "no recurrence": the same recipe at a fixed depth of 1, i.e. the selected layers trained on as they are (the
   same parameters train; at r = 1 a step costs less, so this arm sees the same data for fewer FLOPs).
4. Greedy answers on fresh problems (EVAL_SEED, never drawn by training) at every difficulty and depth, with 95%
   Wilson intervals, before and after; JSON and a plot per arm. --ship NAME writes the first seed's recurrent
   result to checkpoints/NAME (its trained tensors and a manifest: recurrent_lm.retrofit.ship_trained), which
   `--model NAME` then assembles with the installed source.

    python benchmarks/retrofit.py                       # the random small Llama: about 25 minutes on 2 idle cores
    python benchmarks/retrofit.py --source smollm2-135m-instruct --recipe retrofit-smollm2 --split 4 4 4 \
        --layers 0-3,22-29 --steps-train 400 --seeds 0 1 2 --ship smollm2-recurrent \
        --out benchmarks/results-retrofit-smollm2.json     # SmolLM2-135M: about 25 minutes per run
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


def ship(args, run: Path, arm: dict, seconds: float, retrofitted: Path) -> None:
    """The recurrent arm's trained tensors and manifest into checkpoints/NAME (recurrent_lm.retrofit.ship_trained)."""
    import platform

    from recurrent_lm.recipes import resolve_recipe
    from recurrent_lm.retrofit import ship_trained

    trainable = ["adapter", "core"]
    accuracy = {f"k={r['difficulty']} r={r['steps']}": r["accuracy"] for r in arm["rows"]}
    manifest = {"config": args.recipe, "config_text": resolve_recipe(args.recipe).read_text(), "seed": arm["seed"],
                "command": f"python benchmarks/retrofit.py --source {args.source} --recipe {args.recipe} --split "
                           f"{' '.join(map(str, args.split))} --layers {args.layers} --steps-train {args.steps_train}",
                "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} threads, "
                           f"torch {torch.__version__}", "wall_seconds": round(seconds, 1),
                "eval": {"problem_seed": EVAL_SEED, "n": args.n, "accuracy": accuracy,
                         "note": "measured on the float32 model that trained; the shipped tensors are bfloat16"}}
    out = BENCHMARKS.parent / "checkpoints" / args.ship
    ship_trained(run / "model", out, args.source, trainable, manifest, retrofitted)
    print(f"shipped {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="a Llama-family directory, .gguf file or installed short name (default: a "
                        "random small Llama)")
    parser.add_argument("--recipe", default="retrofit-llama")
    parser.add_argument("--split", type=int, nargs=3, default=[1, 2, 1], metavar=("PRELUDE", "CORE", "CODA"))
    parser.add_argument("--layers", help="the source layers to keep, e.g. 0-3,22-29 (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds of the recurrent arm (default: --seed)")
    parser.add_argument("--arms", nargs="+", default=["recurrent", "no recurrence"])
    parser.add_argument("--ship", help="write the first recurrent seed's result to checkpoints/NAME")
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
    prelude, core, coda = args.split
    retrofitted = retrofit(source, args.runs / "retrofitted", prelude=prelude, core=core, coda=coda,
                           layers=args.layers, mean_recurrence=4, mean_backprop_depth=2,
                           skip_first_injection=args.source is not None, overwrite=True)
    task = get_task(args.task)
    problems = {d: task.problems(d, args.n, seed=EVAL_SEED) for d in args.difficulties}
    results = {"source": str(args.source or "random small Llama (d 128, 4 layers)"), "task": args.task,
               "trained_max_difficulty": 4, "eval_seed": EVAL_SEED, "n": args.n, "seed": args.seed,
               "steps_train": args.steps_train, "recipe": args.recipe, "layers": args.layers,
               "split": f"prelude {prelude} / core {core} / coda {coda}",
               "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU float32",
               "before": evaluate(retrofitted, problems, args.depths, "before"), "arms": {}}
    fixed = ["--model.fixed_num_steps", "1", "--model.recurrence_curriculum", "null"]
    seeds = args.seeds or [args.seed]
    arms = {**({f"recurrent seed {s}": ([], s) for s in seeds} if "recurrent" in args.arms else {}),
            **({"no recurrence": (fixed, seeds[0])} if "no recurrence" in args.arms else {})}
    for name, (extra, seed) in arms.items():
        run = args.runs / name.replace(" ", "-")
        started = time.perf_counter()
        train_main(["--config", args.recipe, "--model.init_from", str(retrofitted), "--data.tokenizer",
                    str(retrofitted), "--trainer.max_steps", str(args.steps_train), "--seed_everything", str(seed),
                    "--model.seed", str(seed), "--data.seed", str(seed), "--overwrite", "true",
                    "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
                    "--trainer.enable_progress_bar", "false", *extra])
        seconds = time.perf_counter() - started
        results["arms"][name] = {"train_seconds": round(seconds, 1), "model": str(run / "model"), "seed": seed,
                                 "rows": evaluate(run / "model", problems, args.depths, name)}
        args.out.write_text(json.dumps(results, indent=1))
        if args.ship and name == f"recurrent seed {seeds[0]}":
            ship(args, run, results["arms"][name], seconds, retrofitted)
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
