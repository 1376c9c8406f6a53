"""`rlm select-traces`: s1's data selection (Muennighoff et al. 2025, arXiv 2501.19393, section 2) from a pool of
reasoning traces down to N, by three rules applied in turn, each reporting how many it dropped:

1. quality: every trace well-formed (its question, thinking, answer, and where used its domain and gold answer
   present and non-empty); with a task, an answer that the task's parse rule reads (within the task's alphabet),
   and a gold answer that it reads too (one that does not is an error: the pool cannot be checked);
2. difficulty: with a model, the traces whose problem the model fails at a thinking budget (greedy s1 budget
   forcing, eval/budget_forcing.py); the problems it solves are dropped. With a model or not, longer thinking
   counts as harder: within a domain, the longest traces come first;
3. diversity: spread over domains (task families, or any domain field): round-robin over the domains, each one's
   longest traces first, or s1's sampling (a domain uniformly at random, then a trace of it with probability
   proportional to 2^-rank of its thinking length, longest first), until N are chosen.

A pool with exact answers comes from the project's tasks: `rlm tasks export chain,permutation pool.jsonl --format
traces`.
"""

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from recurrent_lm.options import DEPTH, ranges
from recurrent_lm.outputs import claimed_output
from recurrent_lm.problem import Problem, Task
from recurrent_lm.special_tokens import EOS
from recurrent_lm.tasks import get_task
from recurrent_lm.traces import (ANSWER_FIELD, QUESTION_FIELD, THINKING_FIELD, Trace, TraceError,
                                 add_thinking_delimiters, field_text, parse_trace, read_rows, save_rows, thinking_length,
                                 trace_prompt, trace_sources, uses_chat_template)

DIVERSITY = ("round-robin", "uniform-domain")


def task_answer(task: Task, text: str) -> str | None:
    """The answer the task's parse rule reads in a text, if it lies within the task's alphabet (where the task has
    one); None otherwise."""
    answer = task.parse_answer(text)
    if answer is None or (task.alphabet and not set(answer) <= set(task.alphabet)):
        return None
    return answer


class Candidate:
    """A trace in the pool, with what the rules read from it."""

    def __init__(self, trace: Trace, domain: str, gold: str | None, order: int):
        self.trace, self.domain, self.gold, self.order = trace, domain, gold, order
        self.length = 0


class Tally:
    """How many traces each rule dropped, and the first of each (to show)."""

    def __init__(self):
        self.dropped: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def drop(self, rule: str, why: str) -> None:
        self.dropped[rule] = self.dropped.get(rule, 0) + 1
        self.first.setdefault(rule, why)

    def line(self, rule: str, what: str) -> str:
        count = self.dropped.get(rule, 0)
        return f"  {what}: {count} dropped" + (f" (first: {self.first[rule]})" if count else "")


@ranges(n=">= 1", budget=">= 0", num_steps=DEPTH, batch_size=">= 1", max_answer_tokens=">= 1", seed=">= 0")
def select_traces(
    pool: str,
    out: str,
    n: int = 1000,
    question_field: str = QUESTION_FIELD,
    thinking_field: str = THINKING_FIELD,
    answer_field: str = ANSWER_FIELD,
    gold_field: str = "answer",
    domain_field: str | None = "domain",
    task: str | None = None,
    require_correct: bool = False,
    model: Path | None = None,
    budget: int | None = None,
    num_steps: int | None = None,
    chat_template: bool = True,
    batch_size: int = 16,
    max_answer_tokens: int | None = None,
    tokenizer: Path | None = None,
    diversity: Literal["round-robin", "uniform-domain"] = "round-robin",
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Select N reasoning traces from a pool by s1's three rules (quality, difficulty, diversity) and write them as JSONL.

    Prints how many traces each rule dropped. The rows are written as they were read, every field kept, in the
    order chosen; `rlm finetune --data.train_files [OUT]` trains on them.

    Args:
        pool: the pool of traces: a JSONL file, several comma-separated, a parquet or .json file, or one hub dataset
            named hub:NAME (needs the network).
        out: the JSONL file to write.
        n: how many traces to keep (fewer if fewer pass the rules).
        question_field: the field holding the question.
        thinking_field: the field holding the thinking trajectory (a string, or a list of strings joined with "\\n").
        answer_field: the field holding the answer written after the thinking (s1K's attempt).
        gold_field: the field holding the gold answer, which checks the model's answers (difficulty with --model)
            and, with --task, must parse; needed only then.
        domain_field: the field naming each trace's domain (the task family for `rlm tasks export --format
            traces`), over which diversity spreads; null: one domain.
        task: check answers with this task's rules (see `rlm tasks list`): a trace whose answer the task's parse
            rule cannot read (or holds characters outside the task's alphabet) is dropped; a gold answer it cannot
            read is an error; the model's answers are scored by the task's scorer.
        require_correct: with --task, also drop the traces whose answer the task scores wrong against the gold one.
        model: a causal LM directory (a shipped name too): keep only the problems it gets wrong when thinking at
            most --budget tokens (greedy budget forcing, one run per trace). Without a model, difficulty is the
            thinking's length alone.
        budget: the model's thinking budget in tokens (needed with --model).
        num_steps: a recurrent model's depth (default: its own); nothing for other models.
        chat_template: prompt the model through its tokenizer's chat template where it has one (as `rlm finetune`
            renders traces).
        batch_size: problems generated together.
        max_answer_tokens: the model's answer length at most, after thinking; default: the gold answer's tokens + 3.
        tokenizer: count thinking lengths in this tokenizer's tokens (default: the model's with --model, else
            characters).
        diversity: "round-robin" over the domains (in the order they first appear), each one's longest traces
            first; "uniform-domain": s1's sampling, a domain uniformly at random, then one of its traces with weight
            2^-rank by thinking length (longest first), seeded by --seed.
        seed: seeds uniform-domain sampling.
        overwrite: replace an existing `out`.
    """
    if diversity not in DIVERSITY:
        raise ValueError(f"--diversity must be one of {DIVERSITY}, got {diversity!r}")
    if model is not None and budget is None:
        raise ValueError("--model needs a thinking budget: --budget B with B >= 0")
    checker = get_task(task) if task is not None else None
    sources = trace_sources([part.strip() for part in str(pool).split(",") if part.strip()])
    with claimed_output(out, option="--out", kind="file", overwrite=overwrite, inputs=[*sources, model, tokenizer],
                        command="rlm select-traces") as output:
        tally = Tally()

        # 1. quality
        candidates, seen = [], 0
        need_gold = checker is not None or model is not None
        for source in sources:
            for location, row in read_rows(source):
                seen += 1
                try:
                    trace = parse_trace(row, location, question_field, thinking_field, answer_field)
                    domain = field_text(row, domain_field, location) if domain_field else ""
                    gold = field_text(row, gold_field, location) if need_gold else None
                except TraceError as error:
                    tally.drop("malformed", str(error))
                    continue
                if checker is not None:
                    if task_answer(checker, gold) is None:
                        raise ValueError(f"{location}: the gold answer {gold!r} (field {gold_field!r}) does not parse as "
                                         f"a {checker.name!r} answer: the gold answers must be checkable")
                    answer = task_answer(checker, trace.answer)
                    if answer is None:
                        tally.drop("unparseable", f"{location}: {trace.answer[:40]!r}")
                        continue
                    if require_correct and checker.score(answer, gold_problem(checker, trace, gold)) < 1:
                        tally.drop("wrong", f"{location}: {answer!r} against {gold!r}")
                        continue
                candidates.append(Candidate(trace, domain, gold, len(candidates)))
        if seen == 0:
            raise ValueError(f"the pool {', '.join(sources)} holds no traces")
        print(f"pool: {seen} traces in {', '.join(sources)}")
        print("quality:")
        print(tally.line("malformed", "malformed (a field missing, empty or not text)"))
        if checker is not None:
            print(tally.line("unparseable", f"answers that {checker.name!r} cannot parse"))
            if require_correct:
                print(tally.line("wrong", "wrong answers"))

        # 2. difficulty
        length_tokenizer = None
        if model is not None:
            candidates, length_tokenizer = keep_unsolved(candidates, tally, model, budget, num_steps, checker, chat_template,
                                                         batch_size, max_answer_tokens)
            print("difficulty:")
            print(tally.line("solved", f"solved by {model} within {budget} thinking tokens"))
        if tokenizer is not None:
            from recurrent_lm.loading import load_tokenizer

            length_tokenizer = load_tokenizer(tokenizer)
        for candidate in candidates:
            candidate.length = thinking_length(candidate.trace, length_tokenizer)
        unit = "tokens" if length_tokenizer is not None else "characters"
        if model is None:
            print(f"difficulty: longest thinking first ({unit}), none dropped")
        if not candidates:
            first = next(iter(tally.first.values()), "")
            raise ValueError(f"none of the pool's {seen} traces passes the rules (dropped: {tally.dropped}; the first: "
                             f"{first})")

        # 3. diversity
        chosen = spread(candidates, n, diversity, random.Random(seed))
        domains = len({c.domain for c in candidates})
        for _ in range(len(candidates) - len(chosen)):
            tally.drop("diversity", "")
        print(f"diversity: {len(chosen)} kept over {domains} domain{'s' * (domains != 1)} ({diversity}), "
              f"{tally.dropped.get('diversity', 0)} dropped")
        if len(chosen) < n:
            print(f"only {len(chosen)} traces pass the rules, fewer than --n {n}")
        save_rows([c.trace.row for c in chosen], output.path)
    print(f"wrote {len(chosen)} traces to {out}")
    return {"path": str(out), "kept": len(chosen), "dropped": dict(tally.dropped)}


def gold_problem(task: Task, trace: Trace, gold: str) -> Problem:
    """The problem a trace poses, as the task's scorer reads it."""
    difficulty = trace.row.get("difficulty", 1)
    return Problem(task.name, int(difficulty) if isinstance(difficulty, int) else 1, trace.question, gold)


def spread(candidates: Sequence[Candidate], n: int, diversity: str, rng: random.Random) -> list[Candidate]:
    """Up to n candidates spread over their domains, each domain's longest thinking first."""
    by_domain: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_domain.setdefault(candidate.domain, []).append(candidate)
    for members in by_domain.values():
        members.sort(key=lambda c: (-c.length, c.order))
    chosen = []
    if diversity == "round-robin":
        while len(chosen) < n and any(by_domain.values()):
            for members in by_domain.values():
                if members and len(chosen) < n:
                    chosen.append(members.pop(0))
        return chosen
    while len(chosen) < n and any(by_domain.values()):  # s1: a domain uniformly, then 2^-rank within it
        members = by_domain[rng.choice([d for d, m in by_domain.items() if m])]
        index = rng.choices(range(len(members)), weights=[2.0 ** -rank for rank in range(len(members))])[0]
        chosen.append(members.pop(index))
    return chosen


def generation_prompt(tokenizer, question: str, chat_template: bool) -> str:
    """The prompt as text for budget forcing (which encodes it with the tokenizer's special tokens): a chat
    template's own leading bos is left to the tokenizer, so that it is not written twice."""
    prompt = trace_prompt(tokenizer, question, chat_template)
    bos = tokenizer.bos_token
    if (uses_chat_template(tokenizer, chat_template) and bos and prompt.startswith(bos)
            and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]):
        prompt = prompt[len(bos):]
    return prompt


def keep_unsolved(candidates: list[Candidate], tally: Tally, model: Path, budget: int, num_steps: int | None,
                  checker: Task | None, chat_template: bool, batch_size: int, max_answer_tokens: int | None):
    """The candidates whose problem the model gets wrong with greedy budget forcing at the budget, and its
    tokenizer."""
    from recurrent_lm.eval.budget_forcing import budget_forced_generate
    from recurrent_lm.eval.cot import depth_kwargs
    from recurrent_lm.loading import load_any_causal_lm, load_tokenizer

    net, tok = load_any_causal_lm(model), load_tokenizer(model)
    add_thinking_delimiters(tok, net)  # a base model without them reads them as new (mean-initialised) tokens
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kept = []
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        prompts = [generation_prompt(tok, c.trace.question, chat_template) for c in chunk]
        answer_tokens = (max_answer_tokens if max_answer_tokens is not None
                         else max(len(tok(c.gold, add_special_tokens=False).input_ids) for c in chunk) + 3)
        results = budget_forced_generate(net, tok, prompts, max_thinking=budget, max_answer_tokens=answer_tokens,
                                         do_sample=False, **depth_kwargs(num_steps))
        for candidate, result in zip(chunk, results):
            text = result.answer_text.split(EOS, 1)[0]  # the tokenizer's eos, written as EOS; padding dropped
            if checker is not None:
                right = checker.score(task_answer(checker, text), gold_problem(checker, candidate.trace, candidate.gold))
            else:
                right = float(text.strip() == candidate.gold.strip())
            if right >= 1:
                tally.drop("solved", f"{candidate.trace.location}: answered {text.strip()[:40]!r}")
            else:
                kept.append(candidate)
    return kept, tok
