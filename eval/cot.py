"""Token-level test-time scaling as methods (recurrent_lm.eval.methods), for any transformers causal LM that thinks
in a chain of thought between the task's thinking delimiters (a RecurrentLM too, at a chosen depth):
- BudgetForcing:    s1 budget forcing at each thinking budget B (recurrent_lm.eval.budget_forcing);
- ParallelSampling: N sampled chains per problem, reported as majority vote ("cot-vote") and as best-of-n scored
                    by the model's own mean answer log-probability ("cot-best-of-n") over the first n of them; with
                    a reward model (eval/reward_models.py) also as best-of-n and weighted best-of-n by its aggregated
                    step scores ("prm-best-of-n", "prm-weighted-best-of-n"), and as the "oracle-best-of-n" row: right
                    when any of the n is (the task's checker as verifier, an upper bound and never a method).
FLOPs: the prompt and every generated or inserted token at the model's depth, plus best-of-n's scoring passes
(the reward model's apart, as reward_flops).
"""

import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from recurrent_lm.data import prompt_ids, prompt_text
from recurrent_lm.flops import causal_lm_generation_flops
from recurrent_lm.problem import Problem, split_steps
from recurrent_lm.special_tokens import THINK_END
from recurrent_lm.tasks import get_task

from .budget_forcing import (BudgetResult, budget_forced_generate, majority_vote, model_logprob_scorer, s1_metrics,
                             weighted_vote)
from .methods import Method
from .report import result_row, select
from .reward_models import RewardModel, aggregate


class ChainRun(NamedTuple):
    """One budget-forced chain of thought for one problem: the parsed answer, the run, and its FLOPs."""

    answer: str | None
    result: BudgetResult
    flops: int


def depth_kwargs(depth: int | None) -> dict[str, Any]:
    """What a recurrent CoT model is run with at its depth (deterministic start); nothing for other models."""
    return {"num_steps": depth, "init_scale": 0.0} if depth is not None else {}


def cot_runs(model, tokenizer, problems: list[Problem], budget: int, depth: int | None, samples: int = 1,
             temperature: float = 0.0, batch_size: int = 32, stated_budget: int | None = None) -> list[list[ChainRun]]:
    """Budget-forced chains of thought, greedy, or `samples` > 1 sampled per problem; a list of runs per problem.
    stated_budget: the prompt states it as the thinking length asked for (token-conditional control)."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if samples > 1 else dict(do_sample=False)
    per_problem = [[] for _ in problems]
    requests = [(index, problem) for index, problem in enumerate(problems) for _ in range(samples)]
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        prompts = [prompt_text(tokenizer, p, cot=True, thinking_budget=stated_budget) for _, p in chunk]
        results = budget_forced_generate(model, tokenizer, prompts, max_thinking=budget,
                                         max_answer_tokens=len(chunk[0][1].answer) + 3, **sampling, **depth_kwargs(depth))
        for (index, problem), result in zip(chunk, results):
            answer = get_task(problem.task).parse_answer(result.answer_text)
            flops = causal_lm_generation_flops(model, result.prompt_tokens, result.new_tokens, depth)
            per_problem[index].append(ChainRun(answer, result, flops))
    return per_problem


class ChainPool:
    """Chains of thought sampled once per problem set and shared by the methods that read samples (majority vote,
    best-of-n, weighted best-of-n, rejection sampling): `samples` chains per problem at `temperature`, thinking up
    to `budget` tokens; each method takes the first n of them."""

    def __init__(self, model, tokenizer, samples: int, budget: int, temperature: float, depth: int | None = None,
                 batch_size: int = 32):
        self.model, self.tokenizer, self.samples, self.budget = model, tokenizer, samples, budget
        self.temperature, self.depth, self.batch_size = temperature, depth, batch_size
        self.drawn: dict[tuple, tuple[list[list[ChainRun]], float]] = {}

    def runs(self, problems: list[Problem]) -> tuple[list[list[ChainRun]], float]:
        """Every problem's sampled chains, and the seconds it took to sample them (once)."""
        key = tuple((p.task, p.difficulty, p.question) for p in problems)
        if key not in self.drawn:
            start = time.perf_counter()
            runs = cot_runs(self.model, self.tokenizer, problems, self.budget, self.depth, samples=self.samples,
                            temperature=self.temperature, batch_size=self.batch_size)
            self.drawn[key] = (runs, time.perf_counter() - start)
        return self.drawn[key]


def chain_steps(tokenizer, result: BudgetResult, task) -> list[str]:
    """A generated chain of thought as the task's steps (what a reward model scores): thinking, end, answer."""
    end = tokenizer(THINK_END, add_special_tokens=False).input_ids
    return split_steps(tokenizer.decode(result.thinking_ids + end + result.answer_ids), task.require_steps())


def depth_label(depth: int | None) -> str:
    return f", r={depth}" if depth is not None else ""


class LengthControl(Method):
    """A method that controls the thinking length to a budget B (s1's Table 3): its rows hold the thinking length of
    every run, from which control, scaling and performance are computed."""

    depth: int | None

    def __init__(self):
        self.thinking_lengths: dict[tuple[int, int], list[int]] = {}  # (difficulty, budget) -> one per problem

    def length_row(self, problems: list[Problem], budget: int, runs: list[ChainRun], flops: list[int],
                   seconds: float, **extra: Any) -> dict[str, Any]:
        lengths = [len(run.result.thinking_ids) for run in runs]
        self.thinking_lengths[(problems[0].difficulty, budget)] = lengths
        scores = [get_task(p.task).score(run.answer, p) for p, run in zip(problems, runs)]
        return result_row(self.name, f"B={budget}" + depth_label(self.depth), problems[0].difficulty, scores, flops,
                          [run.result.new_tokens for run in runs], seconds, budget=budget, steps=self.depth,
                          mean_thinking_tokens=sum(lengths) / len(lengths),
                          control=sum(length <= budget for length in lengths) / len(lengths), **extra)

    def s1_metrics(self, rows: list[dict[str, Any]], difficulty: int) -> dict[str, Any]:
        """Control, scaling and performance (s1) of this method's rows at one difficulty."""
        mine = select(rows, method=self.name, difficulty=difficulty, steps=self.depth)
        accuracy = {row["budget"]: row["accuracy"] for row in mine}
        lengths = {budget: self.thinking_lengths[(difficulty, budget)] for budget in accuracy}
        return {"method": self.name, "difficulty": difficulty, "cot_steps": self.depth,
                **s1_metrics(accuracy, lengths)}


class BudgetForcing(LengthControl):
    """s1 budget forcing at every thinking budget, greedy; `depth` is the CoT model's own depth if it is recurrent."""

    name = "cot-budget"

    def __init__(self, model, tokenizer, budgets: list[int], depth: int | None = None, batch_size: int = 32):
        super().__init__()
        self.model, self.tokenizer, self.budgets, self.depth, self.batch_size = model, tokenizer, budgets, depth, batch_size

    def run(self, problems: list[Problem], budget: int) -> list[dict[str, Any]]:
        start = time.perf_counter()
        runs = [chains[0] for chains in cot_runs(self.model, self.tokenizer, problems, budget, self.depth,
                                                 batch_size=self.batch_size)]
        return [self.length_row(problems, budget, runs, [run.flops for run in runs], time.perf_counter() - start)]


class RejectionSampling(LengthControl):
    """s1's rejection sampling to a length budget: chains are sampled (from a ChainPool: at its temperature,
    thinking up to its budget) until one thinks for at most B tokens, at most `tries` of them; the first that fits
    answers, and every chain drawn until then is paid for. Where none fits, the shortest answers (a run outside the
    budget: control falls). The same draws serve every budget."""

    name = "cot-rejection"

    def __init__(self, pool: ChainPool, budgets: list[int], tries: int = 8):
        super().__init__()
        if not 1 <= tries <= pool.samples:
            raise ValueError(f"rejection sampling needs 1 <= tries <= the pool's {pool.samples} samples, got {tries}")
        self.pool, self.budgets, self.tries, self.depth = pool, budgets, tries, pool.depth

    def run(self, problems: list[Problem], budget: int) -> list[dict[str, Any]]:
        draws, seconds = self.pool.runs(problems)
        chosen, flops, tries = [], [], []
        for chains in (runs[: self.tries] for runs in draws):
            fits = next((i for i, run in enumerate(chains) if len(run.result.thinking_ids) <= budget), None)
            used = chains[: fits + 1] if fits is not None else chains
            chosen.append(used[-1] if fits is not None else min(chains, key=lambda r: len(r.result.thinking_ids)))
            flops.append(sum(run.flops for run in used))
            tries.append(len(used))
        return [self.length_row(problems, budget, chosen, flops, seconds, temperature=self.pool.temperature,
                                mean_tries=sum(tries) / len(tries))]


class TokenConditional(LengthControl):
    """s1's token-conditional control: the prompt asks for at most B thinking tokens ("[B]" before <think>), for a
    model trained with its thinking length stated (data.state_thinking_length); generation is greedy and nothing
    enforces B (thinking stops at `cap` tokens at most), so control says whether the model keeps to what it was
    asked for."""

    name = "cot-token-conditional"

    def __init__(self, model, tokenizer, budgets: list[int], cap: int, depth: int | None = None, batch_size: int = 32):
        super().__init__()
        self.model, self.tokenizer, self.budgets, self.cap = model, tokenizer, budgets, cap
        self.depth, self.batch_size = depth, batch_size

    def run(self, problems: list[Problem], budget: int) -> list[dict[str, Any]]:
        start = time.perf_counter()
        runs = [chains[0] for chains in cot_runs(self.model, self.tokenizer, problems, self.cap, self.depth,
                                                 batch_size=self.batch_size, stated_budget=budget)]
        return [self.length_row(problems, budget, runs, [run.flops for run in runs], time.perf_counter() - start)]


class ParallelSampling(Method):
    """The first n chains of a ChainPool per problem, for each count n: majority vote and best-of-n (the same
    samples for every n), and, with a reward model, its best-of-n, weighted best-of-n and the oracle row."""

    name = "cot-samples"

    def __init__(self, pool: ChainPool, counts: list[int], reward_model: RewardModel | None = None,
                 aggregation: str = "last",
                 methods: tuple[str, ...] = ("majority", "best-of-n", "weighted-best-of-n", "oracle")):
        if max(counts) > pool.samples:
            raise ValueError(f"parallel sampling reads at most the pool's {pool.samples} samples, not {max(counts)}")
        self.pool, self.budgets, self.model, self.tokenizer = pool, counts, pool.model, pool.tokenizer
        self.budget, self.temperature, self.depth = pool.budget, pool.temperature, pool.depth
        self.reward_model, self.aggregation, self.methods = reward_model, aggregation, methods
        aggregate([], aggregation)
        self.scorer = model_logprob_scorer(self.model, **depth_kwargs(self.depth))
        self.scored: dict[tuple, tuple[list[list["Sample"]], float]] = {}

    def _samples(self, problems: list[Problem]) -> tuple[list[list["Sample"]], float]:
        """Per problem, every sample with its scores; and the sampling and scoring seconds."""
        key = tuple((p.task, p.difficulty, p.question) for p in problems)
        if key not in self.scored:
            runs, sampling = self.pool.runs(problems)
            start = time.perf_counter()
            end = self.tokenizer(THINK_END, add_special_tokens=False).input_ids
            pool = []
            for problem, samples in zip(problems, runs):
                task, scored = get_task(problem.task), []
                for run in samples[: max(self.budgets)]:  # the answer's log-probability given its context
                    context = prompt_ids(self.tokenizer, problem, cot=True) + run.result.thinking_ids + end
                    scored.append(Sample(run, self.scorer(context, run.result.answer_ids),
                                         len(context) + len(run.result.answer_ids)))
                if self.reward_model is not None:
                    prompt = task.prompt(problem, cot=True)
                    chains = [chain_steps(self.tokenizer, s.run.result, task) for s in scored]
                    for sample, (steps, cost) in zip(scored, self.reward_model.score_with_flops([prompt] * len(chains), chains)):
                        sample.reward, sample.reward_flops = aggregate(steps, self.aggregation), cost
                pool.append(scored)
            self.scored[key] = (pool, sampling + time.perf_counter() - start)
        return self.scored[key]

    def run(self, problems: list[Problem], count: int) -> list[dict[str, Any]]:
        pool, seconds = self._samples(problems)
        results: dict[str, list[float]] = {name: [] for name in ("cot-vote", "cot-best-of-n", "prm-best-of-n",
                                                                 "prm-weighted-best-of-n", "oracle-best-of-n")}
        sample_flops, self_flops, reward_flops, tokens = [], [], [], []
        for problem, scored in zip(problems, pool):
            first, task = scored[:count], get_task(problem.task)
            answers = [sample.run.answer for sample in first]
            results["cot-vote"].append(task.score(majority_vote(answers), problem))
            results["cot-best-of-n"].append(task.score(max(first, key=lambda s: s.logprob).run.answer, problem))
            sample_flops.append(sum(sample.run.flops for sample in first))
            self_flops.append(sum(causal_lm_generation_flops(self.model, s.length, 1, self.depth) for s in first))
            tokens.append(sum(sample.run.result.new_tokens for sample in first))
            if self.reward_model is not None:
                results["prm-best-of-n"].append(task.score(max(first, key=lambda s: s.reward).run.answer, problem))
                results["prm-weighted-best-of-n"].append(task.score(weighted_vote(answers, [s.reward for s in first]),
                                                                    problem))
                reward_flops.append(sum(sample.reward_flops for sample in first))
            results["oracle-best-of-n"].append(max(task.score(a, problem) for a in answers))
        setting = f"n={count}, B={self.budget}" + depth_label(self.depth)
        extra = dict(samples=count, budget=self.budget, steps=self.depth, temperature=self.temperature)
        difficulty = problems[0].difficulty
        added = [a + b for a, b in zip(sample_flops, reward_flops)]
        rows = {"cot-vote": (sample_flops, {}), "oracle-best-of-n": (sample_flops, {"oracle": True}),
                "cot-best-of-n": ([a + b for a, b in zip(sample_flops, self_flops)], {})}
        if self.reward_model is not None:
            reward = {"policy_flops": sum(sample_flops) / len(problems), "reward_flops": sum(reward_flops) / len(problems),
                      "aggregation": self.aggregation}
            rows |= {"prm-best-of-n": (added, reward), "prm-weighted-best-of-n": (added, reward)}
        wanted = {"majority": "cot-vote", "best-of-n": "cot-best-of-n", "oracle": "oracle-best-of-n"}
        wanted = {wanted[m] for m in self.methods if m in wanted} | (
            {"prm-best-of-n", "prm-weighted-best-of-n"} & set(rows) if "weighted-best-of-n" in self.methods else set())
        return [result_row(name, setting, difficulty, results[name], flops, tokens, seconds, **extra, **more)
                for name, (flops, more) in rows.items() if name in wanted]


@dataclass
class Sample:
    """One sampled chain of thought with its scores: the model's own answer log-probability (and the length of
    that scoring pass) and, with a reward model, its aggregated score and the FLOPs of reading it."""

    run: ChainRun
    logprob: float
    length: int
    reward: float = 0.0
    reward_flops: int = 0
