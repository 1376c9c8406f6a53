"""A reasoning problem and the task interface every task implements (rendering, parsing and scoring are shared)."""

import json
import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

from .special_tokens import BUDGET_CLOSE, BUDGET_OPEN, EOS, THINK_END, THINK_START


@dataclass(frozen=True)
class Problem:
    task: str
    difficulty: int
    question: str
    answer: str
    steps: tuple[str, ...] = ()  # the intermediate results a chain of thought writes, in order
    hints: tuple[tuple[int, str], ...] = ()  # dense supervision inside the question: (offset, target)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, raw: dict) -> "Problem":
        missing = {"task", "difficulty", "question", "answer"} - set(raw)
        if missing:
            raise ValueError(f"problem lacks fields {sorted(missing)}")
        return cls(task=str(raw["task"]), difficulty=int(raw["difficulty"]), question=str(raw["question"]),
                   answer=str(raw["answer"]), steps=tuple(raw.get("steps", ())),
                   hints=tuple((int(o), str(t)) for o, t in raw.get("hints", ())), metadata=dict(raw.get("metadata", {})))


class Task(ABC):
    """A family of problems. Subclasses define generation; rendering, parsing and scoring are shared."""

    name: str
    min_difficulty: int = 1
    max_difficulty: int
    alphabet: str  # every character a rendered problem may contain (special tokens aside)
    description: str
    step_separator: str | None = ";"  # ends every step of a chain of thought (None: no steps to search over)
    # The answer is not written after the prompt but read at the hints' positions, one forward pass over the prompt
    # (recurrent_lm.answering): the problem's answer is its hints' targets joined, and its completion is eos alone.
    answered_at_hints: bool = False

    def check_difficulty(self, difficulty: int) -> None:
        if not self.min_difficulty <= difficulty <= self.max_difficulty:
            raise ValueError(f"difficulty {difficulty} is out of range for task {self.name!r}: "
                             f"{self.min_difficulty}..{self.max_difficulty}")

    @abstractmethod
    def _generate(self, difficulty: int, rng: random.Random) -> Problem: ...

    def distinct_problems(self, difficulty: int) -> int | None:
        """How many different problems exist at this difficulty, where that is few enough to matter (a training
        stream then sees most of them, and held-out problems are training problems); None where it is vast."""
        return None

    def generate(self, difficulty: int, rng: random.Random) -> Problem:
        self.check_difficulty(difficulty)
        return self._generate(difficulty, rng)

    def problems(self, difficulty: int, n: int, seed: int = 0) -> list[Problem]:
        """n problems at one difficulty, the same for the same seed on every machine."""
        rng = random.Random(f"{self.name}/{difficulty}/{seed}")
        return [self.generate(difficulty, rng) for _ in range(n)]

    def prompt(self, problem: Problem, cot: bool = False, thinking_budget: int | None = None) -> str:
        """The question, then (for a chain of thought) the thinking delimiter; `thinking_budget` states the
        thinking length before it, "[48]" (s1's token-conditional control: "think for up to 48 tokens")."""
        stated = f"{BUDGET_OPEN}{thinking_budget}{BUDGET_CLOSE}" if cot and thinking_budget is not None else ""
        return problem.question + (stated + THINK_START if cot else "")

    def completion(self, problem: Problem, cot: bool = False) -> str:
        if self.answered_at_hints:
            if cot:
                raise ValueError(f"task {self.name!r} is answered at every position of its prompt, in one forward "
                                 "pass: it has no chain of thought")
            return EOS
        thinking = "".join(step + ";" for step in problem.steps) + THINK_END if cot else ""
        return thinking + problem.answer + EOS

    def render(self, problem: Problem, cot: bool = False) -> str:
        """The full text a model trains on: prompt + completion."""
        return self.prompt(problem, cot) + self.completion(problem, cot)

    def parse_answer(self, generated: str, cot: bool = False) -> str | None:
        """The answer in text generated after the prompt; None if there is none (e.g. thinking never ended)."""
        if cot:
            if THINK_END not in generated:
                return None
            generated = generated.split(THINK_END, 1)[1]
        answer = generated.split(EOS, 1)[0].strip()
        return answer or None

    def score(self, answer: str | None, problem: Problem) -> float:
        """1.0 for the right answer, else 0.0."""
        return float(answer is not None and answer.strip() == problem.answer)

    # --- steps: what a process reward model scores and step-level search expands ----------------------------------

    def require_steps(self) -> str:
        if not self.step_separator:
            raise ValueError(f"task {self.name!r} has no step separator: step-level search and process rewards "
                             "need one (use best-of-n or majority vote)")
        return self.step_separator

    def solution_steps(self, problem: Problem) -> list[str]:
        """The worked solution as the steps a chain of thought writes after the prompt: each thinking step with its
        separator, then the answer step (the end-of-thinking delimiter, the answer, eos)."""
        return split_steps(self.completion(problem, cot=True), self.require_steps())

    def step_labels(self, problem: Problem, steps: list[str]) -> list[bool] | None:
        """The exact checker's label of each step (split_steps of a generated chain): a thinking step is good while
        every step up to it equals the worked solution's (the first wrong step and all after it are bad); the answer
        step is good when its answer is right. None where the task has no step checker."""
        gold, good, labels = self.solution_steps(problem), True, []
        for i, step in enumerate(steps):
            if step.startswith(THINK_END):
                good = self.score(self.parse_answer(step, cot=True), problem) == 1.0
            else:
                good = good and i < len(gold) - 1 and step == gold[i]
            labels.append(good)
        return labels

    def corrupt_step(self, step: str, rng: random.Random) -> str | None:
        """The step with one letter or digit changed to another of the task's alphabet (a plausible slip, for
        training a process reward model on labelled errors); None if the step has nothing to change."""
        body = step[len(THINK_END):] if step.startswith(THINK_END) else step
        offset = len(step) - len(body)
        kinds = (str.isdigit, str.isalpha)
        places = [i for i, c in enumerate(body) if c in self.alphabet and any(kind(c) for kind in kinds)]
        if not places:
            return None
        i = rng.choice(places)
        kind = next(kind for kind in kinds if kind(body[i]))
        choices = sorted(c for c in set(self.alphabet) if kind(c) and c != body[i])
        if not choices:
            return None
        return step[: offset + i] + rng.choice(choices) + step[offset + i + 1 :]


def split_steps(completion: str, separator: str) -> list[str]:
    """A chain of thought (the text after the prompt) as steps: each thinking step with its separator, then the
    answer step from the end-of-thinking delimiter on (absent while the chain is unfinished). Joined, the steps give
    the completion back."""
    thinking, end, answer = completion.partition(THINK_END)
    steps = [part + separator for part in thinking.split(separator)[:-1]]
    rest = thinking[sum(map(len, steps)):]
    if rest:  # an unfinished step (no separator yet)
        steps.append(rest)
    if end:
        steps.append(end + answer)
    return steps
