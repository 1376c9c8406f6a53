"""`rlm demo`: the whole mission in one command on a laptop CPU, as a recipe of the public commands.

Two studies, each a pair of tiny models with the same unique parameters (a recurrent-depth one that answers
directly, and a chain-of-thought one), trained on difficulties 1..4 of one task:
- permutation (the S5 word problem): latent depth against every chain-of-thought method on one FLOPs axis;
- extrapolation (pointer chasing in a fixed table): does more test-time depth solve problems harder than any
  trained on, and what does chain of thought do on them?
For each study:
1. models: the shipped checkpoints (checkpoints/{name}, made by `rlm train` with configs/{name}.yaml, each with a
   manifest), or retrained with the same configs (--from-scratch), or trained for a few dozen steps (--quick, a
   smoke test of the pipeline);
2. `rlm compare` on held-out problems, harder ones included: latent depth (deeper than trained) and adaptive exit
   against the CoT model's budget forcing, majority vote and best-of-n; its findings are the report's;
3. the latent rows of that comparison written as a depth sweep (sweep/), with the latent dynamics of a few
   problems traced step by step: every latent cell is answered once;
4. where the study has a process reward model (permutation: configs/demo-prm.yaml), a second `rlm compare` of
   search with it (weighted best-of-N, beam search, DVTS, REBASE, and the oracle bound) at the hardest trained
   difficulty and the first untrained one (search/), and the reward model's step-label accuracy there.
Then report.md with the plots and tables, and results.json. Every statement in the report is computed from the
measurements, including when the expected effect does not show.
"""

import csv
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from recurrent_lm.loading import load_any_causal_lm, load_model, load_tokenizer
from recurrent_lm.options import ranges
from recurrent_lm.outputs import Interrupted, claimed_output
from recurrent_lm.recipes import checkpoints_dir, recipes_dir
from recurrent_lm.tasks import get_task, parse_int_list, problem_set, save_jsonl
from recurrent_lm.train.cli import train_main

from .compare import compare, compute_optimal
from .latent import AdaptiveDepth, LatentDepth, frontier_lines
from .report import RESULT_COLUMNS, markdown_table, write_summary
from .reward_models import load_reward_model
from .step_labels import judge_reward_model
from .sweep import latent_dynamics, sweep, sweep_problems, write_sweep

CHECKPOINTS = checkpoints_dir()
CONFIGS = recipes_dir()
TRAINED_MAX_DIFFICULTY = 4  # every demo recipe trains on difficulties 1..4
SEED = 1234  # the held-out problems' seed (training draws its problems from other seeds)
QUICK_TRAINING = ["--trainer.max_steps", "12", "--trainer.limit_val_batches", "0", "--data.batch_size", "16"]


@dataclass(frozen=True)
class Study:
    """One task, its two models (recipe and checkpoint names) and the grid `rlm compare` runs on them."""

    name: str  # its folder in the demo's output
    title: str
    task: str
    latent: str
    cot: str
    about: str
    exit_gate: str | None = None  # a recipe that adds a learned exit gate to the latent model (then evaluated)
    full: dict = field(default_factory=dict)  # rlm compare's options
    quick: dict = field(default_factory=dict)
    reward_model: str | None = None  # a process reward model's recipe: search with it, in a second comparison
    search: dict = field(default_factory=dict)  # that comparison's options (full, and quick)
    search_quick: dict = field(default_factory=dict)
    # adaptive depth on a mixed-difficulty set (rlm sweep --mixed, batch 8): every fixed depth, each exit rule's
    # default grid and the oracle; the frontier says what adaptive exit saves (full, and quick)
    mixed: dict = field(default_factory=dict)
    mixed_quick: dict = field(default_factory=dict)


STUDIES = (
    # A permutation problem of difficulty k takes 12 * k thinking tokens ("42013>21430;" per permutation): the
    # budgets reach full chains at every trained difficulty (48 at k = 4) and at the harder k = 5 and 6 (60, 72).
    # Adaptive exit by the learned gate (configs/demo-exit-gate.yaml), the prompt at a fixed depth of 4.
    Study("permutation", "Latent depth against chain of thought (permutation)", "permutation", "demo-latent",
          "demo-cot", "The S5 word problem: compose k permutations of 5 elements. The latent model was trained with "
          "a random depth per step (mean 6) and truncated backprop; its adaptive exit is a learned gate "
          "(configs/demo-exit-gate.yaml), with the prompt at a fixed depth.", exit_gate="demo-exit-gate",
          full=dict(difficulties="1,2,3,4,5,6", n=100, steps="1,2,3,4,6,8,16,32", budgets="0,12,24,36,48,60,72",
                    votes="1,2,4,8", vote_budget=72, exit_criterion="gate", exit_thresholds=[0.1, 0.03, 0.01],
                    exit_prompt_steps=4),
          quick=dict(difficulties="1,2,6", n=6, steps="1,2,8", budgets="0,24", votes="1,2", vote_budget=24,
                     exit_criterion="gate", exit_thresholds=[0.1], exit_prompt_steps=2),
          # Search with the demo's PRM (configs/demo-prm.yaml) at the hardest trained k and the first untrained one,
          # where the CoT policy is perfect and where it fails: whether a verifier changes either.
          reward_model="demo-prm",
          search=dict(difficulties="4,5", n=50, steps="4", exit_criterion=None, budgets="72", votes="1,2,4,8",
                      vote_budget=72, methods="latent,majority,weighted-best-of-n,beam,dvts,rebase,oracle"),
          search_quick=dict(difficulties="4,5", n=3, steps="4", exit_criterion=None, budgets="24", votes="2",
                            vote_budget=24, methods="latent,majority,weighted-best-of-n,beam,dvts,rebase,oracle",
                            search_max_steps=3),
          mixed=dict(difficulties="1-4", n=20, steps="1-8"), mixed_quick=dict(difficulties="1-4", n=2, steps="1,4")),
    # A pointer problem of difficulty k takes 2 * k thinking tokens ("c;" per hop): 24 at k = 12.
    Study("extrapolation", "Thinking longer than trained (pointer chasing)", "pointer", "pointer-latent",
          "pointer-cot", "Follow k pointers through a fixed 16-node table to a node that points to itself; the input "
          "never grows with k. The latent model was trained with its depth tied to k (k steps plus 0-2 more), "
          "only on k <= 4, at depths <= 6.",
          full=dict(difficulties="1,2,4,6,8,10,12", n=100, steps="1,2,4,6,8,12,16,24", budgets="0,4,8,12,16,24,32",
                    votes="1,2,4,8", vote_budget=32, exit_criterion="cosine", exit_thresholds=[1e-1, 1e-2, 1e-3]),
          quick=dict(difficulties="2,8", n=6, steps="1,8", budgets="0,16", votes="1,2", vote_budget=16,
                     exit_criterion="cosine", exit_thresholds=[1e-2]),
          mixed=dict(difficulties="1-12", n=20, steps="1-16"), mixed_quick=dict(difficulties="1,12", n=2, steps="1,12")),
)


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


def train_model(name: str, out: Path, extra: list[str], run_name: str | None = None) -> Path:
    """`rlm train --config configs/{name}.yaml` into out/{run_name or name}, with a manifest.json beside the
    exported model; returns the exported model directory."""
    run = out / (run_name or name)
    config = CONFIGS / f"{name}.yaml"
    overrides = ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run), *extra]
    start = time.perf_counter()
    train_main(["--config", str(config), *overrides])
    write_manifest(run / "model", config, overrides, time.perf_counter() - start, run)
    return run / "model"


@ranges(seed=">= 0")
def demo(out: Path = Path("demo"), quick: bool = False, from_scratch: bool = False, seed: int = 0,
         checkpoints: Path = CHECKPOINTS, overwrite: bool = False) -> dict:
    """Train (or load) the two studies' tiny latent and CoT models, compare depth, budget and votes on held-out
    problems (harder ones too), and write report.md, results.json and the plots.

    Args:
        out: output folder: report.md, results.json, the plots, and per study {study}/compare, {study}/sweep.
        quick: a smoke run of the same pipeline with tiny budgets (a few minutes; the numbers mean nothing).
        from_scratch: retrain the six models with their configs/*.yaml instead of using the shipped checkpoints
            (about 100-120 minutes in all on 2 CPU cores; see the README).
        seed: training seed (weights, data stream, depth draws) of --from-scratch and --quick runs, to check that
            the conclusions hold across seeds; the held-out problems stay the same.
        checkpoints: the folder with the shipped checkpoints.
        overwrite: replace an earlier demo in `out`.
    """
    with claimed_output(out, option="--out", overwrite=overwrite, inputs=[checkpoints], command="rlm demo") as output:
        started = time.perf_counter()
        results = {"quick": quick, "from_scratch": from_scratch, "seed": seed, "complete": False, "studies": {}}
        try:
            for study in STUDIES:
                results["studies"][study.name] = run_study(study, output.path, quick, from_scratch, seed, checkpoints)
        except KeyboardInterrupt:  # keep the studies that finished, and what the interrupted one wrote
            (output.path / "results.json").write_text(json.dumps(results, indent=1, default=str))
            output.keep()
            raise Interrupted(f"kept the {len(results['studies'])} of {len(STUDIES)} studies that finished in "
                              f"{output.landing / 'results.json'} (\"complete\": false), and the interrupted "
                              f"study's finished part beside it; rerun with --overwrite for the whole demo") from None
        results["findings"] = [f"{study.title}: {line}" for study in STUDIES
                               for line in results["studies"][study.name]["findings"]
                               + results["studies"][study.name].get("search", {}).get("findings", [])
                               + results["studies"][study.name].get("mixed", {}).get("findings", [])]
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["complete"] = True
        (output.path / "results.json").write_text(json.dumps(results, indent=1, default=str))
        write_report(output.path, results)
    report = out / "report.md"
    print(f"[demo] wrote {report} and {out / 'results.json'} in {results['wall_seconds']:.0f} s", flush=True)
    return {"out": str(out), "report": str(report), "findings": results["findings"],
            "rows": {**{name: study["compare"] for name, study in results["studies"].items()},
                     **{f"{name}-search": study["search"]["compare"] for name, study in results["studies"].items()
                        if "search" in study}}}


def run_study(study: Study, out: Path, quick: bool, from_scratch: bool, seed: int, checkpoints: Path) -> dict:
    settings = study.quick if quick else study.full
    if quick or from_scratch:
        seeds = ["--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed)]
        extra = (QUICK_TRAINING if quick else []) + seeds
        base, cot = (train_model(name, out / "train", extra) for name in (study.latent, study.cot))
        # the gate learns on the model just trained: the latent model plus its gate
        gated = (train_model(study.exit_gate, out / "train",
                             extra + ["--model.init_from", str(base), "--data.tokenizer", str(base)])
                 if study.exit_gate else None)
        reward = train_model(study.reward_model, out / "train", extra) if study.reward_model else None
    else:
        base, cot = checkpoints / study.latent, checkpoints / study.cot
        gated = checkpoints / study.exit_gate if study.exit_gate else None
        reward = checkpoints / study.reward_model if study.reward_model else None
    models = {"latent": base, "exit gate": gated, "cot": cot, "reward model": reward}
    for path in filter(None, models.values()):
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"no shipped checkpoint at {path}: run `rlm demo --from-scratch` to train it")
    latent = gated or base  # the same language model, with its gate where it has one
    print(f"[demo] {study.name}: models {latent}, {cot}", flush=True)
    options = {k: v for k, v in settings.items() if k != "n"}
    result = compare(latent, cot, task=study.task, n=settings["n"], out=out / study.name / "compare", seed=SEED,
                     trained_max_difficulty=TRAINED_MAX_DIFFICULTY, **options)
    sweep_rows = write_latent_sweep(out / study.name / "sweep", study.task, latent, result["rows"], settings)
    manifests = {name: json.loads((path / "manifest.json").read_text()) for name, path in models.items() if path}
    summary = {"task": study.task, "settings": settings, "models": {k: str(v) for k, v in models.items() if v},
               "manifests": manifests, "findings": result["findings"],
               "overlap": training_overlap(study.task, parse_int_list(settings["difficulties"], "--difficulties"),
                                           manifests["latent"]),
               "compare": result["rows"], "s1_metrics": result["s1_metrics"], "sweep": sweep_rows}
    if reward is not None:
        summary["search"] = run_search(study, latent, cot, reward, out, quick)
    if study.mixed:
        summary["mixed"] = run_mixed(study, latent, out, quick)
    return summary


def run_mixed(study: Study, latent: Path, out: Path, quick: bool) -> dict:
    """Adaptive depth on a mixed-difficulty set (the same number of problems per difficulty, shuffled), through
    `rlm sweep --mixed` at batch 8: what each exit rule saves against the cheapest fixed depth within 1 point of
    the best one, in FLOPs and wall time, and the oracle's saving."""
    settings = study.mixed_quick if quick else study.mixed
    print(f"[demo] {study.name}: adaptive depth on a mixed-difficulty set", flush=True)
    problems = problem_set([get_task(study.task)], parse_int_list(settings["difficulties"], "--difficulties"),
                           settings["n"], SEED, shuffle=True)
    folder = out / study.name / "mixed"
    folder.mkdir(parents=True, exist_ok=True)
    save_jsonl(problems, folder / "problems.jsonl")
    result = sweep(latent, problems=folder / "problems.jsonl", mixed=True, n=len(problems), steps=settings["steps"],
                   batch_size=8, dynamics=0, out=folder / "sweep")
    (frontier,) = result["frontier"]
    return {"settings": settings, "problems": len(problems), "frontier": frontier,
            "findings": [f"mixed set, {line[2:]}" for line in frontier_lines(frontier)]}


def run_search(study: Study, latent: Path, cot: Path, reward: Path, out: Path, quick: bool) -> dict:
    """The second comparison: search with the reward model (and the oracle bound) beside voting and latent depth,
    and the reward model's step-label accuracy on the same problems' corrupted and policy-sampled chains."""
    settings = study.search_quick if quick else study.search
    options = {k: v for k, v in settings.items() if k != "n"}
    print(f"[demo] {study.name}: search with {reward}", flush=True)
    result = compare(latent, cot, task=study.task, n=settings["n"], out=out / study.name / "search", seed=SEED,
                     trained_max_difficulty=TRAINED_MAX_DIFFICULTY, reward_model=reward, **options)
    scorer = load_reward_model(reward)
    policy, tokenizer = load_any_causal_lm(cot), load_tokenizer(cot)
    torch.manual_seed(SEED)
    judged = [row for difficulty in parse_int_list(settings["difficulties"], "--difficulties")
              for row in judge_reward_model(scorer, policy, tokenizer,
                                            get_task(study.task).problems(difficulty, settings["n"], seed=SEED),
                                            samples=2 if quick else 4, budget=settings["vote_budget"])]
    findings = [line for line in result["findings"] if ", search with the reward model" in line]
    return {"settings": settings, "findings": findings, "compare": result["rows"],
            "compute_optimal": compute_optimal(result["rows"]), "reward_model_accuracy": judged}


def training_overlap(task_name: str, difficulties: list[int], manifest: dict) -> list[str]:
    """Where a difficulty has so few distinct problems that the training stream drew most of them, held-out
    problems are training problems: say so, with the expected share seen (uniform draws over the trained
    difficulties, batch size x steps of the recipe)."""
    recipe = yaml.safe_load(manifest["config_text"])
    overrides = dict(zip(manifest["overrides"][::2], manifest["overrides"][1::2]))
    option = lambda section, key: int(overrides.get(f"--{section}.{key}", recipe[section][key]))  # noqa: E731
    trained = range(option("data", "min_difficulty"), option("data", "max_difficulty") + 1)
    draws = option("data", "batch_size") * option("trainer", "max_steps") / len(trained)
    notes = []
    for difficulty in difficulties:
        distinct = get_task(task_name).distinct_problems(difficulty)
        seen = 1 - math.exp(-draws / distinct) if difficulty in trained and distinct is not None else 0.0
        if seen >= 0.01:
            many = "only " if seen >= 0.5 else ""
            verdict = ": this number measures recall, not generalisation." if seen >= 0.5 else "."
            notes.append(f"k = {difficulty}: {many}{distinct:,} distinct problems exist and training drew about "
                         f"{draws:,.0f} at this difficulty, so about {seen:.0%} of the held-out problems are training "
                         f"problems{verdict}")
    return notes


def write_latent_sweep(out: Path, task: str, latent: Path, rows: list[dict], settings: dict) -> list[dict]:
    """sweep/ from the comparison's latent rows (no cell answered twice), plus the traced latent dynamics of three
    problems of the hardest difficulty."""
    latent_rows = [r for r in rows if r["method"] in (LatentDepth.name, AdaptiveDepth.name)]
    difficulties = parse_int_list(settings["difficulties"], "--difficulties")
    depths = parse_int_list(settings["steps"], "--steps")
    hardest = sweep_problems(task, None, [max(difficulties)], 3, SEED)[max(difficulties)]
    traces = latent_dynamics(load_model(latent), load_tokenizer(latent), hardest, max(depths))
    meta = {"model": str(latent), "task": task, "seed": SEED, "depths": depths, "difficulties": difficulties,
            "n": settings["n"], "adaptive_max_steps": max(depths)}
    with claimed_output(out, option="--out") as output:
        write_sweep(output.path, latent, latent_rows, traces, meta)
    return latent_rows


def reproduce_command(results: dict) -> str:
    trains = results["quick"] or results["from_scratch"]
    return ("rlm demo" + " --quick" * results["quick"] + " --from-scratch" * results["from_scratch"]
            + (f" --seed {results['seed']}" if trains and results["seed"] else ""))


PLOTS = {"accuracy_vs_flops.png": "accuracy against FLOPs", "accuracy_vs_depth.png": "accuracy against depth",
         "accuracy_vs_budget.png": "accuracy against budget", "logit_lens.png": "logit lens"}


def write_report(out: Path, results: dict) -> Path:
    warning = ("**Quick mode: tiny budgets for a smoke test; these numbers say nothing about the methods.**\n\n"
               if results["quick"] else "")
    sections = [("What this is", warning + "Two studies, each a tiny recurrent-depth model and a tiny "
                 "chain-of-thought model with the same unique parameters, trained on difficulties "
                 f"1..{TRAINED_MAX_DIFFICULTY} of one task and evaluated on the same held-out problems (seed {SEED}), "
                 "harder ones included. FLOPs per problem: the prompt and every generated or inserted token at its "
                 "depth, exit checks included (recurrent_lm.flops). Intervals: 95% Wilson.")]
    for study in STUDIES:
        result = results["studies"][study.name]
        for name in PLOTS:  # the study's plots beside report.md, named after it
            source = out / study.name / ("sweep" if name == "logit_lens.png" else "compare") / name
            if source.exists():
                shutil.copy(source, out / f"{study.name}-{name}")
        plots = "\n\n".join(f"![{alt}]({study.name}-{name})" for name, alt in PLOTS.items()
                             if (out / f"{study.name}-{name}").exists())
        overlap = "".join(f"\n- {line}" for line in result["overlap"])
        sections += [
            (study.title, study.about + "\n\nFindings (computed from the measurements):\n"
             + "\n".join(f"- {line}" for line in result["findings"])
             + (f"\n\nTraining and test overlap:{overlap}" if overlap else "")),
            (f"{study.title}: plots", plots),
            (f"{study.title}: results", markdown_table(result["compare"], RESULT_COLUMNS)),
            (f"{study.title}: s1 metrics (budget forcing)",
             markdown_table(result["s1_metrics"], ["difficulty", "cot_steps", "control", "scaling", "performance"])),
        ]
        if "mixed" in result:
            mixed = result["mixed"]
            source = out / study.name / "mixed" / "sweep" / "accuracy_vs_flops.png"
            if source.exists():
                shutil.copy(source, out / f"{study.name}-mixed-accuracy_vs_flops.png")
            sections.append((f"{study.title}: adaptive depth on a mixed-difficulty set",
                             f"{mixed['problems']} problems of difficulties {mixed['settings']['difficulties']} in "
                             "one shuffled set, answered at batch 8 (`rlm sweep --mixed true`, "
                             f"{study.name}/mixed/sweep/summary.md); each position exits on its own and is charged "
                             "the steps it ran. Computed from the measurements:\n"
                             + "\n".join(f"- {line}" for line in mixed["findings"])
                             + f"\n\n![mixed set: accuracy against FLOPs]({study.name}-mixed-accuracy_vs_flops.png)"))
        if "search" in result:
            search = result["search"]
            source = out / study.name / "search" / "accuracy_vs_flops.png"
            if source.exists():
                shutil.copy(source, out / f"{study.name}-search-accuracy_vs_flops.png")
            sections += [
                (f"{study.title}: search with a process reward model",
                 "Weighted best-of-N, beam search, DVTS and REBASE with the reward model "
                 f"(`{result['models']['reward model']}`) over the CoT model's steps, beside majority vote, latent "
                 "depth and the oracle bound (any of the n samples right), on "
                 f"{search['settings']['n']} problems per difficulty. Findings (computed from the measurements):\n"
                 + "\n".join(f"- {line}" for line in search["findings"])
                 + f"\n\n![search: accuracy against FLOPs]({study.name}-search-accuracy_vs_flops.png)"),
                (f"{study.title}: the reward model's step labels",
                 "Agreement with the exact step checker, on worked solutions with one corrupted step (its training "
                 "distribution) and on chains sampled from the CoT model:\n\n"
                 + markdown_table(search["reward_model_accuracy"], ["difficulty", "chains", "steps", "accuracy",
                                                                    "majority_rate", "accuracy_on_good",
                                                                    "accuracy_on_bad"])),
                (f"{study.title}: search results", markdown_table(search["compare"], RESULT_COLUMNS + ["reward_flops"])),
                (f"{study.title}: compute-optimal method per FLOPs range",
                 markdown_table(search["compute_optimal"], ["difficulty", "flops_up_to", "best_method", "setting",
                                                            "accuracy"])),
            ]
    manifests = "\n".join(
        f"- {study} {role}: `{m['command']}` on {m['machine']}, "
        + (f"{m['wall_seconds']:.0f} s" if m.get("wall_seconds") else m.get("wall_note", "time not recorded"))
        + "; final metrics " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(m["final_metrics"].items())
                                         if k.startswith(("val/acc", "val/label_acc")))
        for study, result in results["studies"].items() for role, m in result["manifests"].items())
    sections += [("Models", manifests),
                 ("Reproduce", f"`{reproduce_command(results)}` ({results['wall_seconds']:.0f} s here). Details: "
                  + ", ".join(f"{s.name}/compare/summary.md, {s.name}/sweep/summary.md" for s in STUDIES) + ".")]
    return write_summary(out, "recurrent-lm demo: thinking deeper in latent space against thinking longer in tokens",
                         sections, name="report.md")
