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
from .report import result_row


def latent_row(name: str, setting: str, answers: list[Answer], config, max_steps: int, exit_criterion: str | None,
               seconds: float, prompt_exit: bool = True, **extra: Any) -> dict[str, Any]:
    """A result row of a recurrent model's answers: FLOPs of each answer at the depth each token ran."""
    steps = [s for a in answers for s in a.steps_per_token or []]
    return result_row(name, setting, answers[0].problem.difficulty, [a.score for a in answers],
                      [answer_flops(config, a, max_steps, exit_criterion, prompt_exit) for a in answers],
                      [a.new_tokens for a in answers], seconds, steps=max_steps,
                      mean_steps_per_token=sum(steps) / len(steps) if steps else math.nan, **extra)


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
