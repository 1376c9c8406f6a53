"""Test-time depth sweeps: how much does thinking deeper in latent space buy, and at what compute?

For every (difficulty, depth) the model answers the same fixed problems; the sweep records accuracy with a 95%
Wilson interval, FLOPs per problem (the one compute counter), forward passes, generated tokens and wall time.
The same problems are then answered with adaptive exit (each criterion at several thresholds), to place adaptive
compute on the fixed-depth accuracy/FLOPs frontier, and a few problems are traced step by step (latent dynamics).
"""

import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recurrent_lm.adaptive import CRITERIA, DEFAULT_THRESHOLDS
from recurrent_lm.data import prompt_ids
from recurrent_lm.evaluation import Answer, answer_flops, answer_problems
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.tasks import Problem, get_task, load_jsonl, parse_int_list

from .report import accuracy_stats, line_plot, markdown_table, panel_plot, prepare_output, write_results, write_summary

THRESHOLD_SCALES = (10.0, 1.0, 0.1, 0.01)  # adaptive thresholds: the criterion's default times these
ARGMAX_STEPS = (2, 3, 5, 8)


def sweep_problems(task: str | None, problems: Path | None, difficulties: list[int], n: int, seed: int) -> dict[int, list[Problem]]:
    """Problems by difficulty: from a JSONL file, or generated from the task."""
    if problems is not None:
        loaded = load_jsonl(problems)
        grouped = defaultdict(list)
        for p in loaded:
            if not difficulties or p.difficulty in difficulties:
                grouped[p.difficulty].append(p)
        result = {d: grouped[d][:n] for d in sorted(grouped)}
    elif task is not None:
        result = {d: get_task(task).problems(d, n, seed=seed) for d in difficulties}
    else:
        raise ValueError("give a task (--task NAME) or a problem file (--problems FILE)")
    if not any(result.values()):
        raise ValueError("the problem set is empty")
    return result


def summarize(answers: list[Answer], config, max_steps: int, criterion: str | None, seconds: float) -> dict:
    n = len(answers)
    steps = [s for a in answers for s in (a.steps_per_token or [])]
    return {
        **accuracy_stats([a.score for a in answers]),
        "flops_per_problem": sum(answer_flops(config, a, max_steps, criterion) for a in answers) / n,
        "forward_passes": sum(a.new_tokens for a in answers) / n,  # one prefill + one per further token
        "generated_tokens": sum(a.new_tokens for a in answers) / n,
        "mean_steps_per_token": sum(steps) / len(steps) if steps else float("nan"),
        "wall_seconds": seconds,
    }


def thresholds_for(criterion: str, overrides: list[float] | None) -> list[float]:
    if overrides:
        return list(overrides)
    if criterion == "argmax-stability":
        return list(ARGMAX_STEPS)
    return [DEFAULT_THRESHOLDS[criterion] * scale for scale in THRESHOLD_SCALES]


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


def sweep(model: Path, task: str | None = None, difficulties: str = "1,2,4,8", steps: str = "1,2,4,8,16,32,64",
          n: int = 200, out: Path = Path("sweep"), problems: Path | None = None, exit_criteria: list[str] | None = None,
          exit_thresholds: list[float] | None = None, adaptive_max_steps: int | None = None, seed: int = 1234,
          batch_size: int = 64, tokenizer: Path | None = None, dynamics: int = 3, overwrite: bool = False) -> dict:
    """Evaluate a RecurrentLM on the same fixed problems at every test-time depth, and with adaptive exit.

    Args:
        model: a RecurrentLM directory (trained with `rlm train`, or converted with `rlm convert-huginn`).
        task: the task to generate problems from (see `rlm tasks list`).
        difficulties: difficulties to evaluate, e.g. "1,2,4,8" or "1-8".
        steps: test-time depths (core steps per token), e.g. "1,2,4,8,16,32,64".
        n: problems per difficulty.
        out: output folder: results.json, results.csv, plots (PNG), summary.md.
        problems: a JSONL problem file (`rlm tasks export`) instead of generated problems.
        exit_criteria: adaptive-exit criteria to sweep (default: all of kl, entropy-diff, latent-diff, cosine,
            argmax-stability); an empty list skips adaptive exit.
        exit_thresholds: thresholds for every criterion (default: its default times 10, 1, 0.1, 0.01; for
            argmax-stability 2, 3, 5, 8 steps).
        adaptive_max_steps: most steps a token may take under adaptive exit (default: the largest depth).
        seed: problems are a pure function of (task, difficulty, seed).
        batch_size: problems answered per batch.
        tokenizer: tokenizer directory, if the model directory has none.
        dynamics: trace this many problems step by step (latent dynamics plot); 0 skips it.
        overwrite: replace an earlier run in `out`.
    """
    depths = parse_int_list(steps, "--steps")
    if not depths or min(depths) < 1:
        raise ValueError(f"steps must all be >= 1, got {steps!r}")
    criteria = list(CRITERIA) if exit_criteria is None else list(exit_criteria)
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        raise ValueError(f"unknown exit criteria {unknown}; choose from {', '.join(CRITERIA)}")
    by_difficulty = sweep_problems(task, problems, parse_int_list(difficulties, "--difficulties"), n, seed)
    net, tok = load_model(model), load_tokenizer(tokenizer or model)
    out = prepare_output(out, overwrite)
    max_steps = adaptive_max_steps or max(depths)

    cells = [("fixed", None, None, d, r) for d in by_difficulty for r in depths]
    cells += [("adaptive", c, t, d, max_steps) for c in criteria for t in thresholds_for(c, exit_thresholds)
              for d in by_difficulty]
    rows, histograms = [], {}
    for mode, criterion, threshold, difficulty, depth in tqdm(cells, desc="sweep", unit="cell"):
        settings = dict(num_steps=depth, init_scale=0.0)
        if criterion:
            settings.update(exit_criterion=criterion, exit_threshold=threshold)
        start = time.perf_counter()
        answers = answer_problems(net, tok, by_difficulty[difficulty], batch_size=batch_size, **settings)
        row = {"mode": mode, "criterion": criterion or "", "threshold": threshold, "difficulty": difficulty,
               "steps": depth, **summarize(answers, net.config, depth, criterion, time.perf_counter() - start)}
        if criterion:
            counts = Counter(s for a in answers for s in a.steps_per_token or [])
            row["steps_histogram"] = {int(k): v for k, v in sorted(counts.items())}
        rows.append(row)

    traces = []
    if dynamics:
        first = by_difficulty[max(by_difficulty)][:dynamics]
        traces = latent_dynamics(net, tok, first, max_steps)
    meta = {"model": str(model), "task": task, "problems": str(problems) if problems else None, "seed": seed,
            "depths": depths, "difficulties": list(by_difficulty), "n": n, "adaptive_max_steps": max_steps,
            "dynamics": traces}
    write_results(out, rows, meta)
    plots = plot_sweep(out, rows, traces)
    write_sweep_summary(out, model, rows, plots, by_difficulty)
    return {"rows": rows, "out": str(out)}


def plot_sweep(out: Path, rows: list[dict], traces: list[dict]) -> list[str]:
    fixed = [r for r in rows if r["mode"] == "fixed"]
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
        for criterion in sorted({r["criterion"] for r in rows if r["mode"] == "adaptive"}):
            points = sorted((r["flops_per_problem"], r["accuracy"]) for r in rows
                            if r["criterion"] == criterion and r["difficulty"] == d)
            panel[f"exit: {criterion}"] = ([p[0] for p in points], [p[1] for p in points])
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


def write_sweep_summary(out: Path, model: Path, rows: list[dict], plots: list[str], by_difficulty) -> None:
    fixed = [r for r in rows if r["mode"] == "fixed"]
    adaptive = [r for r in rows if r["mode"] == "adaptive"]
    columns = ["difficulty", "steps", "n", "accuracy", "ci_low", "ci_high", "flops_per_problem", "forward_passes",
               "wall_seconds"]
    best = {d: max((r for r in fixed if r["difficulty"] == d), key=lambda r: r["accuracy"]) for d in by_difficulty}
    findings = "\n".join(
        f"- difficulty {d}: accuracy {min((r for r in fixed if r['difficulty'] == d), key=lambda r: r['steps'])['accuracy']:.2f} "
        f"at the smallest depth, best {b['accuracy']:.2f} at {b['steps']} steps" for d, b in best.items())
    sections = [("Setup", f"Model `{model}`; {sum(len(v) for v in by_difficulty.values())} problems; greedy "
                 "decoding from a zero initial state. Accuracy intervals are 95% Wilson intervals; FLOPs count the "
                 "prompt's forward pass and every generated token at its depth (recurrent_lm.flops)."),
                ("Findings (measured)", findings),
                ("Fixed depth", markdown_table(fixed, columns))]
    if adaptive:
        sections.append(("Adaptive exit", markdown_table(
            adaptive, ["criterion", "threshold", "difficulty", "steps", "accuracy", "mean_steps_per_token",
                       "flops_per_problem"])))
    sections.append(("Plots", "\n\n".join(f"![{p}]({p})" for p in plots)))
    write_summary(out, "Test-time depth sweep", sections)
