"""Step-level search with a reward model over a chain-of-thought policy, as methods (recurrent_lm.eval.methods) on
the one FLOPs axis: beam search, diverse verifier tree search (DVTS) and REBASE (arXiv 2408.00724), the strategies
huggingface/search-and-learn compares. (Weighted best-of-N over independent samples is ParallelSampling with a
reward model, eval/cot.py.)

A node is a partial chain of thought: the policy's tokens after the prompt and the same text split into steps (each
ending with the task's step separator; the last, once thinking ends, is the answer step). Every round the policy
samples one more step for each expansion a strategy allots, the reward model scores every new node, and nodes whose
thinking ended (they are answered greedily at once) become leaves. A strategy spends a budget of N leaves per
problem:
- beam search (N, M): the best ceil(N' / M) live nodes get M expansions each, where N' = N minus the leaves so far;
- DVTS (N, M):        N / M subtrees, each the children of M first steps; a subtree expands only its best live
                      node, M minus its leaves times (independent subtrees: diversity);
- REBASE (N, T):      the N' expansions are split over all live nodes by softmax(score / T) (largest remainders).
A node is scored by aggregating its step scores (last, min or product); the answer is the weighted vote of the
leaves (each leaf's aggregated score added to its answer). A chain ends at the step limit or the thinking budget.

FLOPs: every policy token generated, kept or pruned, at its context length with the prefix cached (each node's
tokens once, the prompt once per problem), and every reward-model pass over every scored node (its whole text,
as search-and-learn re-scores), reported apart (policy_flops, reward_flops) and summed (flops_per_problem).
"""

import math
import time
import zlib
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from recurrent_lm.data import prompt_ids, single_token
from recurrent_lm.flops import causal_lm_extend_flops, causal_lm_forward_flops
from recurrent_lm.problem import Problem
from recurrent_lm.special_tokens import THINK_END
from recurrent_lm.tasks import get_task

from .budget_forcing import generate_until, weighted_vote
from .cot import depth_kwargs, depth_label
from .methods import Method
from .report import result_row
from .reward_models import RewardModel, aggregate


@dataclass
class Node:
    """A partial chain of thought of one problem (and, in DVTS, of one subtree)."""

    problem: int
    ids: list[int] = field(default_factory=list)  # policy tokens after the prompt
    steps: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    subtree: int = 0
    done: bool = False
    answer: str | None = None

    def value(self, how: str) -> float:
        return aggregate(self.scores, how)


def softmax_allocation(scores: list[float], budget: int, temperature: float) -> list[int]:
    """REBASE's split of `budget` expansions over nodes: proportional to softmax(score / T), rounded by largest
    remainders so that the counts sum to the budget exactly."""
    if temperature <= 0:
        raise ValueError(f"REBASE's temperature must be > 0, got {temperature}")
    if not scores or budget <= 0:
        return [0] * len(scores)
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    shares = [budget * w / sum(weights) for w in weights]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(scores)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: budget - sum(counts)]:
        counts[i] += 1
    return counts


class StepPolicy:
    """Samples the next step of many partial chains at once from any transformers causal LM (a RecurrentLM at a
    fixed depth), and answers the chains whose thinking ended."""

    def __init__(self, model, tokenizer, task_name: str, depth: int | None = None, temperature: float = 0.7,
                 max_steps: int = 32, max_thinking: int = 128, max_step_tokens: int = 32, batch_size: int = 32):
        self.model, self.tokenizer, self.task, self.depth = model, tokenizer, get_task(task_name), depth
        separator = self.task.require_steps()
        self.separator_id = single_token(tokenizer, separator, "step separator")
        self.end_id = single_token(tokenizer, THINK_END, "end-of-thinking delimiter")
        self.eos_id = tokenizer.eos_token_id
        self.temperature, self.max_steps, self.max_thinking = temperature, max_steps, max_thinking
        self.max_step_tokens, self.batch_size = max_step_tokens, batch_size
        for name, value in (("max_steps", max_steps), ("max_thinking", max_thinking),
                            ("max_step_tokens", max_step_tokens)):
            if value < 1:
                raise ValueError(f"search {name} must be >= 1, got {value}")

    def _continue(self, rows: list[list[int]], max_new: int, stops: list[int], sample: bool) -> list[list[int]]:
        sampling = dict(do_sample=True, temperature=self.temperature, top_k=0) if sample else dict(do_sample=False)
        out = []
        for start in range(0, len(rows), self.batch_size):
            out += generate_until(self.model, self.tokenizer, rows[start : start + self.batch_size], max_new, stops,
                                  None, {**sampling, **depth_kwargs(self.depth)})
        return out

    def prompt_flops(self, prompt_length: int) -> int:
        return causal_lm_forward_flops(self.model, prompt_length, 0, 1, self.depth)

    @torch.no_grad()
    def expand(self, problems: list[Problem], prompts: list[list[int]], expansions: list[tuple[Node, int]]
               ) -> tuple[list[Node], list[int]]:
        """`count` sampled next steps of each (node, count); the children, and each child's policy FLOPs."""
        parents = [node for node, count in expansions for _ in range(count)]
        if not parents:
            return [], []
        stops = [self.separator_id, self.end_id] + ([self.eos_id] if self.eos_id is not None else [])
        rows = [prompts[n.problem] + n.ids for n in parents]
        new = self._continue(rows, self.max_step_tokens, stops, sample=True)
        children, to_answer = [], []
        for parent, tokens in zip(parents, new):
            room = self.max_thinking - len(parent.ids)
            tokens = tokens[:room]
            ended = bool(tokens) and tokens[-1] in (self.end_id, self.eos_id)
            child = Node(parent.problem, parent.ids + tokens, list(parent.steps), list(parent.scores), parent.subtree)
            if tokens and tokens[-1] == self.eos_id:  # ended without ever closing its thinking: no answer
                child.steps.append(self.tokenizer.decode(tokens))
                child.done = True
            elif ended:  # closed its thinking (after what it wrote of a last step, if anything)
                if len(tokens) > 1:
                    child.steps.append(self.tokenizer.decode(tokens[:-1]))
                to_answer.append(child)
            else:
                child.steps.append(self.tokenizer.decode(tokens))
                if len(child.steps) >= self.max_steps or len(child.ids) >= self.max_thinking:
                    child.ids.append(self.end_id)  # the step limit or the thinking budget ends it (s1's maximum)
                    to_answer.append(child)
            children.append(child)
        self._answer(problems, prompts, to_answer)
        flops = [causal_lm_extend_flops(self.model, len(prompts[p.problem]) + len(p.ids), len(c.ids) - len(p.ids),
                                        self.depth) for p, c in zip(parents, children)]
        return children, flops

    def _answer(self, problems: list[Problem], prompts: list[list[int]], nodes: list[Node]) -> None:
        """Greedy answers after the end-of-thinking delimiter; the answer step joins each node's steps."""
        if not nodes:
            return
        longest = max(len(problems[n.problem].answer) for n in nodes) + 3
        answers = self._continue([prompts[n.problem] + n.ids for n in nodes], longest,
                                 [self.eos_id] if self.eos_id is not None else [], sample=False)
        for node, tokens in zip(nodes, answers):
            node.ids += tokens
            node.steps.append(self.tokenizer.decode([self.end_id] + tokens))
            node.answer = self.task.parse_answer(self.tokenizer.decode(tokens).replace(self.tokenizer.pad_token or "\0", ""))
            node.done = True


class TreeSearch(Method):
    """A step-level search strategy (subclasses say how expansions are allotted) at budgets of N leaves."""

    strategy: str

    def __init__(self, model, tokenizer, reward_model: RewardModel, task_name: str, budgets: list[int],
                 depth: int | None = None, temperature: float = 0.7, max_steps: int = 32, max_thinking: int = 128,
                 aggregation: str = "last", seed: int = 0, batch_size: int = 32):
        for n in budgets:
            if n < 1:
                raise ValueError(f"{self.strategy}: N must be >= 1, got {n}")
        aggregate([], aggregation)
        self.policy = StepPolicy(model, tokenizer, task_name, depth, temperature, max_steps, max_thinking,
                                 batch_size=batch_size)
        self.reward_model, self.budgets, self.depth = reward_model, list(budgets), depth
        self.aggregation, self.seed = aggregation, seed
        self.name = self.strategy

    def label_children(self, children: list[Node], n: int) -> None:
        """Where a strategy tags the first children (DVTS: their subtree)."""

    @abstractmethod
    def select(self, live: list[Node], leaves: list[Node], n: int) -> list[tuple[Node, int]]:
        """The expansions of the next round: (node, count) pairs among one problem's live nodes."""

    def search(self, problems: list[Problem], n: int) -> tuple[list[list[Node]], list[int], list[int]]:
        """The leaves of every problem's search at budget N, and each problem's policy and reward-model FLOPs."""
        prompts = [prompt_ids(self.policy.tokenizer, p, cot=True) for p in problems]
        texts = [get_task(p.task).prompt(p, cot=True) for p in problems]
        policy_flops = [self.policy.prompt_flops(len(ids)) for ids in prompts]
        reward_flops = [0] * len(problems)
        leaves: list[list[Node]] = [[] for _ in problems]
        frontier = [(Node(i), n) for i in range(len(problems))]  # every strategy starts with N first steps
        first = True
        while frontier:
            children, flops = self.policy.expand(problems, prompts, frontier)
            if first:
                self.label_children(children, n)
                first = False
            scored = self.reward_model.score_with_flops([texts[c.problem] for c in children], [c.steps for c in children])
            live: list[list[Node]] = [[] for _ in problems]
            for child, cost, (score, scoring_cost) in zip(children, flops, scored):
                child.scores = score  # per step (an ORM: one, for the chain so far)
                policy_flops[child.problem] += cost
                reward_flops[child.problem] += scoring_cost
                (leaves if child.done else live)[child.problem].append(child)
            frontier = [pair for i in range(len(problems)) for pair in self.select(live[i], leaves[i], n)]
        return leaves, policy_flops, reward_flops

    def run(self, problems: list[Problem], n: int) -> list[dict[str, Any]]:
        start = time.perf_counter()
        difficulty = problems[0].difficulty
        torch.manual_seed(zlib.crc32(f"{self.name}/{self.seed}/{difficulty}/{n}".encode()))
        leaves, policy_flops, reward_flops = self.search(problems, n)
        scores, tokens = [], []
        for problem, mine in zip(problems, leaves):
            answer = weighted_vote([leaf.answer for leaf in mine], [leaf.value(self.aggregation) for leaf in mine])
            scores.append(get_task(problem.task).score(answer, problem))
            tokens.append(sum(len(leaf.ids) for leaf in mine))  # the leaves' chains (pruned ones: in the FLOPs)
        total = [a + b for a, b in zip(policy_flops, reward_flops)]
        return [result_row(self.name, self.setting(n) + depth_label(self.depth), difficulty, scores, total, tokens,
                           time.perf_counter() - start, samples=n, steps=self.depth,
                           policy_flops=sum(policy_flops) / len(problems),
                           reward_flops=sum(reward_flops) / len(problems), aggregation=self.aggregation,
                           leaves=sum(map(len, leaves)) / len(problems))]

    def setting(self, n: int) -> str:
        return f"n={n}"


class WidthSearch(TreeSearch):
    """A strategy with a width M that every N must be a multiple of (beam search, DVTS)."""

    def __init__(self, *args, beam_width: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        if beam_width < 1:
            raise ValueError(f"{self.strategy}: the beam width M must be >= 1, got {beam_width}")
        bad = [n for n in self.budgets if n % beam_width]
        if bad:
            raise ValueError(f"{self.strategy}: N must be a multiple of the beam width M = {beam_width}; {bad} are not")
        self.beam_width = beam_width

    def setting(self, n):
        return f"n={n}, M={self.beam_width}"


class BeamSearch(WidthSearch):
    """Beam search over steps: N beams, each live round the best ceil(N' / M) nodes get M expansions."""

    strategy = "beam"

    def select(self, live, leaves, n):
        remaining = n - len(leaves)
        if remaining <= 0 or not live:
            return []
        kept = sorted(live, key=lambda node: -node.value(self.aggregation))[: math.ceil(remaining / self.beam_width)]
        counts = [min(self.beam_width, remaining - i * self.beam_width) for i in range(len(kept))]
        return [(node, count) for node, count in zip(kept, counts) if count > 0]


class DVTS(WidthSearch):
    """Diverse verifier tree search: N / M independent subtrees, each greedy on the reward model."""

    strategy = "dvts"

    def label_children(self, children, n):
        for index, child in enumerate(children):  # children come in problem order, n per problem
            child.subtree = (index % n) // self.beam_width

    def select(self, live, leaves, n):
        chosen = []
        for subtree in range(n // self.beam_width):
            remaining = self.beam_width - sum(leaf.subtree == subtree for leaf in leaves)
            mine = [node for node in live if node.subtree == subtree]
            if remaining > 0 and mine:
                chosen.append((max(mine, key=lambda node: node.value(self.aggregation)), remaining))
        return chosen


class REBASE(TreeSearch):
    """Reward-balanced search: the remaining budget split over the live nodes by softmax(score / T)."""

    strategy = "rebase"

    def __init__(self, *args, temperature_rebase: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        softmax_allocation([0.0], 1, temperature_rebase)
        self.balance_temperature = temperature_rebase

    def select(self, live, leaves, n):
        counts = softmax_allocation([node.value(self.aggregation) for node in live], n - len(leaves),
                                    self.balance_temperature)
        return [(node, count) for node, count in zip(live, counts) if count > 0]

    def setting(self, n):
        return f"n={n}, T={self.balance_temperature:g}"


STRATEGIES = {cls.strategy: cls for cls in (BeamSearch, DVTS, REBASE)}
