"""Answering task problems with a model: batched generation, parsing and scoring. Every evaluation in the project
(training-time validation, depth sweeps, comparisons) goes through `answer_problems`."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adaptive import AdaptiveExit
from .data import collate, completion_text, generated_text, hint_labels, prompt_ids, prompt_text
from .flops import generation_flops, positions_flops
from .model import declared_arguments
from .tasks import Problem, get_task


@dataclass
class Answer:
    problem: Problem
    generated: str  # the text generated after the prompt
    answer: str | None  # parsed from it
    score: float  # the task's scorer
    new_tokens: int  # tokens generated (up to and including eos)
    prompt_tokens: int  # tokens of the prompt (bos included)
    steps_per_token: list[int] | None = None  # core steps of each generated token (recurrent models)
    prompt_steps: list[int] | None = None  # core steps each prompt position ran (bos included, padding not)


@torch.no_grad()
def answer_problems(model, tokenizer, problems: Sequence[Problem], cot: bool = False, max_new_tokens: int | None = None,
                    batch_size: int = 64, **generate_kwargs) -> list[Answer]:
    """Greedy answers to problems (left-padded batches). generate_kwargs go to model.generate (num_steps,
    exit_criterion, ... for a RecurrentLM)."""
    read = [i for i, p in enumerate(problems) if get_task(p.task).answered_at_hints]
    if read:  # answered in one forward pass over the prompt; the others generate
        written = sorted(set(range(len(problems))) - set(read))
        both = dict(zip(read, read_answers(model, tokenizer, [problems[i] for i in read], batch_size, cot,
                                           **generate_kwargs)))
        both.update(zip(written, answer_problems(model, tokenizer, [problems[i] for i in written], cot,
                                                 max_new_tokens, batch_size, **generate_kwargs)))
        return [both[i] for i in range(len(problems))]
    answers = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        tasks = [get_task(p.task) for p in chunk]
        prompts = [{"input_ids": prompt_ids(tokenizer, p, cot)} for p in chunk]
        batch = collate(prompts, tokenizer.pad_token_id, padding_side="left")
        budget = max_new_tokens if max_new_tokens is not None else max(
            len(tokenizer(completion_text(tokenizer, p, cot), add_special_tokens=False).input_ids) for p in chunk) + 2
        settings = dict(do_sample=False, max_new_tokens=budget, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True)
        out = model.generate(batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                             **{**settings, **generate_kwargs})
        new = out.sequences[:, batch["input_ids"].shape[1]:].cpu()
        steps = getattr(out, "steps_per_token", None)
        prompt_steps = getattr(out, "prompt_steps", None)
        for i, (task, problem) in enumerate(zip(tasks, chunk)):
            ids = new[i].tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            text = generated_text(tokenizer, ids)
            parsed = task.parse_answer(text, cot)
            real = batch["attention_mask"][i].bool()
            answers.append(Answer(problem, text, parsed, task.score(parsed, problem), len(ids), int(real.sum()),
                                  steps[i, : len(ids)].tolist() if steps is not None else None,
                                  prompt_steps[i][real].tolist() if prompt_steps is not None else None))
    return answers


@torch.no_grad()
def read_answers(model, tokenizer, problems: Sequence[Problem], batch_size: int = 64, cot: bool = False,
                 **generate_kwargs) -> list[Answer]:
    """Answers of tasks answered at their hints (prefix sums): one forward pass over each left-padded batch of
    prompts, the greedy prediction at every hint position, joined. The depth arguments of generate_kwargs that
    the model's forward takes (num_steps, init_scale, exit_criterion, exit_threshold, min_steps) apply to every
    position; prompt_num_steps, where given, is the depth (fixed, no exit). prompt_steps records the steps each
    position ran."""
    if cot:
        raise ValueError(f"task {problems[0].task!r} is answered at every position of its prompt: it has no chain "
                         "of thought to answer with")
    settings = dict(generate_kwargs)
    if settings.get("prompt_num_steps") is not None:
        settings.update(num_steps=settings["prompt_num_steps"], exit_criterion=None, exit_threshold=None)
    accepted = declared_arguments(type(model).forward) - {"input_ids", "attention_mask", "labels"}
    settings = {k: v for k, v in settings.items() if k in accepted and v is not None}
    answers = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        encoded = [tokenizer(prompt_text(tokenizer, p), return_offsets_mapping=True,
                             return_special_tokens_mask=True) for p in chunk]
        batch = collate([{"input_ids": e["input_ids"]} for e in encoded], tokenizer.pad_token_id, padding_side="left")
        out = model(batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                    **settings)
        predicted = out.logits.argmax(-1).cpu()
        steps_used = getattr(out, "steps_used", None)
        for i, (problem, e) in enumerate(zip(chunk, encoded)):
            pad = batch["input_ids"].shape[1] - len(e["input_ids"])
            ids = [int(predicted[i, pad + index - 1]) for index, _ in hint_labels(tokenizer, e, problem.hints)]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            task = get_task(problem.task)
            real = batch["attention_mask"][i].bool()
            answers.append(Answer(problem, text, text, task.score(text, problem), 0, int(real.sum()), None,
                                  steps_used[i][real].tolist() if steps_used is not None else None))
    return answers


def accuracy(answers: Sequence[Answer]) -> float:
    return sum(a.score for a in answers) / len(answers) if answers else float("nan")


def answer_flops(config, answer: Answer, max_steps: int, exit_criterion: str | None = None,
                 prompt_exit: bool = True) -> int:
    """FLOPs a recurrent model spent on one answer, as if run alone (`generated_flops`)."""
    return generated_flops(config, answer.prompt_tokens, answer.new_tokens, answer.steps_per_token,
                           answer.prompt_steps, max_steps, exit_criterion, prompt_exit)


def generated_flops(config, prompt_tokens: int, new_tokens: int, steps_per_token: Sequence[int] | None,
                    prompt_steps: Sequence[int] | None, max_steps: int, exit_criterion: str | None = None,
                    prompt_exit: bool = True) -> int:
    """FLOPs a recurrent model spent generating one sequence, as if run alone: the prompt's forward pass (each
    position charged the steps it ran), one forward per further generated token at its own depth, and the exit
    checks that cost compute: the logit-lens passes of a logit-based criterion, or the learned gate's evaluations
    (after every step a position ran but the last one possible). prompt_exit False: the prompt ran a fixed depth,
    without checks. Steps default to max_steps where not recorded. An answer with no generated token was read at
    the prompt's positions (read_answers): one forward over the prompt with logits at every position."""
    rule = AdaptiveExit(exit_criterion) if exit_criterion is not None else None
    lens, gate = (rule is not None and rule.needs_logits), (rule is not None and rule.criterion == "gate")

    def checks(steps_run: list[int], costly: bool) -> list[int]:
        return [min(s, max_steps - 1) if costly else 0 for s in steps_run]

    steps = list(steps_per_token or [max_steps] * new_tokens)
    prompt = list(prompt_steps or [steps[0] if steps else max_steps] * prompt_tokens)
    if not steps:  # an answer read at every prompt position (read_answers): one forward, logits everywhere
        return positions_flops(config, prompt, logit_tokens=prompt_tokens,
                               lens_decodes=checks(prompt, lens), gate_checks=checks(prompt, gate)).flops
    return generation_flops(config, prompt_tokens, steps, prompt_steps=prompt,
                            lens_decodes=checks(steps, lens), prompt_lens_decodes=checks(prompt, lens and prompt_exit),
                            gate_checks=checks(steps, gate), prompt_gate_checks=checks(prompt, gate and prompt_exit)).flops
