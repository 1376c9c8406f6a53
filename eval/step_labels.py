"""Step labels for training and judging process reward models, from the policy's own sampled chains of thought:
- "exact":    the task's step checker (recurrent_lm.problem.Task.step_labels), where the task has one;
- "rollouts": Math-Shepherd's labels (arXiv 2312.08935) for any task with an answer checker: a thinking step is
              good if any of `rollouts` completions sampled from the chain up to it reaches the right answer ("hard
              estimation"; the share that do is kept too), and the answer step is good when its answer is right.
`rlm label-steps` writes them as JSONL, one chain a line: {"problem": {...}, "steps": [...], "labels": [...]}
(plus "rollout_success" with rollouts), which `rlm train` reads with data.step_chains (recurrent_lm.data.load_step_chains).
"""

import json
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

import random

from recurrent_lm.data import labelled_chain, prompt_ids
from recurrent_lm.loading import load_any_causal_lm, load_tokenizer
from recurrent_lm.options import DEPTH, PROBLEMS, ranges
from recurrent_lm.outputs import claimed_output
from recurrent_lm.problem import Problem
from recurrent_lm.special_tokens import THINK_END
from recurrent_lm.tasks import IntList, get_task, parse_int_list

from .budget_forcing import generate_until
from .cot import chain_steps, cot_runs, depth_kwargs
from .reward_models import RewardModel, step_label_accuracy

LABEL_SEED = 900_000


@torch.no_grad()
def rollout_labels(model, tokenizer, problem: Problem, steps: list[str], rollouts: int = 4, budget: int = 128,
                   temperature: float = 1.0, depth: int | None = None) -> tuple[list[bool], list[float]]:
    """Math-Shepherd labels of one chain's steps, and the share of rollouts from each step that reach the answer."""
    task = get_task(problem.task)
    prompt = prompt_ids(tokenizer, problem, cot=True)
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    thinking = [i for i, step in enumerate(steps) if not step.startswith(THINK_END)]
    rows, prefixes = [], []
    for i in thinking:
        prefix = "".join(steps[: i + 1])
        rows += [prompt + tokenizer(prefix, add_special_tokens=False).input_ids] * rollouts
        prefixes.append(prefix)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, **depth_kwargs(depth))
    continuations = generate_until(model, tokenizer, rows, budget + len(problem.answer) + 3, stops, None, sampling) \
        if rows else []
    shares = {}
    for j, (i, prefix) in enumerate(zip(thinking, prefixes)):
        mine = continuations[j * rollouts : (j + 1) * rollouts]
        right = [task.score(task.parse_answer(prefix + tokenizer.decode(c), cot=True), problem) for c in mine]
        shares[i] = sum(right) / rollouts
    labels, success = [], []
    for i, step in enumerate(steps):
        if i in shares:
            labels.append(shares[i] > 0)
            success.append(shares[i])
        else:  # the answer step: its own answer, checked
            right = task.score(task.parse_answer(step, cot=True), problem)
            labels.append(right == 1.0)
            success.append(right)
    return labels, success


def judge_reward_model(scorer: RewardModel, policy, tokenizer, problems: list[Problem], samples: int = 4,
                       temperature: float = 1.0, budget: int = 128, depth: int | None = None) -> list[dict]:
    """A PRM's step-label accuracy (step_label_accuracy) on the problems of one difficulty, against the exact
    checker's labels, on two kinds of chains: worked solutions with one step corrupted in half of them (its
    training distribution) and chains sampled from the policy (the errors search meets)."""
    task, difficulty = get_task(problems[0].task), problems[0].difficulty
    prompts = [task.prompt(p, cot=True) for p in problems]
    corrupted = [labelled_chain(task, p, 0.5, random.Random(f"judge/{difficulty}/{i}")) for i, p in enumerate(problems)]
    rows = [{"difficulty": difficulty, "chains": "corrupted", **step_label_accuracy(
        scorer, prompts, [c for c, _ in corrupted], [labels for _, labels in corrupted])}]
    runs = cot_runs(policy, tokenizer, problems, budget, depth, samples=samples, temperature=temperature)
    sampled = [(prompt, chain_steps(tokenizer, run.result, task), problem)
               for prompt, problem, chains in zip(prompts, problems, runs) for run in chains]
    rows.append({"difficulty": difficulty, "chains": f"policy (T={temperature:g})", **step_label_accuracy(
        scorer, [p for p, _, _ in sampled], [c for _, c, _ in sampled],
        [task.step_labels(problem, c) for _, c, problem in sampled])})
    return rows


@ranges(n=PROBLEMS, samples=">= 1", temperature="> 0", budget=">= 0", rollouts=">= 1", depth=DEPTH, seed=">= 0")
def label_steps(policy: Path, task: str, difficulties: IntList = "1-4", n: int = 64, samples: int = 4,
                temperature: float = 1.0, budget: int = 128, labels: Literal["exact", "rollouts"] = "exact",
                rollouts: int = 4, depth: int | None = None, seed: int = 0, out: Path = Path("step-labels"),
                overwrite: bool = False) -> dict:
    """Sample chains of thought from a policy and label their steps, for training or judging a process reward
    model (`rlm train` with data.step_chains; benchmarks/prm_accuracy.py).

    Args:
        policy: the chain-of-thought policy's directory (any transformers causal LM; a RecurrentLM too).
        task: the task to draw problems from.
        difficulties: difficulties, e.g. "1-4".
        n: problems per difficulty.
        samples: chains sampled per problem.
        temperature: sampling temperature of the chains (and of the rollouts).
        budget: thinking budget of each chain (and of each rollout).
        labels: "exact" (the task's step checker) or "rollouts" (Math-Shepherd: any rollout from a step that
            reaches the right answer makes it good; for tasks without a step checker).
        rollouts: completions sampled from every step, with labels "rollouts".
        depth: the policy's depth, if it is a recurrent model (default: its mean_recurrence).
        seed: problems are drawn with seed 900000 + seed (a range no training stream or evaluation uses),
            and sampling is seeded with it.
        out: output folder: chains.jsonl and summary.json.
        overwrite: replace an earlier run in `out`.
    """
    source = get_task(task)
    source.require_steps()
    difficulty_list = parse_int_list(difficulties, "--difficulties")
    with claimed_output(out, option="--out", overwrite=overwrite, inputs=[policy],
                        command="rlm label-steps") as output:
        model, tokenizer = load_any_causal_lm(policy), load_tokenizer(policy)
        torch.manual_seed(seed)
        lines, good, total, agree, compared = [], 0, 0, 0, 0
        for difficulty in tqdm(difficulty_list, desc="label-steps", unit="difficulty"):
            problems = source.problems(difficulty, n, seed=LABEL_SEED + seed)
            for problem, chains in zip(problems, cot_runs(model, tokenizer, problems, budget, depth, samples=samples,
                                                           temperature=temperature)):
                for run in chains:
                    steps = chain_steps(tokenizer, run.result, source)
                    exact = source.step_labels(problem, steps)
                    record = {"problem": json.loads(problem.to_json()), "steps": steps}
                    if labels == "exact":
                        if exact is None:
                            raise ValueError(f"task {task!r} has no exact step checker: use --labels rollouts")
                        record["labels"] = exact
                    else:
                        record["labels"], record["rollout_success"] = rollout_labels(
                            model, tokenizer, problem, steps, rollouts, budget, temperature, depth)
                        if exact is not None:
                            agree += sum(a == b for a, b in zip(record["labels"], exact))
                            compared += len(exact)
                    good += sum(record["labels"])
                    total += len(steps)
                    lines.append(json.dumps(record))
        (output.path / "chains.jsonl").write_text("".join(line + "\n" for line in lines))
        summary = {"policy": str(policy), "task": task, "difficulties": difficulties, "n": n, "samples": samples,
                   "temperature": temperature, "labels": labels, "rollouts": rollouts if labels == "rollouts" else None,
                   "chains": len(lines), "steps": total, "good_share": good / total if total else float("nan"),
                   "agreement_with_exact": agree / compared if compared else None}
        (output.path / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(lines)} chains, {total} steps, {summary['good_share']:.3f} good"
          + (f", {summary['agreement_with_exact']:.3f} agreement with the exact checker" if compared else ""))
    return {**summary, "out": str(out)}

