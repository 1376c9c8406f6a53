"""Can adaptive per-token exit save compute? (a measurement, not a test)

On one task and difficulty (by default the demo's hardest trained one: permutation, k = 4, on the shipped
checkpoint with its learned exit gate), fresh problems are answered greedy at every fixed depth and with every exit
criterion's threshold grid (recurrent_lm.adaptive, up to --max-steps), the prompt exiting per position as every
token does, or running a fixed depth (--prompt-depths; generate's prompt_num_steps). FLOPs come from the one
counter, exit checks included. The issue's bar: an exit setting within 1 point of the best fixed depth's accuracy,
with at most half the mean core steps per generated token of the cheapest fixed depth that reaches that best
accuracy, and fewer FLOPs per problem than every fixed depth at least as accurate (left of the fixed-depth curve).

The oracle estimates how far a rule could go: teacher-forced on the worked answer at --max-steps, the fewest steps
after which each answer token's logit-lens prediction is right and stays right, so `cheapest fixed depth / oracle
mean steps` estimates the saving within reach on this model. It is an estimate, not a bound: a rule only needs the
prediction right at the step it exits, and runs with other context depths (a fixed-depth prompt, earlier tokens
that exited).

    python benchmarks/adaptive_exit.py                # demo-exit-gate, permutation k=4: about 10 min on 2 cores
    python benchmarks/adaptive_exit.py --model checkpoints/pointer-latent --task pointer --criteria cosine kl
"""

import argparse
import json
from pathlib import Path

import torch

from recurrent_lm.adaptive import settled_from
from recurrent_lm.data import prompt_ids
from recurrent_lm.eval.latent import AdaptiveDepth, LatentDepth
from recurrent_lm.eval.methods import run_methods
from recurrent_lm.eval.report import panel_plot, select
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.tasks import get_task

BENCHMARKS = Path(__file__).parent
EVAL_SEED = 777_002  # problem seeds no training stream draws ("train/..." ones do)


@torch.no_grad()
def oracle_steps(model, tokenizer, task, problems, max_steps: int) -> list[list[int]]:
    """Per problem, per answer token (eos included): the fewest core steps after which the teacher-forced logit-lens
    prediction is the worked answer's token at every further step up to max_steps (max_steps + 1: never)."""
    result = []
    for problem in problems:
        prompt = prompt_ids(tokenizer, problem, False)
        answer = tokenizer(task.completion(problem, False), add_special_tokens=False).input_ids
        if answer[-1] != tokenizer.eos_token_id:
            answer = answer + [tokenizer.eos_token_id]
        out = model(torch.tensor([prompt + answer]), num_steps=max_steps, output_step_logits=True, init_scale=0.0)
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))
        right = torch.stack([logits[0, span].argmax(-1) for logits in out.step_logits]) == torch.tensor(answer)
        result.append(settled_from(right).tolist())
    return result


def check_bar(rows: list[dict]) -> dict:
    fixed = sorted(select(rows, method="latent"), key=lambda r: r["steps"])
    best = max(r["accuracy"] for r in fixed)
    cheapest = min((r for r in fixed if r["accuracy"] == best), key=lambda r: r["flops_per_problem"])
    near = min((r for r in fixed if r["accuracy"] >= best - 0.01 - 1e-9), key=lambda r: r["flops_per_problem"])
    settings = []
    for row in rows:
        if row["method"] == "latent":
            continue
        as_accurate = [r["flops_per_problem"] for r in fixed if r["accuracy"] >= row["accuracy"]]
        checks = {"within_1_point": row["accuracy"] >= best - 0.01 - 1e-9,  # one point, whatever the float rounding
                  "half_the_steps": row["mean_steps_per_token"] <= cheapest["steps"] / 2,
                  "left_of_fixed_curve": row["flops_per_problem"] < min(as_accurate, default=float("inf"))}
        settings.append({"method": row["method"], "setting": row["setting"], "accuracy": row["accuracy"],
                         "mean_steps_per_token": row["mean_steps_per_token"], "flops": row["flops_per_problem"],
                         **checks, "holds": all(checks.values())})
    return {"best_fixed_accuracy": best, "cheapest_best_depth": cheapest["steps"],
            "cheapest_depth_within_1_point": near["steps"],
            "cheapest_best_flops": cheapest["flops_per_problem"], "settings": settings,
            "holds": any(s["holds"] for s in settings)}


def plot(results: dict, path: Path) -> None:
    """Accuracy against FLOPs: a panel per prompt setting (exiting per position, or each fixed prompt depth), each
    with the fixed-depth curve and every criterion's thresholds; zoomed on the accuracies the bar is about."""
    rows = results["rows"]
    fixed = select(rows, method="latent")
    panels = {}
    for prompt in sorted({r.get("prompt_steps") or 0 for r in rows if r["method"] != "latent"}):
        series = {"fixed depth": ([r["flops_per_problem"] for r in fixed], [r["accuracy"] for r in fixed])}
        for name in sorted({r["criterion"] for r in rows if r["method"] != "latent"}):
            chosen = sorted((r for r in rows if r.get("criterion") == name and (r.get("prompt_steps") or 0) == prompt),
                            key=lambda r: r["flops_per_problem"])
            series[f"exit: {name}"] = ([r["flops_per_problem"] for r in chosen], [r["accuracy"] for r in chosen])
        panels[f"prompt at r={prompt}" if prompt else "prompt exits per position"] = series
    panel_plot(path, panels, "FLOPs per problem (log)", "accuracy",
               f"{results['task']} k={results['difficulty']}: fixed depth against adaptive exit (accuracy >= 0.9 "
               f"shown; oracle exit: {results['oracle']['mean_steps_per_token']:.2f} core steps per answer token)",
               ylim=(0.9, 1.005))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BENCHMARKS.parent / "checkpoints" / "demo-exit-gate"))
    parser.add_argument("--task", default="permutation")
    parser.add_argument("--difficulty", type=int, default=4)
    parser.add_argument("--n", type=int, default=200, help="fresh problems")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    parser.add_argument("--max-steps", type=int, default=16, help="the most core steps an exit rule may run")
    parser.add_argument("--criteria", nargs="+", default=["gate", "cosine", "latent-diff", "kl", "argmax-stability"])
    parser.add_argument("--prompt-depths", type=int, nargs="*", default=[3, 4, 5],
                        help="also run every criterion with the prompt at each of these fixed depths (no exit in it)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-adaptive-exit.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer, task = load_model(args.model), load_tokenizer(args.model), get_task(args.task)
    problems = task.problems(args.difficulty, args.n, seed=EVAL_SEED)
    methods = [LatentDepth(model, tokenizer, args.depths)]
    methods += [AdaptiveDepth(model, tokenizer, criterion, None, args.max_steps, prompt_steps=prompt)
                for criterion in args.criteria for prompt in [None, *args.prompt_depths]]
    rows = run_methods(methods, {args.difficulty: problems}, desc="fixed depths and exit rules")

    oracle = oracle_steps(model, tokenizer, task, problems, args.max_steps)
    per_token = [min(s, args.max_steps) for answer in oracle for s in answer]
    by_position = [sum(min(a[i], args.max_steps) for a in oracle) / len(oracle) for i in range(min(map(len, oracle)))]
    results = {"model": args.model, "task": args.task, "difficulty": args.difficulty, "n": args.n,
               "eval_seed": EVAL_SEED, "max_steps": args.max_steps,
               "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
               "oracle": {"mean_steps_per_token": sum(per_token) / len(per_token),
                          "mean_steps_by_answer_position": by_position,
                          "never_settled_tokens": sum(s > args.max_steps for a in oracle for s in a)}}
    results["bar"] = check_bar(rows)
    oracle_mean = results["oracle"]["mean_steps_per_token"]
    results["oracle"]["estimated_step_saving"] = results["bar"]["cheapest_best_depth"] / oracle_mean
    results["rows"] = rows
    args.out.write_text(json.dumps(results, indent=1))

    plot(results, args.out.with_suffix(".png"))
    bar = results["bar"]
    print(f"best fixed accuracy {bar['best_fixed_accuracy']:.3f}, first reached at r={bar['cheapest_best_depth']}; "
          f"oracle exit: {oracle_mean:.2f} mean steps per answer token "
          f"(an estimated {results['oracle']['estimated_step_saving']:.2f}x fewer steps than "
          f"r={bar['cheapest_best_depth']})")
    for s in bar["settings"]:
        print(f"{s['setting']:44s} acc {s['accuracy']:.3f} steps {s['mean_steps_per_token']:.2f} "
              f"flops {s['flops']:.3g} within1={s['within_1_point']} half={s['half_the_steps']} "
              f"left={s['left_of_fixed_curve']}")
    print(f"bar {'holds' if bar['holds'] else 'fails'}; wrote {args.out}")


if __name__ == "__main__":
    main()
