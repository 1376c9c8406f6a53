"""The one interface of a test-time scaling method, and the loop that runs a list of them on the same problems.

A method is evaluated at each of its budgets (latent depths, exit thresholds, thinking budgets, sample counts) on
the problems of one difficulty at a time, and returns result rows (recurrent_lm.eval.report.result_row): accuracy
with its interval, FLOPs per problem from the one compute counter, generated tokens, and its own settings.
Latent depth, adaptive exit, budget forcing and parallel sampling implement it; so does any search method added
later, and `rlm compare` puts every one of them on the same FLOPs axis.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from recurrent_lm.outputs import Interrupted, Output
from recurrent_lm.problem import Problem

from .report import write_results


class Method(ABC):
    """A way of spending test-time compute. `name` labels its rows; `budgets` are the settings it is run at."""

    name: str
    budgets: Sequence[Any]

    @abstractmethod
    def run(self, problems: list[Problem], budget: Any) -> list[dict[str, Any]]:
        """Answer `problems` (all of one difficulty) at one budget; one row per reported method (parallel
        sampling reports majority vote and best-of-n from the same samples)."""


def run_methods(methods: Sequence[Method], by_difficulty: dict[int, list[Problem]], desc: str,
                output: Output | None = None, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every method at every budget on every difficulty's problems, with a progress bar over the cells. Ctrl-C
    with an `output` keeps the rows of the cells that finished there (results.json/.csv with `meta`, marked
    incomplete) and ends the run as Interrupted."""
    cells = [(method, difficulty, budget) for method in methods for difficulty in by_difficulty
             for budget in method.budgets]
    rows, finished = [], 0
    try:
        for method, difficulty, budget in tqdm(cells, desc=desc, unit="cell"):
            rows += method.run(by_difficulty[difficulty], budget)
            finished += 1
    except KeyboardInterrupt:
        if output is None:
            raise
        keep_interrupted(output, rows, meta or {}, finished, len(cells))
    return rows


def keep_interrupted(output: Output, rows: list[dict[str, Any]], meta: dict[str, Any], finished: int,
                     cells: int) -> None:
    """Ctrl-C: the rows of the cells that finished go to the output as results.json/.csv, marked incomplete, and
    the run ends as Interrupted, saying so."""
    write_results(output.path, rows, {**meta, "finished_cells": finished, "cells": cells}, complete=False)
    output.keep()
    raise Interrupted(f"kept the {finished} of {cells} cells that finished in {output.landing / 'results.json'} "
                      "(\"complete\": false); rerun with --overwrite for the whole result") from None
