"""Latent test-time scaling as methods (recurrent_lm.eval.methods): a RecurrentLM answering directly at a fixed
depth r, and with adaptive per-token exit up to a maximum depth. `rlm sweep` and `rlm compare` both run these."""

import math
import time
from collections import Counter
from typing import Any

from recurrent_lm.adaptive import AdaptiveExit, threshold_grid
from recurrent_lm.answering import Answer, answer_flops, answer_problems
from recurrent_lm.problem import Problem

from .methods import Method
from .report import result_row, select


def latent_row(name: str, setting: str, answers: list[Answer], config, max_steps: int, exit_criterion: str | None,
               seconds: float, prompt_exit: bool = True, **extra: Any) -> dict[str, Any]:
    """A result row of a recurrent model's answers: FLOPs of each answer at the depth each position ran; each
    problem's score and FLOPs are kept too (the oracle and the mixed-difficulty frontier read them). A set of
    several difficulties is labelled "mixed"."""
    steps = [s for a in answers for s in a.steps_per_token or []]
    prompt = [s for a in answers for s in a.prompt_steps or []]
    scores = [a.score for a in answers]
    flops = [answer_flops(config, a, max_steps, exit_criterion, prompt_exit) for a in answers]
    difficulties = {a.problem.difficulty for a in answers}
    return result_row(name, setting, difficulties.pop() if len(difficulties) == 1 else "mixed", scores, flops,
                      [a.new_tokens for a in answers], seconds, steps=max_steps,
                      mean_steps_per_token=sum(steps) / len(steps) if steps else math.nan,
                      mean_prompt_steps=sum(prompt) / len(prompt) if prompt else math.nan,
                      problem_scores=scores, problem_flops=flops, **extra)


def oracle_row(fixed: list[dict[str, Any]]) -> dict[str, Any]:
    """The oracle of a depth sweep on one problem set: each problem answered at the smallest swept depth that
    answers it right (the largest depth, wrong, where none does), charged that depth's FLOPs. What a perfect exit
    rule that picks one depth per problem would reach; its accuracy is the share of problems some depth answers."""
    fixed = sorted(fixed, key=lambda r: r["steps"])
    scores, flops = [], []
    for i in range(len(fixed[0]["problem_scores"])):
        right = [r for r in fixed if r["problem_scores"][i] > 0]
        chosen = right[0] if right else fixed[-1]
        scores.append(chosen["problem_scores"][i])
        flops.append(chosen["problem_flops"][i])
    return result_row("latent-oracle", "smallest right depth", fixed[0]["difficulty"], scores, flops,
                      [0] * len(scores), math.nan, steps=None, oracle=True, problem_scores=scores,
                      problem_flops=flops)


def depth_frontier(rows: list[dict[str, Any]], difficulty: Any) -> dict[str, Any] | None:
    """The saving adaptive exit buys on one problem set, stated from the rows: the best fixed depth's accuracy; the
    cheapest fixed depth within 1 point of it (the baseline); and every adaptive setting within 1 point of the
    baseline, with how many times fewer FLOPs per problem and less wall time it took than the baseline (the same
    problems, batches and machine); the oracle's FLOPs saving beside them."""
    fixed = select(rows, method="latent", difficulty=difficulty)
    if not fixed:
        return None
    best = max(r["accuracy"] for r in fixed)
    baseline = min((r for r in fixed if r["accuracy"] >= best - 0.01 - 1e-9), key=lambda r: r["flops_per_problem"])
    settings = [{"setting": r["setting"], "criterion": r.get("criterion"), "threshold": r.get("threshold"),
                 "accuracy": r["accuracy"], "flops_per_problem": r["flops_per_problem"],
                 "wall_seconds": r["wall_seconds"],
                 "flops_saving": baseline["flops_per_problem"] / r["flops_per_problem"],
                 "wall_saving": baseline["wall_seconds"] / r["wall_seconds"]}
                for r in select(rows, method="latent-exit", difficulty=difficulty)
                if r["accuracy"] >= baseline["accuracy"] - 0.01 - 1e-9]
    oracle = select(rows, method="latent-oracle", difficulty=difficulty)
    return {"difficulty": difficulty, "best_fixed_accuracy": best, "baseline_steps": baseline["steps"],
            "baseline_accuracy": baseline["accuracy"], "baseline_flops": baseline["flops_per_problem"],
            "baseline_wall_seconds": baseline["wall_seconds"],
            "oracle_accuracy": oracle[0]["accuracy"] if oracle else None,
            "oracle_flops_saving": baseline["flops_per_problem"] / oracle[0]["flops_per_problem"] if oracle else None,
            "adaptive_within_1_point": sorted(settings, key=lambda r: -r["flops_saving"])}


def frontier_lines(frontier: dict[str, Any], top: int = 3) -> list[str]:
    """The frontier in words, for a report: the baseline, the oracle, and the `top` adaptive settings within 1
    point of the baseline that save the most FLOPs."""
    base = f"r = {frontier['baseline_steps']}"
    lines = [f"- best fixed depth: {frontier['best_fixed_accuracy']:.3f}; the cheapest within 1 point is {base} "
             f"({frontier['baseline_accuracy']:.3f}, {frontier['baseline_flops']:.3g} FLOPs per problem)"]
    if frontier["oracle_flops_saving"] is not None:
        lines.append(f"- oracle (smallest right depth per problem): {frontier['oracle_accuracy']:.3f}, "
                     f"{times(frontier['oracle_flops_saving'], 'FLOPs')} than {base}")
    settings = frontier["adaptive_within_1_point"]
    if not settings:
        lines.append(f"- no adaptive setting is within 1 point of {base}")
    for r in settings[:top]:
        lines.append(f"- {r['setting']}: {r['accuracy']:.3f}, {times(r['flops_saving'], 'FLOPs')} and "
                     f"{times(r['wall_saving'], 'wall time', 'less', 'more')} than {base}")
    return lines


def times(saving: float, what: str, fewer: str = "fewer", more: str = "more") -> str:
    """A saving as a reader says it: "2.50x fewer FLOPs", or "1.89x more FLOPs" where it costs more."""
    return f"{saving:.2f}x {fewer} {what}" if saving >= 1 else f"{1 / saving:.2f}x {more} {what}"


class LatentDepth(Method):
    """The latent model answering directly (no chain of thought) at each test-time depth r, greedy, from a zero
    initial state."""

    name = "latent"

    def __init__(self, model, tokenizer, depths: list[int], batch_size: int = 64):
        self.model, self.tokenizer, self.budgets, self.batch_size = model, tokenizer, list(depths), batch_size

    def run(self, problems: list[Problem], depth: int) -> list[dict[str, Any]]:
        start = time.perf_counter()
        answers = answer_problems(self.model, self.tokenizer, problems, batch_size=self.batch_size, num_steps=depth,
                                  init_scale=0.0)
        return [latent_row(self.name, f"r={depth}", answers, self.model.config, depth, None,
                           time.perf_counter() - start)]


class AdaptiveDepth(Method):
    """The latent model with adaptive per-token exit (recurrent_lm.adaptive) at each threshold of one criterion, up
    to max_steps; the rows also hold the histogram of the depths the tokens ran. prompt_steps: the prompt runs this
    fixed depth instead, with no exit (generate's prompt_num_steps)."""

    name = "latent-exit"

    def __init__(self, model, tokenizer, criterion: str, thresholds: list[float] | None, max_steps: int,
                 batch_size: int = 64, prompt_steps: int | None = None):
        self.model, self.tokenizer, self.criterion, self.max_steps = model, tokenizer, criterion, max_steps
        self.budgets, self.batch_size = threshold_grid(criterion, thresholds), batch_size
        self.prompt_steps = prompt_steps
        AdaptiveExit(criterion).tracker(getattr(model, "exit_gate", None))  # "gate" on a model without one: now

    def run(self, problems: list[Problem], threshold: float) -> list[dict[str, Any]]:
        start = time.perf_counter()
        answers = answer_problems(self.model, self.tokenizer, problems, batch_size=self.batch_size,
                                  num_steps=self.max_steps, init_scale=0.0, exit_criterion=self.criterion,
                                  exit_threshold=threshold, prompt_num_steps=self.prompt_steps)
        histogram = Counter(s for a in answers for s in a.steps_per_token or [])
        prompt = f", prompt r={self.prompt_steps}" if self.prompt_steps else ""
        return [latent_row(self.name, f"{self.criterion}<{threshold:g} (max {self.max_steps}{prompt})", answers,
                           self.model.config, self.max_steps, self.criterion, time.perf_counter() - start,
                           prompt_exit=self.prompt_steps is None, criterion=self.criterion, threshold=threshold,
                           prompt_steps=self.prompt_steps,
                           steps_histogram={int(k): v for k, v in sorted(histogram.items())})]
