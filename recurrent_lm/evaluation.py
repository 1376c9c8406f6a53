"""Answering task problems with a model: batched generation, parsing and scoring. Every evaluation in the project
(training-time validation, depth sweeps, comparisons) goes through `answer_problems`."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import collate
from .tasks import Problem, get_task


@dataclass
class Answer:
    problem: Problem
    generated: str  # the text generated after the prompt
    answer: str | None  # parsed from it
    score: float  # the task's scorer
    new_tokens: int  # tokens generated (up to and including eos)
    steps_per_token: list[int] | None = None  # core steps of each generated token (recurrent models)


@torch.no_grad()
def answer_problems(model, tokenizer, problems: Sequence[Problem], cot: bool = False, max_new_tokens: int | None = None,
                    batch_size: int = 64, **generate_kwargs) -> list[Answer]:
    """Greedy answers to problems (left-padded batches). generate_kwargs go to model.generate (num_steps,
    exit_criterion, ... for a RecurrentLM)."""
    answers = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        tasks = [get_task(p.task) for p in chunk]
        prompts = [{"input_ids": [tokenizer.bos_token_id] + tokenizer(t.prompt(p, cot), add_special_tokens=False).input_ids}
                   for t, p in zip(tasks, chunk)]
        batch = collate(prompts, tokenizer.pad_token_id, padding_side="left")
        budget = max_new_tokens or max(len(tokenizer(t.completion(p, cot), add_special_tokens=False).input_ids)
                                       for t, p in zip(tasks, chunk)) + 2
        settings = dict(do_sample=False, max_new_tokens=budget, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True)
        out = model.generate(batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                             **{**settings, **generate_kwargs})
        new = out.sequences[:, batch["input_ids"].shape[1]:].cpu()
        steps = getattr(out, "steps_per_token", None)
        for i, (task, problem) in enumerate(zip(tasks, chunk)):
            ids = new[i].tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            text = tokenizer.decode(ids, skip_special_tokens=False).replace(tokenizer.pad_token, "")
            parsed = task.parse_answer(text, cot)
            answers.append(Answer(problem, text, parsed, task.score(parsed, problem), len(ids),
                                  steps[i, : len(ids)].tolist() if steps is not None else None))
    return answers


def accuracy(answers: Sequence[Answer]) -> float:
    return sum(a.score for a in answers) / len(answers) if answers else float("nan")
