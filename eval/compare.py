"""Latent depth against chain-of-thought tokens, on the same problems, on one compute axis (FLOPs per problem).

Methods, each evaluated on the same fixed problems per difficulty:
- latent:        the recurrent model answering directly at test-time depth r, and with adaptive exit;
- cot-budget:    the chain-of-thought model with s1 budget forcing at thinking budgets B (at each of its depths,
                 when it is itself a recurrent model: the depth x budget grid);
- cot-vote:      majority vote over the first n of N sampled chains of thought;
- cot-best-of-n: the sample the CoT model itself scores highest (mean log-probability of its answer).
FLOPs come from the one compute counter: the prompt, every generated or inserted token at its depth, and the
best-of-n scorer's extra forward pass.
"""

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from recurrent_lm import RecurrentConfig
from recurrent_lm.data import prompt_ids
from recurrent_lm.evaluation import answer_flops, answer_problems
from recurrent_lm.flops import causal_lm_generation_flops
from recurrent_lm.loading import load_model, load_tokenizer, model_type
from recurrent_lm.tasks import Problem, get_task, parse_int_list
from recurrent_lm.tokenization import THINK_END, THINK_START

from .budget_forcing import budget_forced_generate, majority_vote, model_logprob_scorer, s1_metrics
from .report import accuracy_stats, line_plot, markdown_table, panel_plot, prepare_output, write_results, write_summary
from .sweep import sweep_problems


def check_tokenizer(tokenizer, problem: Problem, cot: bool, which: str) -> None:
    """The model's tokenizer must represent the task's text exactly (and, for CoT, have the delimiters)."""
    task = get_task(problem.task)
    text = task.render(problem, cot)
    try:
        ids = tokenizer(text, add_special_tokens=False).input_ids
    except ValueError as error:
        raise ValueError(f"the {which} model's tokenizer is incompatible with task {task.name!r}: {error}") from error
    if tokenizer.decode(ids) != text:
        raise ValueError(f"the {which} model's tokenizer does not round-trip task {task.name!r} text: "
                         f"{text!r} -> {tokenizer.decode(ids)!r}")
    if cot:
        for delimiter in (THINK_START, THINK_END):
            if len(tokenizer(delimiter, add_special_tokens=False).input_ids) != 1:
                raise ValueError(f"the {which} model's tokenizer lacks the thinking delimiter {delimiter!r} as a token")


def load_any_causal_lm(path: Path):
    """A RecurrentLM, or any transformers causal LM directory (the CoT baseline may be an ordinary transformer)."""
    if model_type(path) == "recurrent_lm":
        return load_model(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def row(method: str, setting: str, difficulty: int, scores: list[float], flops: list[float], tokens: list[float],
        seconds: float, **extra) -> dict:
    n = len(scores)
    return {"method": method, "setting": setting, "difficulty": difficulty, **accuracy_stats(scores),
            "flops_per_problem": sum(flops) / n, "generated_tokens": sum(tokens) / n, "wall_seconds": seconds, **extra}


def cot_runs(model, tokenizer, problems: list[Problem], budget: int, depth: int | None, samples: int = 1,
             temperature: float = 0.0, batch_size: int = 32):
    """Budget-forced chains of thought; samples > 1 draws that many per problem. Returns per problem a list of
    (answer, BudgetResult, flops)."""
    depth_kwargs = {"num_steps": depth, "init_scale": 0.0} if depth is not None else {}
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if samples > 1 else dict(do_sample=False)
    per_problem = [[] for _ in problems]
    jobs = [(p, i) for i in range(len(problems)) for p in [problems[i]] * samples]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [get_task(p.task).prompt(p, cot=True) for p, _ in chunk]
        results = budget_forced_generate(model, tokenizer, prompts, max_thinking=budget,
                                         max_answer_tokens=len(chunk[0][0].answer) + 3, **sampling, **depth_kwargs)
        for (problem, index), result in zip(chunk, results):
            task = get_task(problem.task)
            answer = task.parse_answer(result.answer_text.replace(tokenizer.pad_token or "\0", ""))
            flops = causal_lm_generation_flops(model, result.prompt_tokens, result.new_tokens, depth)
            per_problem[index].append((answer, result, flops))
    return per_problem


def compare(latent: Path, cot: Path, task: str | None = None, difficulties: str = "1,2,4", n: int = 100,
            out: Path = Path("compare"), problems: Path | None = None, steps: str = "1,2,4,8,16,32",
            exit_criterion: str | None = "kl", exit_thresholds: list[float] | None = None,
            budgets: str = "0,8,16,32,64,128", votes: str = "1,2,4,8", vote_budget: int | None = None,
            temperature: float = 0.7, cot_steps: str | None = None, seed: int = 1234, batch_size: int = 32,
            latent_tokenizer: Path | None = None, cot_tokenizer: Path | None = None, overwrite: bool = False) -> dict:
    """Compare thinking deeper in latent space with thinking longer in tokens, on the same problems and one
    FLOPs axis.

    Args:
        latent: the recurrent-depth model directory (answers directly).
        cot: the chain-of-thought model directory (any transformers causal LM; a RecurrentLM too).
        task: the task to generate problems from.
        difficulties: difficulties, e.g. "1,2,4,8" or "1-8".
        n: problems per difficulty.
        out: output folder: results.json, results.csv, accuracy_vs_flops.png, accuracy_vs_depth.png,
            accuracy_vs_budget.png, summary.md.
        problems: a JSONL problem file instead of generated problems.
        steps: latent depths to evaluate.
        exit_criterion: the latent model's adaptive exit criterion (none: skip adaptive exit).
        exit_thresholds: its thresholds (default: the criterion's default times 10, 1, 0.1).
        budgets: thinking budgets (max thinking tokens) for budget forcing.
        votes: numbers of samples n for majority vote and best-of-n ("" skips parallel sampling).
        vote_budget: thinking budget of each sampled chain (default: the largest budget).
        temperature: sampling temperature of the chains for voting.
        cot_steps: depths of the CoT model, if it is a recurrent model: several give the depth x budget grid
            (default: its mean_recurrence).
        seed: problems and samples are a pure function of the seed.
        batch_size: problems (or samples) per batch.
        latent_tokenizer: tokenizer directory of the latent model, if its directory has none.
        cot_tokenizer: tokenizer directory of the CoT model, if its directory has none.
        overwrite: replace an earlier run in `out`.
    """
    from recurrent_lm.adaptive import DEFAULT_THRESHOLDS

    budget_list, depth_list = parse_int_list(budgets, "--budgets"), parse_int_list(steps, "--steps")
    vote_list = parse_int_list(votes, "--votes")
    if any(b < 0 for b in budget_list) or (vote_budget is not None and vote_budget < 0):
        raise ValueError(f"thinking budgets must be >= 0, got {budgets!r}")
    if not depth_list or min(depth_list) < 1 or any(v < 1 for v in vote_list):
        raise ValueError("latent steps and vote counts must be >= 1")
    by_difficulty = sweep_problems(task, problems, parse_int_list(difficulties, "--difficulties"), n, seed)
    latent_model, latent_tok = load_model(latent), load_tokenizer(latent_tokenizer or latent)
    cot_model, cot_tok = load_any_causal_lm(cot), load_tokenizer(cot_tokenizer or cot)
    sample = next(iter(by_difficulty.values()))[0]
    check_tokenizer(latent_tok, sample, cot=False, which="latent")
    check_tokenizer(cot_tok, sample, cot=True, which="CoT")
    out = prepare_output(out, overwrite)
    recurrent_cot = isinstance(cot_model.config, RecurrentConfig)
    cot_depths = (parse_int_list(cot_steps, "--cot_steps") if cot_steps
                  else [cot_model.config.mean_recurrence] if recurrent_cot else [None])
    thresholds = exit_thresholds or ([DEFAULT_THRESHOLDS[exit_criterion] * s for s in (10, 1, 0.1)] if exit_criterion else [])
    torch.manual_seed(seed)

    jobs = [("latent", r, None, d) for d in by_difficulty for r in depth_list]
    jobs += [("latent-exit", max(depth_list), t, d) for d in by_difficulty for t in thresholds]
    jobs += [("cot-budget", r, b, d) for d in by_difficulty for r in cot_depths for b in budget_list]
    jobs += [("cot-samples", cot_depths[-1], vote_budget if vote_budget is not None else max(budget_list), d)
             for d in by_difficulty if vote_list]
    rows, thinking_lengths = [], {}
    for method, depth, knob, difficulty in tqdm(jobs, desc="compare", unit="cell"):
        items = by_difficulty[difficulty]
        start = time.perf_counter()
        if method.startswith("latent"):
            settings = dict(num_steps=depth, init_scale=0.0)
            if method == "latent-exit":
                settings.update(exit_criterion=exit_criterion, exit_threshold=knob)
            answers = answer_problems(latent_model, latent_tok, items, batch_size=batch_size, **settings)
            flops = [answer_flops(latent_model.config, a, depth, settings.get("exit_criterion")) for a in answers]
            setting = f"r={depth}" if method == "latent" else f"{exit_criterion}<{knob:g} (max {depth})"
            steps_used = [s for a in answers for s in a.steps_per_token or []]
            rows.append(row(method, setting, difficulty, [a.score for a in answers], flops,
                            [a.new_tokens for a in answers], time.perf_counter() - start, steps=depth,
                            mean_steps_per_token=sum(steps_used) / max(len(steps_used), 1)))
        elif method == "cot-budget":
            runs = cot_runs(cot_model, cot_tok, items, knob, depth, batch_size=batch_size)
            results = [r[0] for r in runs]
            scores = [get_task(p.task).score(a, p) for p, (a, _, _) in zip(items, results)]
            lengths = [len(res.thinking_ids) for _, res, _ in results]
            thinking_lengths[(difficulty, depth, knob)] = lengths
            rows.append(row(method, f"B={knob}" + (f", r={depth}" if depth else ""), difficulty, scores,
                            [f for _, _, f in results], [res.new_tokens for _, res, _ in results],
                            time.perf_counter() - start, budget=knob, steps=depth,
                            mean_thinking_tokens=sum(lengths) / len(lengths),
                            control=sum(length <= knob for length in lengths) / len(lengths)))
        else:  # N samples per problem, then majority vote and best-of-n over the first n
            runs = cot_runs(cot_model, cot_tok, items, knob, depth, samples=max(vote_list), temperature=temperature,
                            batch_size=batch_size)
            scorer = model_logprob_scorer(cot_model, **({"num_steps": depth, "init_scale": 0.0} if depth else {}))
            seconds = time.perf_counter() - start
            for count in vote_list:
                vote_scores, best_scores, vote_flops, best_flops, tokens = [], [], [], [], []
                for problem, samples in zip(items, runs):
                    first = samples[:count]
                    task_ = get_task(problem.task)
                    vote_scores.append(task_.score(majority_vote([a for a, _, _ in first]), problem))
                    scored = []
                    for a, res, f in first:
                        context = _context_ids(cot_tok, problem, res)
                        scored.append((scorer(context, res.answer_ids), a, len(context) + len(res.answer_ids)))
                    best = max(scored, key=lambda s: s[0])[1]
                    best_scores.append(task_.score(best, problem))
                    sample_flops = sum(f for _, _, f in first)
                    vote_flops.append(sample_flops)
                    best_flops.append(sample_flops + sum(causal_lm_generation_flops(cot_model, length, 1, depth)
                                                         for _, _, length in scored))
                    tokens.append(sum(res.new_tokens for _, res, _ in first))
                extra = dict(samples=count, budget=knob, steps=depth, temperature=temperature)
                rows.append(row("cot-vote", f"n={count}, B={knob}", difficulty, vote_scores, vote_flops, tokens, seconds, **extra))
                rows.append(row("cot-best-of-n", f"n={count}, B={knob}", difficulty, best_scores, best_flops, tokens,
                                seconds, **extra))

    metrics = []
    for difficulty in by_difficulty:
        for depth in cot_depths:
            budget_rows = {r["budget"]: r for r in rows if r["method"] == "cot-budget" and r["difficulty"] == difficulty
                           and r["steps"] == depth}
            s1 = s1_metrics({b: r["accuracy"] for b, r in budget_rows.items()},
                            {b: thinking_lengths[(difficulty, depth, b)] for b in budget_rows})
            metrics.append({"difficulty": difficulty, "cot_steps": depth, **s1})
    meta = {"latent": str(latent), "cot": str(cot), "task": task, "seed": seed, "difficulties": list(by_difficulty),
            "n": n, "s1_metrics": metrics}
    write_results(out, rows, meta)
    write_results(out, metrics, {}, name="s1_metrics")
    plots = plot_comparison(out, rows)
    write_compare_summary(out, latent, cot, rows, metrics, plots)
    return {"rows": rows, "s1_metrics": metrics, "out": str(out)}


def _context_ids(tokenizer, problem: Problem, result) -> list[int]:
    """Prompt + thinking + end delimiter: what the answer of a budget-forced run was generated from."""
    end = tokenizer(THINK_END, add_special_tokens=False).input_ids
    return prompt_ids(tokenizer, problem, cot=True) + result.thinking_ids + end


def plot_comparison(out: Path, rows: list[dict]) -> list[str]:
    difficulties = sorted({r["difficulty"] for r in rows})
    panels = {}
    for d in difficulties:
        series = {}
        for r in sorted((r for r in rows if r["difficulty"] == d), key=lambda r: r["flops_per_problem"]):
            label = r["method"] + (f" (r={r['steps']})" if r["method"] == "cot-budget" and r.get("steps") else "")
            series.setdefault(label, ([], []))
            series[label][0].append(r["flops_per_problem"])
            series[label][1].append(r["accuracy"])
        panels[f"difficulty {d}"] = series
    plots = [panel_plot(out / "accuracy_vs_flops.png", panels, "FLOPs per problem (log)", "accuracy",
                        "Latent depth vs chain of thought on one compute axis").name]
    latent = {f"difficulty {d}": ([r["steps"] for r in rows if r["method"] == "latent" and r["difficulty"] == d],
                                  [r["accuracy"] for r in rows if r["method"] == "latent" and r["difficulty"] == d])
              for d in difficulties}
    plots.append(line_plot(out / "accuracy_vs_depth.png", latent, "latent depth (core steps)", "accuracy",
                           "Latent model: accuracy against test-time depth", logx=True).name)
    budget = {f"difficulty {d}": ([max(r["budget"], 0.5) for r in rows if r["method"] == "cot-budget" and r["difficulty"] == d],
                                  [r["accuracy"] for r in rows if r["method"] == "cot-budget" and r["difficulty"] == d])
              for d in difficulties}
    plots.append(line_plot(out / "accuracy_vs_budget.png", budget, "thinking budget (tokens; 0 shown at 0.5)", "accuracy",
                           "CoT model: accuracy against thinking budget (budget forcing)", logx=True).name)
    return plots


def write_compare_summary(out: Path, latent: Path, cot: Path, rows: list[dict], metrics: list[dict], plots: list[str]) -> None:
    columns = ["method", "setting", "difficulty", "n", "accuracy", "ci_low", "ci_high", "flops_per_problem",
               "generated_tokens"]
    best = []
    for d in sorted({r["difficulty"] for r in rows}):
        for method in ("latent", "cot-budget"):
            candidates = [r for r in rows if r["difficulty"] == d and r["method"] == method]
            if candidates:
                top = max(candidates, key=lambda r: (r["accuracy"], -r["flops_per_problem"]))
                best.append(f"- difficulty {d}, {method}: best accuracy {top['accuracy']:.2f} ({top['setting']}) at "
                            f"{top['flops_per_problem']:.3g} FLOPs per problem")
    write_summary(out, "Latent depth against chain of thought", [
        ("Setup", f"Latent model `{latent}`, CoT model `{cot}`, the same problems for every method. FLOPs per "
                  "problem: prompt plus every generated or inserted token at its depth (recurrent_lm.flops)."),
        ("Findings (measured)", "\n".join(best)),
        ("Results", markdown_table(rows, columns)),
        ("s1 metrics of budget forcing", markdown_table(metrics, ["difficulty", "cot_steps", "control", "scaling", "performance"])),
        ("Plots", "\n\n".join(f"![{p}]({p})" for p in plots)),
    ])
