"""`rlm demo`: the whole mission in one command on a laptop CPU, as a recipe of the public commands.

1. models: the shipped checkpoints (checkpoints/demo-latent, checkpoints/demo-cot, made by `rlm train` with
   configs/demo-latent.yaml and configs/demo-cot.yaml, each with a manifest), or retrained with the same configs
   (--from-scratch), or trained for a few dozen steps (--quick, a smoke test of the pipeline);
2. `rlm compare` on held-out problems, harder ones included: latent depth (deeper than trained) and adaptive exit
   against the CoT model's budget forcing, majority vote and best-of-n; its findings are the report's;
3. the latent rows of that comparison written as a depth sweep (sweep/), with the latent dynamics of a few
   problems traced step by step: every latent cell is answered once;
4. report.md with the plots and tables, and results.json. Every statement in the report is computed from the
   measurements, including when the expected effect does not show.
"""

import csv
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.recipes import checkpoints_dir, recipes_dir
from recurrent_lm.tasks import parse_int_list
from recurrent_lm.train.cli import train_main

from .compare import compare
from .latent import AdaptiveDepth, LatentDepth
from .report import RESULT_COLUMNS, markdown_table, prepare_output, write_summary
from .sweep import latent_dynamics, sweep_problems, write_sweep

CHECKPOINTS = checkpoints_dir()
CONFIGS = recipes_dir()
TASK = "permutation"
TRAINED_MAX_DIFFICULTY = 4  # configs/demo-*.yaml train on difficulties 1..4
SEED = 1234  # the held-out problems' seed (training draws its problems from other seeds)

# A permutation problem of difficulty k takes 12 * k thinking tokens ("42013>21430;" per permutation): the budgets
# reach full chains at every trained difficulty (48 at k = 4) and at the harder k = 6 (72).
FULL = dict(difficulties="1,2,3,4,6", n=100, steps="1,2,4,6,8,16,32", budgets="0,12,24,36,48,72", votes="1,2,4,8",
            vote_budget=72, exit_thresholds=[1e-2, 1e-3, 1e-4])
QUICK = dict(difficulties="1,2,6", n=6, steps="1,2,8", budgets="0,24", votes="1,2", vote_budget=24,
             exit_thresholds=[1e-2])
QUICK_TRAINING = ["--trainer.max_steps", "12", "--trainer.limit_val_batches", "0", "--data.batch_size", "16"]


def machine() -> str:
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU with {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return f"{platform.machine()} {platform.system()}, {device}, torch {torch.__version__}"


def last_metrics(run: Path) -> dict:
    """The last value of every metric the run logged (CSV logger)."""
    metrics = {}
    for path in sorted(run.glob("**/metrics.csv")):
        for row in csv.DictReader(open(path)):
            metrics.update({k: float(v) for k, v in row.items() if v and k not in ("epoch",)})
    return metrics


def write_manifest(model_dir: Path, config: Path, overrides: list[str], seconds: float, run: Path) -> dict:
    seed = int(overrides[overrides.index("--seed_everything") + 1]) if "--seed_everything" in overrides else 0
    shipped = config.parent == CONFIGS  # a shipped recipe: named by where it lives in the repository, run by its name
    name = f"configs/{config.name}" if shipped else str(config)
    manifest = {"config": name, "config_text": config.read_text(), "overrides": overrides, "seed": seed,
                "command": " ".join(["rlm", "train", "--config", config.stem if shipped else name, *overrides]),
                "machine": machine(), "wall_seconds": round(seconds, 1), "final_metrics": last_metrics(run)}
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def train_model(name: str, out: Path, extra: list[str]) -> Path:
    """`rlm train --config configs/{name}.yaml` into out/{name}; returns the exported model directory."""
    run = out / name
    config = CONFIGS / f"{name}.yaml"
    overrides = ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run), *extra]
    start = time.perf_counter()
    train_main(["--config", str(config), *overrides])
    write_manifest(run / "model", config, overrides, time.perf_counter() - start, run)
    return run / "model"


def demo(out: Path = Path("demo"), quick: bool = False, from_scratch: bool = False, seed: int = 0,
         checkpoints: Path = CHECKPOINTS, overwrite: bool = False) -> dict:
    """Train (or load) a tiny latent model and a tiny CoT model, sweep depth, budget and votes on held-out problems
    (harder ones too), and write report.md, results.json and the plots.

    Args:
        out: output folder.
        quick: a smoke run of the same pipeline with tiny budgets (under 2 minutes; the numbers mean nothing).
        from_scratch: retrain both models with configs/demo-latent.yaml and configs/demo-cot.yaml instead of using
            the shipped checkpoints (35 minutes in all on 2 CPU cores; see the README).
        seed: training seed (weights, data stream, depth draws) of --from-scratch and --quick runs, to check that
            the conclusions hold across seeds; the held-out problems stay the same.
        checkpoints: the folder with the shipped checkpoints.
        overwrite: replace an earlier demo in `out`.
    """
    out = prepare_output(out, overwrite)
    started = time.perf_counter()
    settings = QUICK if quick else FULL
    if quick or from_scratch:
        seeds = ["--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed)]
        extra = (QUICK_TRAINING if quick else []) + seeds
        latent, cot = (train_model(name, out / "train", extra) for name in ("demo-latent", "demo-cot"))
    else:
        latent, cot = checkpoints / "demo-latent", checkpoints / "demo-cot"
        for path in (latent, cot):
            if not (path / "manifest.json").is_file():
                raise FileNotFoundError(f"no shipped checkpoint at {path}: run `rlm demo --from-scratch` to train it")
    print(f"[demo] models: {latent}, {cot}", flush=True)

    compare_result = compare(latent, cot, task=TASK, difficulties=settings["difficulties"], n=settings["n"],
                             out=out / "compare", steps=settings["steps"], exit_criterion="kl",
                             exit_thresholds=settings["exit_thresholds"], budgets=settings["budgets"],
                             votes=settings["votes"], vote_budget=settings["vote_budget"], seed=SEED,
                             trained_max_difficulty=TRAINED_MAX_DIFFICULTY)
    sweep_rows = write_latent_sweep(out / "sweep", latent, compare_result["rows"], settings)
    manifests = {name: json.loads((path / "manifest.json").read_text()) for name, path in
                 (("latent", latent), ("cot", cot))}
    results = {"task": TASK, "quick": quick, "from_scratch": from_scratch, "seed": seed, "settings": settings,
               "models": {"latent": str(latent), "cot": str(cot)}, "manifests": manifests,
               "findings": compare_result["findings"], "compare": compare_result["rows"],
               "s1_metrics": compare_result["s1_metrics"], "sweep": sweep_rows,
               "wall_seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = write_report(out, results)
    print(f"[demo] wrote {report} and {out / 'results.json'} in {results['wall_seconds']:.0f} s", flush=True)
    return {"out": str(out), "report": str(report), "findings": results["findings"], "rows": compare_result["rows"]}


def write_latent_sweep(out: Path, latent: Path, rows: list[dict], settings: dict) -> list[dict]:
    """sweep/ from the comparison's latent rows (no cell answered twice), plus the traced latent dynamics of three
    problems of the hardest difficulty."""
    latent_rows = [r for r in rows if r["method"] in (LatentDepth.name, AdaptiveDepth.name)]
    difficulties = parse_int_list(settings["difficulties"], "--difficulties")
    depths = parse_int_list(settings["steps"], "--steps")
    hardest = sweep_problems(TASK, None, [max(difficulties)], 3, SEED)[max(difficulties)]
    traces = latent_dynamics(load_model(latent), load_tokenizer(latent), hardest, max(depths))
    meta = {"model": str(latent), "task": TASK, "seed": SEED, "depths": depths, "difficulties": difficulties,
            "n": settings["n"], "adaptive_max_steps": max(depths)}
    write_sweep(prepare_output(out, overwrite=False), latent, latent_rows, traces, meta)
    return latent_rows


def reproduce_command(results: dict) -> str:
    trains = results["quick"] or results["from_scratch"]
    return ("rlm demo" + " --quick" * results["quick"] + " --from-scratch" * results["from_scratch"]
            + (f" --seed {results['seed']}" if trains and results["seed"] else ""))


def write_report(out: Path, results: dict) -> Path:
    for name in ("accuracy_vs_flops.png", "accuracy_vs_depth.png", "accuracy_vs_budget.png"):
        shutil.copy(out / "compare" / name, out / name)
    for name in ("latent_change.png", "logit_lens.png"):
        if (out / "sweep" / name).exists():
            shutil.copy(out / "sweep" / name, out / name)
    rows = results["compare"]
    manifests = "\n".join(
        f"- {name}: `{m['command']}` on {m['machine']}, {m['wall_seconds']:.0f} s; final metrics "
        + ", ".join(f"{k} {v:.3g}" for k, v in sorted(m["final_metrics"].items()) if k.startswith("val/acc"))
        for name, m in results["manifests"].items())
    warning = ("**Quick mode: tiny budgets for a smoke test; these numbers say nothing about the methods.**\n\n"
               if results["quick"] else "")
    sections = [
        ("What this is", warning + f"A tiny recurrent-depth model (random depth, truncated backprop) and a tiny "
         f"chain-of-thought model with the same unique parameters, both trained on the {TASK} task (difficulties "
         f"1..{TRAINED_MAX_DIFFICULTY}), evaluated on the same held-out problems, harder ones included. FLOPs per "
         "problem: the prompt and every generated or inserted token at its depth (recurrent_lm.flops)."),
        ("Findings (computed from the measurements)", "\n".join(f"- {line}" for line in results["findings"])),
        ("Everything on one compute axis", "![accuracy against FLOPs](accuracy_vs_flops.png)"),
        ("Latent depth", "![accuracy against depth](accuracy_vs_depth.png)\n\n![logit lens](logit_lens.png)"),
        ("Thinking budget", "![accuracy against budget](accuracy_vs_budget.png)"),
        ("Results", markdown_table(rows, RESULT_COLUMNS)),
        ("s1 metrics (budget forcing)", markdown_table(results["s1_metrics"], ["difficulty", "cot_steps", "control",
                                                                             "scaling", "performance"])),
        ("Models", manifests),
        ("Reproduce", f"`{reproduce_command(results)}`"
         f" ({results['wall_seconds']:.0f} s here). Details: sweep/summary.md and compare/summary.md."),
    ]
    return write_summary(out, "recurrent-lm demo: latent depth against chain of thought", sections, name="report.md")

