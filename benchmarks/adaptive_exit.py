"""Can adaptive per-token exit save compute? (a measurement, not a test)

On one task and difficulty (by default the demo's hardest trained one: permutation, k = 4, on the shipped
checkpoint), fresh problems are answered greedy at every fixed depth and with every exit criterion's threshold grid
(recurrent_lm.adaptive, up to --max-steps); FLOPs come from the one counter, exit checks included. The issue's bar:
an exit setting within 1 point of the best fixed depth's accuracy, with at most half the mean core steps per
generated token of the cheapest fixed depth that reaches that best accuracy, and fewer FLOPs per problem than every
fixed depth at least as accurate (left of the fixed-depth curve).

Two probes say where the bar fails:
- the oracle: teacher-forced on the worked answer at --max-steps, the fewest steps after which each answer token's
  logit-lens prediction is right and stays right. No exit rule that sees only the state can beat it, so
  `cheapest fixed depth / oracle mean steps` bounds the saving any rule could reach on this model;
- a learned exit gate (as Ouro's: a small head on the state), trained here for --gate-steps on the frozen model to
  predict that the logit-lens argmax has settled to its final value, then used as the exit rule. The library has no
  learned gate: the probe swaps the tracker (recurrent_lm.adaptive.AdaptiveExit.tracker) inside this script only.

    python benchmarks/adaptive_exit.py                       # demo-latent, permutation k=4, about 10 min on 2 cores
    python benchmarks/adaptive_exit.py --model checkpoints/pointer-latent --task pointer --difficulty 4
"""

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recurrent_lm import adaptive
from recurrent_lm.data import collate, prompt_ids
from recurrent_lm.eval.latent import AdaptiveDepth, LatentDepth
from recurrent_lm.eval.methods import run_methods
from recurrent_lm.eval.report import line_plot, select
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.tasks import get_task

BENCHMARKS = Path(__file__).parent
EVAL_SEED = 777_002  # problem seeds no training stream draws ("train/..." ones do)
GATE_SEED = 4_242


def settled_from(right: torch.Tensor) -> torch.Tensor:
    """right: (steps, ...) bool. The first step from which every later step is right (steps + 1 where the last is
    wrong): a suffix-all over the step axis."""
    steps = right.shape[0]
    suffix = right.flip(0).long().cumprod(0).flip(0)  # 1 where this step and every later one is right
    return steps + 1 - suffix.sum(0)


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


def train_gate(model, tokenizer, task, max_difficulty: int, depth: int, steps: int, batch_size: int = 64) -> nn.Module:
    """A small MLP on the (normalised) state, trained with binary cross-entropy to say whether the logit-lens argmax
    at this step already equals the argmax at `depth` and stays so; every real position of training-range problems
    (prompt and answer), the model frozen."""
    hidden = model.config.hidden_size
    gate = nn.Sequential(nn.LayerNorm(hidden, elementwise_affine=False), nn.Linear(hidden, 64), nn.GELU(),
                         nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(gate.parameters(), lr=3e-3)
    rng = random.Random(f"gate/{GATE_SEED}")
    for _ in range(steps):
        problems = [task.generate(rng.randint(1, max_difficulty), rng) for _ in range(batch_size)]
        rows = [{"input_ids": tokenizer(task.render(p)).input_ids + [tokenizer.eos_token_id]} for p in problems]
        batch = collate(rows, tokenizer.pad_token_id, padding_side="left")
        with torch.no_grad():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], num_steps=depth, init_scale=0.0,
                        output_step_logits=True, output_latent_states=True)
            predictions = torch.stack([logits.argmax(-1) for logits in out.step_logits])
            steps_index = torch.arange(1, depth + 1)[:, None, None]
            target = (steps_index >= settled_from(predictions == predictions[-1:])).float()
        logits = gate(torch.stack(out.latent_states)).squeeze(-1)
        real = batch["attention_mask"].bool().expand_as(logits)
        loss = F.binary_cross_entropy_with_logits(logits[real], target[real])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return gate.eval()


@contextlib.contextmanager
def gate_as_exit_rule(gate: nn.Module, criterion: str):
    """Within the block, the exit rule `criterion` exits a position once the gate's probability that its prediction
    has settled exceeds 1 - threshold."""

    class GateTracker(adaptive.ExitTracker):
        def converged(self, step, state, logits):
            with torch.no_grad():
                settled = torch.sigmoid(gate(state.float()).squeeze(-1))
            return (1 - settled < self.rule.limit) & (step >= self.rule.min_steps)

    original = adaptive.AdaptiveExit.tracker
    adaptive.AdaptiveExit.tracker = lambda rule: GateTracker(rule) if rule.criterion == criterion else original(rule)
    try:
        yield
    finally:
        adaptive.AdaptiveExit.tracker = original


def check_bar(rows: list[dict]) -> dict:
    fixed = sorted(select(rows, method="latent"), key=lambda r: r["steps"])
    best = max(r["accuracy"] for r in fixed)
    cheapest = min((r for r in fixed if r["accuracy"] == best), key=lambda r: r["flops_per_problem"])
    near = min((r for r in fixed if r["accuracy"] >= best - 0.01), key=lambda r: r["flops_per_problem"])
    settings = []
    for row in rows:
        if row["method"] == "latent":
            continue
        as_accurate = [r["flops_per_problem"] for r in fixed if r["accuracy"] >= row["accuracy"]]
        checks = {"within_1_point": row["accuracy"] >= best - 0.01,
                  "half_the_steps": row["mean_steps_per_token"] <= cheapest["steps"] / 2,
                  "left_of_fixed_curve": row["flops_per_problem"] < min(as_accurate, default=float("inf"))}
        settings.append({"method": row["method"], "setting": row["setting"], "accuracy": row["accuracy"],
                         "mean_steps_per_token": row["mean_steps_per_token"], "flops": row["flops_per_problem"],
                         **checks, "holds": all(checks.values())})
    return {"best_fixed_accuracy": best, "cheapest_best_depth": cheapest["steps"],
            "cheapest_depth_within_1_point": near["steps"],
            "cheapest_best_flops": cheapest["flops_per_problem"], "settings": settings,
            "holds": any(s["holds"] for s in settings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BENCHMARKS.parent / "checkpoints" / "demo-latent"))
    parser.add_argument("--task", default="permutation")
    parser.add_argument("--difficulty", type=int, default=4)
    parser.add_argument("--trained-max-difficulty", type=int, default=4, help="the gate trains on 1..this")
    parser.add_argument("--n", type=int, default=200, help="fresh problems")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    parser.add_argument("--max-steps", type=int, default=16, help="the most core steps an exit rule may run")
    parser.add_argument("--criteria", nargs="+", default=["cosine", "latent-diff", "kl", "argmax-stability"])
    parser.add_argument("--gate-steps", type=int, default=300, help="training steps of the gate probe (0: skip it)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-adaptive-exit.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer, task = load_model(args.model), load_tokenizer(args.model), get_task(args.task)
    problems = task.problems(args.difficulty, args.n, seed=EVAL_SEED)
    methods = [LatentDepth(model, tokenizer, args.depths)]
    methods += [AdaptiveDepth(model, tokenizer, c, None, args.max_steps) for c in args.criteria]
    rows = run_methods(methods, {args.difficulty: problems}, desc="fixed depths and exit rules")

    oracle = oracle_steps(model, tokenizer, task, problems, args.max_steps)
    per_token = [min(s, args.max_steps) for answer in oracle for s in answer]
    by_position = [sum(a[i] for a in oracle) / len(oracle) for i in range(min(map(len, oracle)))]
    results = {"model": args.model, "task": args.task, "difficulty": args.difficulty, "n": args.n,
               "eval_seed": EVAL_SEED, "max_steps": args.max_steps,
               "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
               "oracle": {"mean_steps_per_token": sum(per_token) / len(per_token),
                          "mean_steps_by_answer_position": by_position,
                          "never_settled_tokens": sum(s > args.max_steps for a in oracle for s in a)}}
    if args.gate_steps:
        start = time.perf_counter()
        gate = train_gate(model, tokenizer, task, args.trained_max_difficulty, args.max_steps, args.gate_steps)
        results["gate_train_seconds"] = time.perf_counter() - start
        with gate_as_exit_rule(gate, "cosine"):
            gated = AdaptiveDepth(model, tokenizer, "cosine", [0.3, 0.1, 0.03, 0.01], args.max_steps)
            for row in run_methods([gated], {args.difficulty: problems}, desc="gate probe"):
                rows.append({**row, "method": "latent-exit-gate-probe", "criterion": "learned gate",
                             "setting": row["setting"].replace("cosine", "1 - gate")})
    results["bar"] = check_bar(rows)
    oracle_mean = results["oracle"]["mean_steps_per_token"]
    results["oracle"]["best_possible_step_saving"] = results["bar"]["cheapest_best_depth"] / oracle_mean
    results["rows"] = rows
    args.out.write_text(json.dumps(results, indent=1))

    series = {"fixed depth": ([r["flops_per_problem"] for r in select(rows, method="latent")],
                              [r["accuracy"] for r in select(rows, method="latent")])}
    for name in sorted({r.get("criterion") for r in rows if r["method"] != "latent"}):
        chosen = sorted((r for r in rows if r.get("criterion") == name), key=lambda r: r["flops_per_problem"])
        series[f"exit: {name}"] = ([r["flops_per_problem"] for r in chosen], [r["accuracy"] for r in chosen])
    line_plot(args.out.with_suffix(".png"), series, "FLOPs per problem", "accuracy",
              f"{args.task} k={args.difficulty}: fixed depth vs adaptive exit\n"
              f"(oracle exit: {oracle_mean:.2f} core steps per answer token)",
              logx=True)
    bar = results["bar"]
    print(f"best fixed accuracy {bar['best_fixed_accuracy']:.3f}, first reached at r={bar['cheapest_best_depth']}; "
          f"oracle exit: {oracle_mean:.2f} mean steps per answer token "
          f"(at most {results['oracle']['best_possible_step_saving']:.2f}x fewer steps than r={bar['cheapest_best_depth']})")
    for s in bar["settings"]:
        print(f"{s['method']:24s} {s['setting']:32s} acc {s['accuracy']:.3f} steps {s['mean_steps_per_token']:.2f} "
              f"flops {s['flops']:.3g} within1={s['within_1_point']} half={s['half_the_steps']} "
              f"left={s['left_of_fixed_curve']}")
    print(f"bar {'holds' if bar['holds'] else 'fails'}; wrote {args.out}")


if __name__ == "__main__":
    main()
