"""Test-time depth sweeps: how much does thinking deeper in latent space buy, and at what compute?

For every (difficulty, depth) the model answers the same fixed problems (eval/latent.py's LatentDepth); the sweep
records accuracy with a 95% Wilson interval, FLOPs per problem (the one compute counter), generated tokens and
wall time. The same problems are then answered with adaptive exit (AdaptiveDepth: each criterion at several
thresholds), to place adaptive compute on the fixed-depth accuracy/FLOPs frontier, and a few problems are traced
step by step (latent dynamics).
"""

from collections import defaultdict
from pathlib import Path

import torch

from recurrent_lm.adaptive import CRITERIA
from recurrent_lm.data import prompt_ids
from recurrent_lm.depth import check_depths
from recurrent_lm.loading import load_model_and_tokenizer
from recurrent_lm.options import DEPTH, PROBLEMS, ranges
from recurrent_lm.outputs import claimed_output
from recurrent_lm.tasks import IntList, Problem, get_task, load_jsonl, parse_int_list

from .latent import AdaptiveDepth, LatentDepth, depth_frontier, frontier_lines, oracle_row
from .methods import keep_interrupted, run_methods
from .report import line_plot, markdown_table, panel_plot, select, write_results, write_summary


def check_thresholds(exit_thresholds: list[float] | None) -> None:
    """An empty list is neither the default grid (leave the option out) nor no adaptive exit (--exit_criteria [])."""
    if exit_thresholds is not None and not exit_thresholds:
        raise ValueError("--exit_thresholds []: give thresholds, leave the option out for the default grid, or skip "
                         "adaptive exit (sweep: --exit_criteria []; compare: --exit_criterion none)")


def sweep_problems(task: str | None, problems: Path | None, difficulties: IntList | None, n: int, seed: int,
                   mixed: bool = False, default: IntList = "1,2,4,8") -> dict[int | str, list[Problem]]:
    """Problems by difficulty: from a JSONL file, or generated from the task. `difficulties` as the option gives
    them; None: `default` for a task, every difficulty of a file ("" too). mixed: a file's problems as one set
    ("mixed"), in the file's order, the first n."""
    if difficulties is None:
        difficulties = "" if problems is not None else default
    difficulties = parse_int_list(difficulties, "--difficulties", allow_empty=problems is not None)
    if mixed:
        if problems is None:
            raise ValueError("--mixed true answers a problem file as one set: give --problems FILE")
        chosen = [p for p in load_jsonl(problems) if not difficulties or p.difficulty in difficulties][:n]
        if not chosen:
            raise ValueError(f"{problems} holds no problem of --difficulties {difficulties}")
        return {"mixed": chosen}
    if problems is not None:
        loaded = load_jsonl(problems)
        grouped = defaultdict(list)
        for p in loaded:
            if not difficulties or p.difficulty in difficulties:
                grouped[p.difficulty].append(p)
        result = {d: grouped[d][:n] for d in sorted(grouped)}
        if not result and loaded:
            raise ValueError(f"{problems} holds difficulties {sorted({p.difficulty for p in loaded})}, none of "
                             f"--difficulties {difficulties}")
    elif task is not None:
        result = {d: get_task(task).problems(d, n, seed=seed) for d in difficulties}
    else:
        raise ValueError("give a task (--task NAME) or a problem file (--problems FILE)")
    if not any(result.values()):
        raise ValueError("the problem set is empty")
    return result


@torch.no_grad()
def latent_dynamics(model, tokenizer, problems: list[Problem], steps: int) -> list[dict]:
    """Per problem, at every step: relative change of the last position's latent state, and the logit lens's
    probability of the gold answer's first token and whether it is the top prediction."""
    traces = []
    for problem in problems:
        ids = torch.tensor([prompt_ids(tokenizer, problem)])
        gold = tokenizer(problem.answer, add_special_tokens=False).input_ids[0]
        out = model(ids, num_steps=steps, init_scale=0.0, output_latent_states=True, output_step_logits=True)
        states = [s[0, -1].float() for s in out.latent_states]
        change = [float("nan")] + [float((b - a).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(states, states[1:])]
        probs = [logits[0, -1].float().softmax(-1) for logits in out.step_logits]
        traces.append({"question": problem.question, "answer": problem.answer, "difficulty": problem.difficulty,
                       "relative_change": change, "gold_probability": [float(p[gold]) for p in probs],
                       "gold_is_top": [bool(p.argmax() == gold) for p in probs]})
    return traces


@ranges(n=PROBLEMS, exit_thresholds="> 0", adaptive_max_steps=DEPTH, exit_prompt_steps=DEPTH, seed=">= 0",
        batch_size=">= 1", dynamics=">= 0")
def sweep(model: Path, task: str | None = None, difficulties: IntList | None = None, steps: IntList = "1,2,4,8,16,32,64",
          n: int = 200, out: Path = Path("sweep"), problems: Path | None = None, exit_criteria: list[str] | None = None,
          exit_thresholds: list[float] | None = None, adaptive_max_steps: int | None = None,
          exit_prompt_steps: int | None = None, seed: int = 1234, batch_size: int = 64, tokenizer: Path | None = None,
          dynamics: int = 3, mixed: bool = False, overwrite: bool = False) -> dict:
    """Evaluate a RecurrentLM on the same fixed problems at every test-time depth, and with adaptive exit.

    Args:
        model: a RecurrentLM directory (trained with `rlm train`, or converted with `rlm convert-huginn`).
        task: the task to generate problems from (see `rlm tasks list`).
        difficulties: difficulties to evaluate, e.g. "1,2,4,8" or "1-8" (default: 1,2,4,8 of a --task; every
            difficulty of a --problems file).
        steps: test-time depths (core steps per token), e.g. "1,2,4,8,16,32,64".
        n: problems per difficulty.
        out: output folder: results.json, results.csv, plots (PNG), summary.md.
        problems: a JSONL problem file (`rlm tasks export`) instead of generated problems.
        exit_criteria: adaptive-exit criteria to sweep (default: all of kl, entropy-diff, latent-diff, cosine,
            acceleration, argmax-stability, and gate if the model has an exit gate); an empty list skips adaptive
            exit.
        exit_thresholds: thresholds for every criterion (default: its default times 10, 1, 0.1, 0.01; for
            argmax-stability 2, 3, 5, 8 steps; recurrent_lm.adaptive.threshold_grid).
        adaptive_max_steps: most steps a token may take under adaptive exit (default: the largest depth).
        exit_prompt_steps: under adaptive exit, the prompt runs this fixed depth, with no exit (default: the prompt
            exits per position too).
        seed: problems are a pure function of (task, difficulty, seed).
        batch_size: problems answered per batch.
        tokenizer: tokenizer directory, if the model directory has none.
        dynamics: trace this many problems step by step (latent dynamics plot); 0 skips it.
        mixed: answer the --problems file as one set of mixed difficulties (batches mix them, as a user's would),
            rows labelled "mixed", instead of one set per difficulty.
        overwrite: replace an earlier run in `out`.
    """
    depths = check_depths(parse_int_list(steps, "--steps"))
    check_thresholds(exit_thresholds)
    unknown = sorted(set(exit_criteria or []) - set(CRITERIA))
    if unknown:
        raise ValueError(f"unknown exit criteria {unknown}; choose from {', '.join(CRITERIA)}")
    by_difficulty = sweep_problems(task, problems, difficulties, n, seed, mixed)
    with claimed_output(out, option="--out", overwrite=overwrite, inputs=[model, problems, tokenizer],
                        command="rlm sweep") as output:
        net, tok = load_model_and_tokenizer(model, tokenizer)
        criteria = list(exit_criteria) if exit_criteria is not None else [
            criterion for criterion in CRITERIA if criterion != "gate" or net.exit_gate is not None]
        max_steps = max(depths) if adaptive_max_steps is None else adaptive_max_steps
        methods = [LatentDepth(net, tok, depths, batch_size)]
        methods += [AdaptiveDepth(net, tok, criterion, exit_thresholds, max_steps, batch_size, exit_prompt_steps)
                    for criterion in criteria]
        meta = {"model": str(model), "task": task, "problems": str(problems) if problems else None, "seed": seed,
                "depths": depths, "difficulties": list(by_difficulty), "n": n, "adaptive_max_steps": max_steps}
        rows = run_methods(methods, by_difficulty, desc="sweep", output=output, meta=meta)
        if len(depths) > 1:  # the smallest right depth of each problem, among several
            rows += [oracle_row(select(rows, method="latent", difficulty=d)) for d in by_difficulty]
        try:
            traces = (latent_dynamics(net, tok, by_difficulty[max(by_difficulty)][:dynamics], max_steps)
                      if dynamics else [])
        except KeyboardInterrupt:  # every cell finished: keep them, without the traced dynamics
            cells = sum(len(method.budgets) for method in methods) * len(by_difficulty)
            keep_interrupted(output, rows, {**meta, "dynamics": "interrupted"}, cells, cells)
        frontiers = write_sweep(output.path, model, rows, traces, meta)
    return {"rows": rows, "out": str(out), "frontier": frontiers}


def write_sweep(out: Path, model: Path, rows: list[dict], traces: list[dict], meta: dict) -> list[dict]:
    """results.json/.csv, the plots and summary.md of latent rows (LatentDepth and AdaptiveDepth) and traces;
    returns what adaptive exit saves on each difficulty (depth_frontier)."""
    frontiers = [f for f in (depth_frontier(rows, d) for d in meta["difficulties"]) if f is not None]
    write_results(out, rows, {**meta, "dynamics": traces, "frontier": frontiers})
    plots = plot_sweep(out, rows, traces)
    write_sweep_summary(out, model, rows, plots, frontiers)
    return frontiers


def plot_sweep(out: Path, rows: list[dict], traces: list[dict]) -> list[str]:
    fixed = select(rows, method="latent")
    difficulties = sorted({r["difficulty"] for r in fixed})

    def curve(d, x):
        points = sorted((r["steps"], r) for r in fixed if r["difficulty"] == d)
        return [r[x] for _, r in points], [r["accuracy"] for _, r in points], [r for _, r in points]

    series, bands = {}, {}
    for d in difficulties:
        x, y, points = curve(d, "steps")
        series[f"difficulty {d}"] = (x, y)
        bands[f"difficulty {d}"] = ([r["ci_low"] for r in points], [r["ci_high"] for r in points])
    plots = [line_plot(out / "accuracy_vs_steps.png", series, "test-time depth (core steps per token)", "accuracy",
                       "Accuracy against latent depth", logx=True, bands=bands).name]
    panels = {}
    for d in difficulties:
        x, y, _ = curve(d, "flops_per_problem")
        panel = {"fixed depth": (x, y)}
        for criterion in sorted({r["criterion"] for r in select(rows, method="latent-exit")}):
            points = sorted((r["flops_per_problem"], r["accuracy"])
                            for r in select(rows, method="latent-exit", criterion=criterion, difficulty=d))
            panel[f"exit: {criterion}"] = ([p[0] for p in points], [p[1] for p in points])
        for oracle in select(rows, method="latent-oracle", difficulty=d):
            panel["oracle: smallest right depth"] = ([oracle["flops_per_problem"]], [oracle["accuracy"]])
        panels[f"difficulty {d}"] = panel
    plots.append(panel_plot(out / "accuracy_vs_flops.png", panels, "FLOPs per problem", "accuracy",
                            "Fixed depth and adaptive exit on one compute axis").name)
    if traces:
        change = {f"{t['question'][:18]}": (list(range(2, len(t["relative_change"]) + 1)), t["relative_change"][1:])
                  for t in traces}
        gold = {f"{t['question'][:18]}": (list(range(1, len(t["gold_probability"]) + 1)), t["gold_probability"])
                for t in traces}
        plots.append(line_plot(out / "latent_change.png", change, "core step", "||s_t - s_(t-1)|| / ||s_t||",
                               "Latent dynamics: relative change of the state", logx=True, ylim=None).name)
        plots.append(line_plot(out / "logit_lens.png", gold, "core step", "p(gold answer token)",
                               "Logit lens: the answer's probability after every step", logx=True).name)
    return plots


def write_sweep_summary(out: Path, model: Path, rows: list[dict], plots: list[str], frontiers: list[dict]) -> None:
    fixed, adaptive = select(rows, method="latent"), select(rows, method="latent-exit")
    difficulties = sorted({r["difficulty"] for r in fixed})
    columns = ["difficulty", "steps", "n", "accuracy", "ci_low", "ci_high", "flops_per_problem", "generated_tokens",
               "wall_seconds"]
    findings = []
    for d in difficulties:
        curve = select(fixed, difficulty=d)
        shallowest, best = min(curve, key=lambda r: r["steps"]), max(curve, key=lambda r: r["accuracy"])
        findings.append(f"- difficulty {d}: accuracy {shallowest['accuracy']:.2f} at the smallest depth, best "
                        f"{best['accuracy']:.2f} at {best['steps']} steps")
    problems = sum(r["n"] for r in fixed if r["steps"] == fixed[0]["steps"])
    sections = [("Setup", f"Model `{model}`; {problems} problems; greedy "
                 "decoding from a zero initial state. Accuracy intervals are 95% Wilson intervals; FLOPs count the "
                 "prompt's forward pass and every generated token at its depth (recurrent_lm.flops)."),
                ("Findings (measured)", "\n".join(findings)),
                ("What adaptive exit saves (measured)", "\n\n".join(
                    f"Difficulty {f['difficulty']}:\n" + "\n".join(frontier_lines(f)) for f in frontiers)),
                ("Fixed depth", markdown_table(fixed, columns))]
    if adaptive:
        sections.append(("Adaptive exit", markdown_table(
            adaptive, ["criterion", "threshold", "difficulty", "steps", "accuracy", "mean_steps_per_token",
                       "flops_per_problem"])))
    sections.append(("Plots", "\n\n".join(f"![{p}]({p})" for p in plots)))
    write_summary(out, "Test-time depth sweep", sections)
