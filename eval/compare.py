"""Latent depth against chain-of-thought tokens, on the same problems, on one compute axis (FLOPs per problem).

Methods (recurrent_lm.eval.methods), each evaluated on the same fixed problems per difficulty:
- latent / latent-exit: the recurrent model answering directly at test-time depth r, and with adaptive exit
                        (eval/latent.py);
- cot-budget:           the chain-of-thought model with s1 budget forcing at thinking budgets B (at each of its
                        depths, when it is itself a recurrent model: the depth x budget grid) (eval/cot.py);
- cot-vote:             majority vote over the first n of N sampled chains of thought;
- cot-best-of-n:        the sample the CoT model itself scores highest (mean log-probability of its answer);
- prm-best-of-n / prm-weighted-best-of-n: the same samples chosen by a reward model (eval/reward_models.py);
- beam / dvts / rebase: step-level search with the reward model (eval/search.py), at each of the CoT model's depths
                        when it is recurrent (the depth x N grid);
- oracle-best-of-n:     right when any of the n samples is: the task's checker as verifier, an upper bound shown
                        apart, never a method.
- cot-rejection:        s1's rejection sampling to a length budget (chains drawn until one fits it);
- cot-token-conditional: s1's token-conditional control: the prompt asks for at most B thinking tokens, for a CoT
                        model trained with its thinking length stated (--token_conditional_cot);
`--methods` picks any subset (latent, budget, rejection, token-conditional, majority, best-of-n, weighted-best-of-n,
beam, dvts, rebase, oracle).
FLOPs come from the one compute counter: the prompt, every generated or inserted token at its depth (pruned search
branches too), the best-of-n scorer's extra forward pass and every reward-model pass (also apart, reward_flops). The findings (what rose with depth or budget, and which method reaches 90%
of the best accuracy with the fewest FLOPs) are computed from the rows and written into summary.md.
"""

import math
from pathlib import Path
from typing import Literal

import torch
from recurrent_lm import RecurrentConfig
from recurrent_lm.data import round_trip, single_token
from recurrent_lm.depth import check_depths
from recurrent_lm.loading import (load_any_causal_lm, load_model, load_tokenizer, model_type,
                                  require_fitting_tokenizer)
from recurrent_lm.options import DEPTH, PROBLEMS, ranges
from recurrent_lm.outputs import claimed_output
from recurrent_lm.special_tokens import THINK_END, THINK_START
from recurrent_lm.tasks import IntList, Problem, get_task, parse_int_list

from .cot import BudgetForcing, ChainPool, ParallelSampling, RejectionSampling, TokenConditional
from .latent import AdaptiveDepth, LatentDepth, depth_frontier, frontier_lines, oracle_row
from .methods import run_methods
from .reward_models import AGGREGATIONS, load_reward_model
from .search import STRATEGIES
from .report import RESULT_COLUMNS, line_plot, markdown_table, panel_plot, select, write_results, write_summary
from .sweep import check_thresholds, sweep_problems


def check_tokenizer(tokenizer, problem: Problem, cot: bool, which: str, thinking_budget: int | None = None) -> None:
    """The model's tokenizer must represent the task's text exactly (and, for CoT, have the delimiters; with a
    thinking budget, the prompt that states it)."""
    task = get_task(problem.task)
    text = task.prompt(problem, cot, thinking_budget) + task.completion(problem, cot)
    what = f"the {which} model's tokenizer (task {task.name!r})"
    round_trip(tokenizer, text, what)
    if cot:
        for delimiter in (THINK_START, THINK_END):
            single_token(tokenizer, delimiter, f"thinking delimiter of {what}")


METHODS = ("latent", "budget", "rejection", "token-conditional", "majority", "best-of-n", "weighted-best-of-n", "beam",
           "dvts", "rebase", "oracle")
NEEDS_REWARD_MODEL = ("weighted-best-of-n", "beam", "dvts", "rebase")


def parse_methods(text: str, reward_model: Path | None) -> list[str]:
    methods = [m for m in (part.strip() for part in text.split(",")) if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or text!r}; choose from {', '.join(METHODS)}")
    needing = [m for m in methods if m in NEEDS_REWARD_MODEL]
    if needing and reward_model is None:
        raise ValueError(f"--methods {','.join(needing)} need a reward model: pass --reward_model DIR")
    return methods


@ranges(n=PROBLEMS, exit_thresholds="> 0", exit_prompt_steps=DEPTH, vote_budget=">= 0", temperature="> 0", seed=">= 0",
        batch_size=">= 1", trained_max_difficulty=">= 1", beam_width=">= 1", rebase_temperature="> 0",
        search_max_steps=">= 1", rejection_tries=">= 1")
def compare(latent: Path, cot: Path, task: str | None = None, difficulties: IntList | None = None, n: int = 100,
            out: Path = Path("compare"), problems: Path | None = None, steps: IntList = "1,2,4,8,16,32",
            exit_criterion: Literal["kl", "entropy-diff", "latent-diff", "cosine", "argmax-stability", "gate", "none"]
            | None = "kl",
            exit_thresholds: list[float] | None = None, exit_prompt_steps: int | None = None,
            budgets: IntList = "0,8,16,32,64,128", votes: IntList = "1,2,4,8",
            vote_budget: int | None = None, temperature: float = 0.7, cot_steps: IntList | None = None, seed: int = 1234,
            batch_size: int = 32, trained_max_difficulty: int | None = None, latent_tokenizer: Path | None = None,
            cot_tokenizer: Path | None = None, methods: str = "latent,budget,majority,best-of-n",
            reward_model: Path | None = None,
            reward_convention: Literal["auto", "step-tag", "token-classification", "sequence-classification"] = "auto",
            step_tag: str | None = None, aggregation: Literal["last", "min", "prod"] = "last", beam_width: int = 2,
            rebase_temperature: float = 0.1, search_max_steps: int = 32, rejection_tries: int = 8,
            token_conditional_cot: Path | None = None, mixed: bool = False, overwrite: bool = False) -> dict:
    """Compare thinking deeper in latent space with thinking longer in tokens, on the same problems and one
    FLOPs axis.

    Args:
        latent: the recurrent-depth model directory (answers directly).
        cot: the chain-of-thought model directory (any transformers causal LM; a RecurrentLM too).
        task: the task to generate problems from.
        difficulties: difficulties, e.g. "1,2,4,8" or "1-8" (default: 1,2,4 of a --task; every difficulty of a
            --problems file).
        n: problems per difficulty.
        out: output folder: results.json, results.csv, accuracy_vs_flops.png, accuracy_vs_depth.png,
            accuracy_vs_budget.png, summary.md.
        problems: a JSONL problem file instead of generated problems.
        mixed: answer the --problems file as one set of mixed difficulties (batches mix them), rows labelled
            "mixed", instead of one set per difficulty.
        steps: latent depths to evaluate.
        exit_criterion: the latent model's adaptive exit criterion (none: skip adaptive exit).
        exit_thresholds: its thresholds (default: the criterion's default times 10, 1, 0.1, 0.01; for
            argmax-stability 2, 3, 5, 8 steps).
        exit_prompt_steps: under adaptive exit, the prompt runs this fixed depth, with no exit (default: the
            prompt exits per position too).
        budgets: thinking budgets (max thinking tokens) for budget forcing.
        votes: the sample or leaf counts N of majority vote, best-of-n and every search ("" skips them); beam
            search and DVTS run at the counts that beam_width divides.
        vote_budget: thinking budget of each sampled chain and of every search chain (default: the largest budget).
        temperature: sampling temperature of the chains for voting and of every search step.
        cot_steps: depths of the CoT model, if it is a recurrent model: several give the depth x budget grid
            (and the depth x N grid of search; default: its mean_recurrence).
        seed: problems and samples are a pure function of the seed.
        batch_size: problems (or samples) per batch.
        trained_max_difficulty: the hardest difficulty the models were trained on, if known: the findings then
            say which difficulties are harder than any trained.
        latent_tokenizer: tokenizer directory of the latent model, if its directory has none.
        cot_tokenizer: tokenizer directory of the CoT model, if its directory has none.
        methods: the methods to run, comma-separated, from: latent (with adaptive exit unless exit_criterion is
            none), budget, rejection, token-conditional, majority, best-of-n, weighted-best-of-n, beam, dvts,
            rebase, oracle.
        reward_model: a reward model directory (this project's PRM, or a Hugging Face PRM / ORM): needed by
            weighted-best-of-n, beam, dvts and rebase.
        reward_convention: how the reward model is read (auto: from its architecture; see eval/reward_models.py).
        step_tag: the reward model's step tag or step separator token (default "#", this project's).
        aggregation: a solution's score from its step scores: the last step's, the lowest, or their product.
        beam_width: M, the expansions per kept node of beam search and the subtree width of DVTS.
        rebase_temperature: T of REBASE's softmax(score / T) split of the expansions.
        search_max_steps: the most steps a search chain takes before it must answer.
        rejection_tries: rejection sampling (s1's control by rejection) draws at most this many chains per problem
            until one fits each budget: the same sampled chains as voting (at `temperature`, thinking up to
            vote_budget).
        token_conditional_cot: the CoT model that token-conditional control asks for a length (one trained with
            data.state_thinking_length, e.g. `rlm train --config demo-cot-stated`; default: --cot); it thinks up to
            twice the largest budget, nothing enforcing the one asked for.
        overwrite: replace an earlier run in `out`.
    """
    chosen = parse_methods(methods, reward_model)
    budget_list = parse_int_list(budgets, "--budgets")
    depth_list = check_depths(parse_int_list(steps, "--steps"), "--steps")
    vote_list = parse_int_list(votes, "--votes", allow_empty=True)  # "" skips voting and search
    check_thresholds(exit_thresholds)
    if token_conditional_cot is not None:
        model_type(token_conditional_cot)  # given: it must be a model directory, whatever --methods runs
    if any(b < 0 for b in budget_list) or (vote_budget is not None and vote_budget < 0):
        raise ValueError(f"thinking budgets must be >= 0, got {budgets!r}")
    if any(v < 1 for v in vote_list):
        raise ValueError(f"vote counts must be >= 1, got {votes!r}")
    by_difficulty = sweep_problems(task, problems, difficulties, n, seed, mixed, default="1,2,4")
    inputs = [latent, cot, problems, latent_tokenizer, cot_tokenizer, reward_model, token_conditional_cot]
    with claimed_output(out, option="--out", overwrite=overwrite, inputs=inputs, command="rlm compare") as output:
        latent_model, latent_tok = load_model(latent), load_tokenizer(latent_tokenizer or latent)
        cot_model, cot_tok = load_any_causal_lm(cot), load_tokenizer(cot_tokenizer or cot)
        require_fitting_tokenizer(latent_tok, latent_model.config, latent_tokenizer or latent)
        require_fitting_tokenizer(cot_tok, cot_model.config, cot_tokenizer or cot)
        sample = next(iter(by_difficulty.values()))[0]
        check_tokenizer(latent_tok, sample, cot=False, which="latent")
        check_tokenizer(cot_tok, sample, cot=True, which="CoT")
        recurrent_cot = isinstance(cot_model.config, RecurrentConfig)
        cot_depths = (check_depths(parse_int_list(cot_steps, "--cot_steps"), "--cot_steps") if cot_steps
                      else [cot_model.config.mean_recurrence] if recurrent_cot else [None])

        if aggregation not in AGGREGATIONS:
            raise ValueError(f"--aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        scorer = None
        if reward_model is not None:
            scorer = load_reward_model(reward_model, reward_convention, step_tag, batch_size=batch_size)
            task_of = get_task(sample.task)
            scorer.check_text(task_of.prompt(sample, cot=True) + task_of.completion(sample, cot=True), "CoT model")
        search_budget = vote_budget if vote_budget is not None else max(budget_list)
        runs = []
        if "latent" in chosen:
            runs.append(LatentDepth(latent_model, latent_tok, depth_list, batch_size))
            if exit_criterion not in (None, "none"):
                runs.append(AdaptiveDepth(latent_model, latent_tok, exit_criterion, exit_thresholds, max(depth_list),
                                          batch_size, exit_prompt_steps))
        length_control = ([BudgetForcing(cot_model, cot_tok, budget_list, depth, batch_size) for depth in cot_depths]
                          if "budget" in chosen else [])
        sampled = [m for m in ("majority", "best-of-n", "weighted-best-of-n", "oracle") if m in chosen and vote_list]
        # one pool of sampled chains serves voting, best-of-n and rejection sampling alike
        pool_size = max([*(vote_list if sampled else []), *([rejection_tries] if "rejection" in chosen else []), 1])
        pool = ChainPool(cot_model, cot_tok, pool_size, search_budget, temperature, cot_depths[-1], batch_size)
        if "rejection" in chosen:
            length_control.append(RejectionSampling(pool, budget_list, rejection_tries))
        if "token-conditional" in chosen:
            stated = load_any_causal_lm(token_conditional_cot) if token_conditional_cot else cot_model
            stated_tok = load_tokenizer(token_conditional_cot) if token_conditional_cot else cot_tok
            check_tokenizer(stated_tok, sample, cot=True, which="token-conditional CoT", thinking_budget=max(budget_list))
            length_control.append(TokenConditional(stated, stated_tok, budget_list, 2 * max(budget_list),
                                                   cot_depths[-1] if stated is cot_model else None, batch_size))
        runs += length_control
        if sampled:
            runs.append(ParallelSampling(pool, vote_list, scorer, aggregation, tuple(sampled)))
        for name in ("beam", "dvts", "rebase"):
            if name not in chosen or not vote_list:
                continue
            counts = vote_list if name == "rebase" else [v for v in vote_list if v % beam_width == 0]
            if not counts:
                raise ValueError(f"--methods {name}: no N in --votes {votes!r} is a multiple of --beam_width {beam_width}")
            options = {"temperature_rebase": rebase_temperature} if name == "rebase" else {"beam_width": beam_width}
            runs += [STRATEGIES[name](cot_model, cot_tok, scorer, sample.task, counts, depth, temperature,
                                      search_max_steps, search_budget, aggregation, seed, batch_size, **options)
                     for depth in cot_depths]
        torch.manual_seed(seed)
        meta = {"latent": str(latent), "cot": str(cot), "task": task, "seed": seed, "difficulties": list(by_difficulty),
                "n": n, "methods": chosen, "reward_model": str(reward_model) if reward_model else None,
                "trained_max_difficulty": trained_max_difficulty}
        rows = run_methods(runs, by_difficulty, desc="compare", output=output, meta=meta)
        if "latent" in chosen and len(depth_list) > 1:  # the smallest right depth of each problem, among several
            rows += [oracle_row(select(rows, method="latent", difficulty=d)) for d in by_difficulty]

        metrics = [method.s1_metrics(rows, difficulty) for difficulty in by_difficulty for method in length_control]
        findings = measured_findings(rows, trained_max_difficulty)
        optimal = compute_optimal(rows)
        write_results(output.path, rows,
                      {**meta, "findings": findings, "s1_metrics": metrics, "compute_optimal": optimal})
        write_results(output.path, metrics, {}, name="s1_metrics")
        plots = plot_comparison(output.path, rows, trained_max_difficulty)
        write_compare_summary(output.path, latent, cot, rows, metrics, findings, plots, optimal)
    return {"rows": rows, "s1_metrics": metrics, "findings": findings, "out": str(out)}


# --- findings: plain statements computed from the measurements ---------------------------------------------------


def measured_findings(rows: list[dict], trained_max_difficulty: int | None = None) -> list[str]:
    """What rose, what did not, and which method buys accuracy with fewer FLOPs. An effect counts only when the
    intervals do not overlap. With trained_max_difficulty, each difficulty says whether it was trained on."""
    lines = []
    for difficulty in sorted({r["difficulty"] for r in rows}):
        kind = ("" if trained_max_difficulty is None or not isinstance(difficulty, int) else " (in-distribution)"
                if difficulty <= trained_max_difficulty else " (harder than any trained)")
        for method, setting, who, axis in (("latent", "steps", "latent model", "depth"),
                                           ("cot-budget", "budget", "CoT model", "the thinking budget")):
            curve = {r[setting]: r for r in select(rows, method=method, difficulty=difficulty)}
            if not curve:
                continue
            first, best = curve[min(curve)], max(curve.values(), key=lambda r: r["accuracy"])
            rose = best["ci_low"] > first["ci_high"]
            lines.append(f"Difficulty {difficulty}{kind}, {who}: accuracy {first['accuracy']:.2f} at {setting} "
                         f"{min(curve)}, best {best['accuracy']:.2f} at {setting} {best[setting]}: "
                         + (f"rises with {axis}." if rose else f"no significant rise with {axis}."))
        lines.append(cheapest_to_target(rows, difficulty))
        frontier = depth_frontier(rows, difficulty) if select(rows, method="latent-exit", difficulty=difficulty) else None
        if frontier is not None:
            lines.append(f"Difficulty {difficulty}, latent model, what adaptive exit saves: "
                         + "; ".join(line[2:] for line in frontier_lines(frontier, top=1)) + ".")
        lines += search_findings(rows, difficulty)
    return lines


SEARCHED = ("prm-best-of-n", "prm-weighted-best-of-n", "beam", "dvts", "rebase")


def search_findings(rows: list[dict], difficulty: int) -> list[str]:
    """What a reward model bought at the largest N: the best searched answer against majority vote, beside the
    oracle bound (whether any sample was right at all, the most a verifier could find)."""
    at = select(rows, difficulty=difficulty)
    searched = [r for r in at if r["method"] in SEARCHED]
    if not searched:
        return []
    n = max(r["samples"] for r in searched)
    best = max((r for r in searched if r["samples"] == n), key=lambda r: r["accuracy"])
    line = (f"Difficulty {difficulty}, search with the reward model at N = {n}: best {best['method']} "
            f"{best['accuracy']:.2f} ({best['flops_per_problem']:.3g} FLOPs, {best['reward_flops']:.3g} of them the "
            "reward model's)")
    vote = [r for r in select(at, method="cot-vote") if r["samples"] == n]
    if vote:
        gain = best["ci_low"] > vote[0]["ci_high"]
        line += (f", majority vote {vote[0]['accuracy']:.2f}: " + ("search is better." if gain else
                                                                    "no significant gain over voting."))
    oracle = [r for r in select(at, method="oracle-best-of-n") if r["samples"] == n]
    if oracle:
        line += (f" Oracle bound (any of {n} samples right): {oracle[0]['accuracy']:.2f}"
                 + (", so no verifier can find a right answer here." if oracle[0]["accuracy"] == 0 else "."))
    return [line]


def cheapest_to_target(rows: list[dict], difficulty: int, fraction: float = 0.9) -> str:
    """Which method buys accuracy with fewer FLOPs: the least FLOPs per problem at which each method reaches
    `fraction` of the best accuracy any method reached at this difficulty. (Accuracy divided by FLOPs would favour
    the cheapest near-chance setting.)"""
    at = [r for r in select(rows, difficulty=difficulty) if not r.get("oracle")]  # a bound, never a method
    best = max(r["accuracy"] for r in at)
    if best < 0.2:
        return f"Difficulty {difficulty}: no method reaches 0.2 accuracy (best {best:.2f}): no compute comparison."
    target = fraction * best
    cheapest = {}  # method -> its cheapest row on target, in order of FLOPs
    for r in sorted(at, key=lambda r: r["flops_per_problem"]):
        if r["accuracy"] >= target:
            cheapest.setdefault(r["method"], r)
    ranked = list(cheapest.values())
    reached = "; ".join(f"{r['method']} {r['flops_per_problem']:.3g} ({r['setting']}, {r['accuracy']:.2f})" for r in ranked)
    missed = sorted({r["method"] for r in at} - set(cheapest))
    line = (f"Difficulty {difficulty}: FLOPs per problem to reach {target:.2f} accuracy ({fraction:.0%} of the best, "
            f"{best:.2f}): {reached}" + (f"; never reached by {', '.join(missed)}" if missed else "") + ".")
    latent = [r for r in ranked if r["method"].startswith("latent")]
    cot = [r for r in ranked if not r["method"].startswith("latent")]  # every token-level method
    if latent and cot:
        ratio = cot[0]["flops_per_problem"] / latent[0]["flops_per_problem"]
        line += (f" Latent depth is {ratio:.1f}x cheaper than chain of thought here." if ratio >= 1
                 else f" Chain of thought is {1 / ratio:.1f}x cheaper than latent depth here.")
    return line


def compute_optimal(rows: list[dict]) -> list[dict]:
    """search-and-learn's compute-optimal view: for each difficulty and each decade of FLOPs per problem, the method
    with the best accuracy among the settings that cost at most that decade's upper end (oracle rows left out)."""
    table = []
    methods = [r for r in rows if not r.get("oracle")]
    if not methods:
        return table
    low = math.floor(math.log10(min(r["flops_per_problem"] for r in methods)))
    high = math.ceil(math.log10(max(r["flops_per_problem"] for r in methods)))
    for difficulty in sorted({r["difficulty"] for r in methods}):
        at = select(methods, difficulty=difficulty)
        for decade in range(low + 1, high + 1):
            affordable = [r for r in at if r["flops_per_problem"] <= 10.0 ** decade]
            if not affordable:
                continue
            best = max(affordable, key=lambda r: (r["accuracy"], -r["flops_per_problem"]))
            table.append({"difficulty": difficulty, "flops_up_to": 10.0 ** decade, "best_method": best["method"],
                          "setting": best["setting"], "accuracy": best["accuracy"],
                          "flops_per_problem": best["flops_per_problem"]})
    return table


def plot_comparison(out: Path, rows: list[dict], trained_max_difficulty: int | None = None) -> list[str]:
    """accuracy_vs_flops.png (a panel per difficulty), accuracy_vs_depth.png and accuracy_vs_budget.png (a line per
    difficulty); difficulties above trained_max_difficulty are labelled as harder than any trained."""
    difficulties = sorted({r["difficulty"] for r in rows})
    name = {d: f"difficulty {d}" + (" (untrained)" if trained_max_difficulty and isinstance(d, int)
                                     and d > trained_max_difficulty else "")
            for d in difficulties}
    panels = {}
    for d in difficulties:
        series = {}
        for r in sorted(select(rows, difficulty=d), key=lambda r: r["flops_per_problem"]):
            label = r["method"] + (f" (r={r['steps']})" if not r["method"].startswith("latent") and r.get("steps")
                                   else "") + (" (oracle bound)" if r.get("oracle") else "")
            series.setdefault(label, ([], []))
            series[label][0].append(r["flops_per_problem"])
            series[label][1].append(r["accuracy"])
        panels[name[d]] = series
    plots = [panel_plot(out / "accuracy_vs_flops.png", panels, "FLOPs per problem (log)", "accuracy",
                        "Latent depth vs chain of thought on one compute axis").name]
    latent = {name[d]: ([r["steps"] for r in select(rows, method="latent", difficulty=d)],
                        [r["accuracy"] for r in select(rows, method="latent", difficulty=d)])
              for d in difficulties}
    plots.append(line_plot(out / "accuracy_vs_depth.png", latent, "latent depth (core steps)", "accuracy",
                           "Latent model: accuracy against test-time depth", logx=True).name)
    budget = {name[d]: ([max(r["budget"], 0.5) for r in select(rows, method="cot-budget", difficulty=d)],
                        [r["accuracy"] for r in select(rows, method="cot-budget", difficulty=d)])
              for d in difficulties}
    plots.append(line_plot(out / "accuracy_vs_budget.png", budget, "thinking budget (tokens; 0 shown at 0.5)", "accuracy",
                           "CoT model: accuracy against thinking budget (budget forcing)", logx=True).name)
    return plots


def write_compare_summary(out: Path, latent: Path, cot: Path, rows: list[dict], metrics: list[dict],
                          findings: list[str], plots: list[str], optimal: list[dict]) -> None:
    write_summary(out, "Latent depth against chain of thought", [
        ("Setup", f"Latent model `{latent}`, CoT model `{cot}`, the same problems for every method. FLOPs per "
                  "problem: prompt plus every generated or inserted token at its depth (recurrent_lm.flops). "
                  "Accuracy intervals are 95% Wilson intervals."),
        ("Findings (computed from the measurements)", "\n".join(f"- {line}" for line in findings)),
        ("Results", markdown_table(rows, RESULT_COLUMNS)),
        ("s1 metrics of length control (budget forcing, rejection sampling)",
         markdown_table(metrics, ["method", "difficulty", "cot_steps", "control", "scaling", "performance"])),
        ("Compute-optimal methods (the best accuracy within each FLOPs range; oracle rows left out)",
         markdown_table(optimal, ["difficulty", "flops_up_to", "best_method", "setting", "accuracy", "flops_per_problem"])),
        ("Plots", "\n\n".join(f"![{p}]({p})" for p in plots)),
    ])
