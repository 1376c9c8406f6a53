"""Token-level test-time scaling for any transformers causal LM: s1 budget forcing and parallel sampling.

Budget forcing (Muennighoff et al. 2025, arXiv 2501.19393), in plain transformers (the reference needs vLLM):
- maximum: thinking stops after at most `max_thinking` tokens (inserted "Wait"s included); then the end-of-thinking
  delimiter (plus `answer_prompt`, when the budget cut it) is appended and the answer is generated;
- minimum / extension: the end-of-thinking delimiter is suppressed until `min_thinking` tokens, and replaced by
  `wait_text` the first `num_waits` times the model emits it.
Rows of a batch proceed together; each round regenerates from the text so far (no cache carried between
rounds), while FLOPs are counted for one continuous cached generation (recurrent_lm.flops).
"""

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from recurrent_lm.data import collate, generated_text, prompt_format, single_token
from recurrent_lm.tokenization import THINK_END, THINK_START


@dataclass
class BudgetResult:
    thinking_ids: list[int]  # everything between the delimiters, inserted "Wait"s included
    answer_ids: list[int]
    thinking: str
    answer_text: str  # as the task's parser reads it (recurrent_lm.data.generated_text: eos written as EOS, no padding)
    waits_inserted: int
    cut_by_budget: bool
    prompt_tokens: int
    new_tokens: int  # every token after the prompt: thinking, delimiters, answer prompt, answer
    extra: dict = field(default_factory=dict)


class SuppressUntil(LogitsProcessor):
    """Bans `token_ids` for rows that have produced fewer than `minimum[row]` new tokens since `start`."""

    def __init__(self, token_ids: Sequence[int], start: int, minimum: Sequence[int]):
        self.token_ids, self.start, self.minimum = list(token_ids), start, torch.tensor(minimum)

    def __call__(self, input_ids, scores):
        produced = input_ids.shape[1] - self.start
        banned = (self.minimum.to(scores.device) > produced)
        if banned.any():
            scores[banned.nonzero()[:, :1], torch.tensor(self.token_ids, device=scores.device)] = -float("inf")
        return scores


def generate_until(model, tokenizer, rows: list[list[int]], max_new_tokens: int, stop_ids: list[int],
              processors: LogitsProcessorList | None, generate_kwargs: dict) -> list[list[int]]:
    """Continue each row by up to max_new_tokens tokens, stopping at any of stop_ids (kept in the output)."""
    batch = collate([{"input_ids": r} for r in rows], tokenizer.pad_token_id, padding_side="left")
    out = model.generate(batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                         max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                         logits_processor=processors, **generate_kwargs)
    if not isinstance(out, torch.Tensor):
        out = out.sequences
    continuations = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        continuations.append(row[:cut])
    return continuations


@torch.no_grad()
def budget_forced_generate(model, tokenizer, prompts: Sequence[str], max_thinking: int | None = None,
                           min_thinking: int = 0, num_waits: int = 0, wait_text: str = "Wait",
                           answer_prompt: str = "", max_answer_tokens: int = 16, think_start: str = THINK_START,
                           think_end: str = THINK_END, **generate_kwargs) -> list[BudgetResult]:
    """Think-then-answer generation with s1 budget forcing. Each prompt should end where thinking starts (with
    `think_start`, which is appended if missing). generate_kwargs go to model.generate (do_sample, temperature,
    num_steps for a recurrent model, ...)."""
    if max_thinking is not None and max_thinking < 0:
        raise ValueError(f"the thinking budget must be >= 0, got {max_thinking}")
    if min_thinking < 0 or num_waits < 0:
        raise ValueError(f"min_thinking and num_waits must be >= 0, got {min_thinking}, {num_waits}")
    if max_thinking is not None and min_thinking > max_thinking:
        raise ValueError(f"min_thinking ({min_thinking}) > max_thinking ({max_thinking})")
    start_id, end_id = (single_token(tokenizer, text, "thinking delimiter") for text in (think_start, think_end))
    wait_ids = tokenizer(wait_text, add_special_tokens=False).input_ids if num_waits else []
    answer_prompt_ids = tokenizer(answer_prompt, add_special_tokens=False).input_ids if answer_prompt else []
    budget = max_thinking if max_thinking is not None else 10**9
    prefixes = []
    for prompt in prompts:
        # with the tokenizer's own special tokens (bos, for ours), except a chat template's text, which has its own
        ids = tokenizer(prompt, add_special_tokens=prompt_format(tokenizer) == "plain").input_ids
        prefixes.append(ids if ids and ids[-1] == start_id else ids + [start_id])
    thinking = [[] for _ in prompts]
    waits = [0] * len(prompts)
    cut = [budget == 0] * len(prompts)
    active = [i for i in range(len(prompts)) if budget > 0]
    stop_ids = [end_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    limit = getattr(model.config, "max_position_embeddings", None) or 10**6
    while active:
        rows = [prefixes[i] + thinking[i] for i in active]
        # room for the answer phase is kept: delimiter, answer prompt and answer must fit the position limit
        room = min(max(budget - len(thinking[i]) for i in active),
                   limit - max(len(r) for r in rows) - 1 - len(answer_prompt_ids) - max_answer_tokens)
        if room <= 0:
            for i in active:
                cut[i] = True
            break
        minimum = [max(0, min_thinking - len(thinking[i])) for i in active]
        processors = LogitsProcessorList([SuppressUntil(stop_ids, max(len(r) for r in rows), minimum)]) if any(minimum) else None
        continuations = generate_until(model, tokenizer, rows, room, stop_ids, processors, generate_kwargs)
        still = []
        for i, new in zip(active, continuations):
            remaining = budget - len(thinking[i])
            ended = bool(new) and new[-1] in stop_ids and len(new) <= remaining
            thinking[i] += (new[:-1] if ended else new)[:remaining]
            if not ended:  # the budget (or the room left before the position limit) ran out
                cut[i] = True
                continue
            if waits[i] < num_waits and len(thinking[i]) + len(wait_ids) <= budget:
                thinking[i] += wait_ids  # s1: suppress the end of thinking, append "Wait", think on
                waits[i] += 1
                still.append(i)
        active = still
    answers_in = [prefixes[i] + thinking[i] + [end_id] + (answer_prompt_ids if cut[i] else []) for i in range(len(prompts))]
    answer_stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answers = generate_until(model, tokenizer, answers_in, max_answer_tokens, answer_stop, None, generate_kwargs)
    results = []
    for i in range(len(prompts)):
        appended = 1 + (len(answer_prompt_ids) if cut[i] else 0)
        results.append(BudgetResult(
            thinking_ids=thinking[i], answer_ids=answers[i], thinking=tokenizer.decode(thinking[i]),
            answer_text=generated_text(tokenizer, answers[i]), waits_inserted=waits[i], cut_by_budget=cut[i],
            prompt_tokens=len(prefixes[i]), new_tokens=len(thinking[i]) + appended + len(answers[i])))
    return results


# --- parallel scaling ---------------------------------------------------------------------------------------------


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (None = no answer, never voted for); ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """The answer whose samples' weights sum highest (weighted best-of-N); ties go to the one seen first."""
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + w
    return max(totals, key=totals.get) if totals else None


def best_of_n(answers: Sequence[str | None], scores: Sequence[float], weighted: bool = False) -> str | None:
    """The answer of the best-scored sample. Scores are log-probabilities (or any log-scale score); weighted: the
    answer whose samples' probabilities exp(score) sum highest (weighted best-of-N)."""
    if weighted:
        return weighted_vote(answers, [math.exp(s) for s in scores])
    ranked = [(s, i) for i, (a, s) in enumerate(zip(answers, scores)) if a is not None]
    return answers[max(ranked)[1]] if ranked else None


def model_logprob_scorer(model, **forward_kwargs) -> Callable[[list[int], list[int]], float]:
    """A best-of-N scorer from the model itself: the mean log-probability of the answer tokens given the prompt
    and thinking. (The task's gold checker is never a scorer: that would be an oracle.)"""

    @torch.no_grad()
    def score(context_ids: list[int], answer_ids: list[int]) -> float:
        if not answer_ids:
            return -float("inf")
        ids = torch.tensor([context_ids + answer_ids], device=model.device)
        logits = model(ids, **forward_kwargs).logits[0, len(context_ids) - 1 : -1].float()
        return float(logits.log_softmax(-1).gather(-1, ids[0, len(context_ids):, None]).mean())

    return score


# --- s1 metrics ------------------------------------------------------------------------------------------------------


def s1_metrics(accuracy_by_budget: dict[int, float], thinking_lengths: dict[int, Sequence[int]],
               min_thinking: int = 0) -> dict[str, float]:
    """Control: share of runs whose thinking length stays within [min_thinking, budget]; Scaling: mean slope
    (f(b) - f(a)) / (b - a) over pairs of budgets a < b; Performance: the best accuracy over budgets."""
    runs = [(budget, length) for budget, lengths in thinking_lengths.items() for length in lengths]
    control = sum(min_thinking <= length <= budget for budget, length in runs) / len(runs) if runs else float("nan")
    budgets = sorted(accuracy_by_budget)
    slopes = [(accuracy_by_budget[b] - accuracy_by_budget[a]) / (b - a) for i, a in enumerate(budgets) for b in budgets[i + 1:]]
    return {"control": control, "scaling": sum(slopes) / len(slopes) if slopes else float("nan"),
            "performance": max(accuracy_by_budget.values()) if accuracy_by_budget else float("nan")}
