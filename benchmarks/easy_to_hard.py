"""The looped-model literature's own benchmarks, trained on CPU and tested on longer inputs, beside the published
numbers (a measurement, not a test). Settings and published figures: docs/easy-to-hard.md.

Each task has recipes (configs/NAME.yaml, with overrides for the variants tried) and a test: `rlm sweep` at
lengths up to 4-5x the longest trained one and at test-time depths up to well past the training depth, on fresh
problems (EVAL_SEED: problem seeds "task/length/EVAL_SEED"; the training stream draws "train/..." ones). Every
recipe tried keeps its results: benchmarks/results-easy-to-hard-TASK.json holds every variant and seed, with the
exact commands, and a plot per task shows accuracy against depth at every length.

    python benchmarks/easy_to_hard.py --run                     # train and test what is missing (3 seeds a recipe)
    python benchmarks/easy_to_hard.py --run --tasks prefix-sums --seeds 0
    python benchmarks/easy_to_hard.py                           # collect: the results files, plots and table
    python benchmarks/easy_to_hard.py --ship                    # the quoted seed's model -> checkpoints/TASK
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent
RUNS = Path("runs") / "easy-to-hard"
EVAL_SEED = 777_101

FAN_ET_AL = {"source": "Fan et al. 2024 (looped transformers, arXiv 2409.15647)",
             "setting": "one decoder block looped, no positions, input injection, loss on the final step only after "
                        "T(n) loops (n for parity and copy), lengths 1-20 with a curriculum; 6,400 test examples; "
                        "model size and steps not read"}


def mcleish_et_al(setting: str) -> dict:
    """McLeish et al.'s published addition result, beside how its setting differs from a recipe's."""
    return {"source": "McLeish et al. 2024 (Abacus, arXiv 2405.17399)", "setting": setting,
            "result": "mean accuracy beyond 20 digits 99.1% (standard Abacus transformer 92.9%); up to 99% at 100 "
                      "digits"}


# Abacus positions over the copy task's symbols (their ids in its tokenizer), rows up to 64 symbols + the offset
COPY_ABACUS = ["--model.architecture.abacus_positions", "128",
               "--model.architecture.abacus_token_ids", "[7,8,9,10,11,12,13,14]", "--model.abacus_offset", "50"]


def tied_depth(longest_trained: int):
    """The depth training used at a length when it ties depth to length: n steps for n symbols (the longest trained
    one's beyond it), plus 0-4 more (their mean: 2)."""
    return lambda length: min(length, longest_trained) + 2


def answered_in_slots(recipe: str, test: dict, variants: dict, quoted: str, differs_from_mcleish: str) -> dict:
    """An addition task answered in n + 1 slots in one forward pass (Fan et al.'s form), trained on operands of 1-10
    digits with the depth tied to the length."""
    return {"recipe": recipe, "trained": "operands of 1-10 digits", "unit": "digits", "test": test | {"n": 100},
            "training_depth": tied_depth(10), "variants": variants, "quoted": quoted,
            "published": [FAN_ET_AL | {"result": "addition near-perfect at the trained maximum + 10"},
                          mcleish_et_al(differs_from_mcleish)]}


# task -> what is tested, the recipes tried (name: overrides of configs/RECIPE.yaml), the one the README quotes, and
# the published numbers of the nearest setting
TASKS = {
    "prefix-sums": {
        "recipe": "prefix-sums", "trained": "1-16 bits", "unit": "bits",
        "test": {"difficulties": "16,32,64,128,256", "steps": "8,16,32,64,128,256,320", "n": 100},
        "training_depth": tied_depth(16),
        # name: (overrides of the recipe, seeds)
        "variants": {"window 2": ([], (0, 1, 2)),
                     "full attention": (["--model.architecture.attention_window", "null"], (0,)),
                     "window 2, progressive loss": (["--model.progressive_loss", "1"], (0,))},
        "quoted": "window 2",
        "published": [
            {"source": "Bansal et al. 2022 (DT-net, arXiv 2202.05826), appendix table",
             "setting": "1D conv net, 3.1M parameters, input recalled every iteration, progressive loss a = 1; "
                        "trained on 32 bits (8,000 strings, 150 epochs), 30 iterations; best iteration per test",
             "result": "512 bits: 97.12 +- 1.88% at its best iteration (237); without recall 11.26%; "
                       "feed-forward 0.00%"}]},
    "addition": {
        "recipe": "addition", "trained": "operands of 1-10 digits", "unit": "digits",
        "test": {"difficulties": "10,20,30,40,50", "steps": "1,2,4,8,16", "n": 100},
        "training_depth": lambda length: 4,  # drawn around its mean, 4
        "variants": {"abacus, looped": ([], (0, 1, 2)),
                     # the first recipe's failures past 12 digits are mostly answers ended too early, and sharper
                     # attention at test time alone lifts 20 digits from 0.11 to 0.58 (teacher-forced): train it in
                     "abacus, looped, log-scaled attention": (["--model.architecture.attention_log_scale", "true"],
                                                              (0, 1, 2)),
                     # rotary positions turned by each digit's place (no table): every digit-to-digit score
                     # depends on the difference of places only, so no pair of places is new at a longer length
                     "abacus rope, looped": (["--model.architecture.use_rope", "true",
                                              "--model.architecture.abacus_rope", "true",
                                              "--model.architecture.abacus_positions", "0"], (0, 1, 2)),
                     # the table's rows spread as a sorted random sample of 1..60 per batch (Ruoss et al.'s
                     # randomized positions): every pair of rows occurs together in training
                     "abacus random places, looped": (["--model.abacus_places", "random"], (0, 1, 2)),
                     "rotary positions, no abacus": (["--model.architecture.use_rope", "true",
                                                      "--model.architecture.abacus_positions", "0",
                                                      "--model.architecture.abacus_token_ids", "null",
                                                      "--model.abacus_offset", "0"], (0,))},
        "quoted": "abacus, looped",
        "published": [
            mcleish_et_al("decoder, width 1024, 8 layers x 2 recurrences, input injection, Abacus positions with "
                          "offsets 0-100; trained on operands of 1-20 digits (20M samples, 24 GPU hours)")]},
    # Fan et al.'s form of the same task: n + 1 answer slots filled in one forward pass, the depth tied to the length
    "addition-slots": answered_in_slots(
        "addition-slots", {"difficulties": "10,20,30,40", "steps": "4,11,16,21,31,41,51"},
        {"Abacus, slots": ([], (0,))}, "Abacus, slots",
        "the answer written digit by digit (no slots); width 1024, 8 layers x 2 recurrences, input injection, Abacus "
        "offsets 0-100; operands of 1-20 digits (20M samples)"),
    # the same sums with the digits aligned by the input: a window of 4 sees a slot's column and the slot before it
    "addition-columns": answered_in_slots(
        "addition-columns", {"difficulties": "10,20,40,80", "steps": "2,5,10,20,40,80"},
        {"NoPE, window 4": ([], (0, 1, 2))}, "NoPE, window 4",
        "operands written one after the other (aligned by Abacus positions, not by the input), the answer digit by "
        "digit; width 1024, 8 layers x 2 recurrences; operands of 1-20 digits"),
    "parity": {
        "recipe": "parity", "trained": "1-20 bits", "unit": "bits",
        "test": {"difficulties": "20,30,40,64", "steps": "8,20,30,40,64,80", "n": 100},
        "training_depth": tied_depth(20),
        # full attention without positions stays at chance on every length, 20 included, within 1,500 steps; a
        # window of 2 passes the running parity one position per layer, as in prefix sums
        "variants": {"NoPE": ([], (0,)),
                     "NoPE, window 2": (["--model.architecture.attention_window", "2"], (0, 1, 2)),
                     # seed 2 of the above was still at chance when its loss began to fall, at step 1,400
                     "NoPE, window 2, 3000 steps": (["--model.architecture.attention_window", "2",
                                                     "--trainer.max_steps", "3000"], (0, 1, 2))},
        "quoted": "NoPE, window 2, 3000 steps",
        "published": [FAN_ET_AL | {"result": "parity near-perfect beyond 40 bits (trained on up to 20)"}]},
    "copy": {
        "recipe": "copy", "trained": "1-20 symbols", "unit": "symbols",
        "test": {"difficulties": "20,30,40,64", "steps": "8,20,30,40,64,80", "n": 100},
        "training_depth": tied_depth(20),
        # without positions the model learns about 60% of the symbols and no whole string within 1,500 steps;
        # Abacus positions over the symbols give the i-th answer symbol the i-th input symbol's position
        "variants": {"NoPE": ([], (0,)),
                     "Abacus": (COPY_ABACUS, (0, 1, 2)),
                     "Abacus, random places": ([*COPY_ABACUS, "--model.abacus_places", "random"], (0, 1, 2))},
        "quoted": "Abacus",
        "published": [FAN_ET_AL | {"result": "copy near-perfect at the trained maximum + 10 (30 symbols)"}]},
}


def slug(variant: str) -> str:
    return variant.replace(", ", "-").replace(" ", "-")


def run_dir(task: str, variant: str, seed: int) -> Path:
    return RUNS / task / f"{slug(variant)}-s{seed}"


def test_options(spec: dict) -> str:
    """The test as `rlm sweep` options."""
    return " ".join(f"--{name} {value}" for name, value in spec["test"].items())


def train_and_test(task: str, variant: str, seed: int) -> Path:
    """`rlm train` (with a manifest, as the demo's models have) and `rlm sweep` of one variant and seed, each done
    once; returns the sweep's folder."""
    from recurrent_lm.eval.demo import train_model
    from recurrent_lm.eval.sweep import sweep

    spec, run = TASKS[task], run_dir(task, variant, seed)
    seeds = ["--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed)]
    if not (run / "model" / "model.safetensors").is_file():
        train_model(spec["recipe"], run.parent, [*spec["variants"][variant][0], *seeds], run_name=run.name)
    tested = run / "sweep"
    if not (tested / "results.json").is_file():
        print(f"$ rlm sweep --model {run}/model --task {task} {test_options(spec)} --seed {EVAL_SEED}", flush=True)
        sweep(run / "model", task=task, seed=EVAL_SEED, exit_criteria=[], dynamics=0, out=tested, **spec["test"])
    return tested


def summary(rows: list[dict], trained_depth_of) -> list[dict]:
    """Per length: accuracy at the depth training used for that length, and at the best depth (and which)."""
    table = []
    for length in sorted({r["difficulty"] for r in rows}):
        curve = sorted((r for r in rows if r["difficulty"] == length), key=lambda r: r["steps"])
        best = max(curve, key=lambda r: (r["accuracy"], -r["steps"]))
        at_trained = min(curve, key=lambda r: abs(r["steps"] - trained_depth_of(length)))
        table.append({"length": length, "best_depth": best["steps"], "best_accuracy": best["accuracy"],
                      "best_ci": [best["ci_low"], best["ci_high"]], "training_depth": at_trained["steps"],
                      "accuracy_at_training_depth": at_trained["accuracy"]})
    return table


def collect(task: str) -> dict:
    """The task's results file and plots from every variant and seed tested (here, or kept from the file)."""
    from recurrent_lm.eval.report import line_plot

    spec, out = TASKS[task], BENCHMARKS / f"results-easy-to-hard-{task}.json"
    earlier = json.loads(out.read_text())["variants"] if out.is_file() else {}
    results = {"task": task, "trained": spec["trained"], "test": f"{test_options(spec)} --seed {EVAL_SEED}",
               "machine": "x86_64 Linux, 2-core VM, torch 2.13.0+cpu, float32, runs beside other work",
               "published": spec["published"], "variants": {}}
    for variant, (overrides, variant_seeds) in spec["variants"].items():
        for seed in variant_seeds:
            tested = run_dir(task, variant, seed) / "sweep" / "results.json"
            if tested.is_file():
                manifest = json.loads((run_dir(task, variant, seed) / "model" / "manifest.json").read_text())
                rows = [{k: r[k] for k in ("difficulty", "steps", "n", "accuracy", "ci_low", "ci_high",
                                           "flops_per_problem")}
                        for r in json.loads(tested.read_text())["rows"] if r["method"] == "latent"]
                record = {"command": manifest["command"], "wall_seconds": manifest["wall_seconds"], "rows": rows,
                          "summary": summary(rows, spec["training_depth"])}
            elif str(seed) in earlier.get(variant, {}).get("seeds", {}):  # measured on an earlier machine: kept
                record = earlier[variant]["seeds"][str(seed)]
            else:
                print(f"{task}, {variant}, seed {seed}: not tested yet ({tested})")
                continue
            results["variants"].setdefault(variant, {"overrides": overrides, "seeds": {}})["seeds"][seed] = record
    out.write_text(json.dumps(results, indent=1) + "\n")
    for variant, measured in results["variants"].items():  # the table docs/easy-to-hard.md quotes
        lines = [f"{task}, {variant}: per length, each seed's best accuracy (at depth) / at the training depth"]
        for i, row in enumerate(next(iter(measured["seeds"].values()))["summary"]):
            cells = [f"{run['summary'][i]['best_accuracy']:.2f} (r={run['summary'][i]['best_depth']}) / "
                     f"{run['summary'][i]['accuracy_at_training_depth']:.2f}" for run in measured["seeds"].values()]
            lines.append(f"| {row['length']} | " + " | ".join(cells) + " |")
        print("\n".join(lines))
    for variant, measured in results["variants"].items():  # a line per length: the seeds' mean, a band min..max
        series, bands, runs = {}, {}, list(measured["seeds"].values())
        for length in sorted({r["difficulty"] for r in runs[0]["rows"]}):
            curves = [sorted((r["steps"], r["accuracy"]) for r in run["rows"] if r["difficulty"] == length)
                      for run in runs]
            depths, values = [p[0] for p in curves[0]], list(zip(*[[p[1] for p in c] for c in curves]))
            label = f"{length} {spec['unit']}"
            series[label] = (depths, [sum(v) / len(v) for v in values])
            bands[label] = ([min(v) for v in values], [max(v) for v in values])
        seeds_text = f"seeds {', '.join(map(str, measured['seeds']))}: mean, band min-max"
        line_plot(BENCHMARKS / f"results-easy-to-hard-{task}-{slug(variant)}.png", series,
                  "test-time depth (core steps)",
                  "exact accuracy", f"{task} ({variant}), trained on {spec['trained']}\n{seeds_text}", logx=True,
                  bands=bands)
    print(f"wrote {out}")
    return results


def ship(task: str) -> Path:
    """The quoted variant's seed-0 model (trained by `rlm train --config RECIPE`) to checkpoints/TASK."""
    spec = TASKS[task]
    source, target = run_dir(task, spec["quoted"], 0) / "model", BENCHMARKS.parent / "checkpoints" / task
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    print(f"shipped {source} -> {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="train and test the recipes and seeds not done yet")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", help="only these recipe variants (default: every one)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="the seeds --run trains, of those each variant lists (collect takes every one tested)")
    parser.add_argument("--ship", action="store_true", help="copy each task's quoted seed-0 model to checkpoints/")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCHMARKS))
    for task in args.tasks:
        if args.run:
            for variant, (_, seeds) in TASKS[task]["variants"].items():
                if args.variants is None or variant in args.variants:
                    for seed in sorted(set(args.seeds) & set(seeds)):
                        train_and_test(task, variant, seed)
        collect(task)
        if args.ship:
            ship(task)


if __name__ == "__main__":
    main()
