"""reasoning-gym (an optional extra: `pip install -e ".[reasoning-gym]"`) as a source of evaluation problems.

Any of its procedural datasets serves as task `reasoning-gym:NAME`; answers are scored with reasoning-gym's own
scorer (`score_answer`), which gives partial credit where the dataset defines it. Difficulty maps to the
dataset's seed offset only: reasoning-gym's difficulty knobs differ per dataset, pass them as `config`.
"""

import random
from typing import Any

from .problem import Problem, Task


def _require():
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError('reasoning-gym is not installed: pip install -e ".[reasoning-gym]"') from error
    return reasoning_gym


class ReasoningGymTask(Task):
    min_difficulty, max_difficulty = 1, 1
    alphabet = ""  # free text: use a byte-level or BPE tokenizer
    step_separator = "\n"  # a reasoning step is a line; no exact step checker (Math-Shepherd labels instead)

    def __init__(self, dataset: str, **config: Any):
        self.dataset, self.config = dataset, config
        self.name = f"reasoning-gym:{dataset}"
        self.description = f"reasoning-gym dataset {dataset!r}"

    def _dataset(self, size: int, seed: int):
        reasoning_gym = _require()
        try:
            return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.config)
        except (KeyError, ValueError) as error:
            raise ValueError(f"reasoning-gym has no dataset {self.dataset!r} (or rejects its config): {error}") from error

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        return self.problems(difficulty, 1, seed=rng.randrange(2**31))[0]

    def problems(self, difficulty: int, n: int, seed: int = 0) -> list[Problem]:
        self.check_difficulty(difficulty)
        entries = list(self._dataset(n, seed))
        return [Problem(self.name, difficulty, str(e["question"]) + "\n", str(e["answer"]),
                        metadata={"entry": _jsonable(e)}) for e in entries]

    def step_labels(self, problem: Problem, steps: list[str]) -> None:
        return None

    def score(self, answer: str | None, problem: Problem) -> float:
        if answer is None:
            return 0.0
        dataset = self._dataset(1, 0)  # the scorer depends on the dataset's class, not on its entries
        return float(dataset.score_answer(answer, problem.metadata["entry"]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
