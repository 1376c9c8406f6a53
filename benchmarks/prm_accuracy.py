"""How well does a process reward model label steps? (a measurement, not a test)

Held-out chains of two kinds, labelled by the task's exact step checker (a step is good while every step up to it
equals the worked solution's; the answer step is good when its answer is right):
- "corrupted": worked solutions with one step corrupted in half of them, the PRM's own training distribution, on
  problems from a seed training never draws;
- "policy": chains sampled from the CoT policy itself (temperature T), the errors search will meet.
For each, per difficulty: step-label accuracy (score >= 0.5 read as good), the rate a constant guess of the majority
label reaches, and the accuracy on good and bad steps apart.

    python benchmarks/prm_accuracy.py --reward-model demo-prm --policy demo-cot --task permutation
"""

import argparse
import json
from pathlib import Path

import torch

from recurrent_lm.eval.reward_models import load_reward_model
from recurrent_lm.eval.step_labels import judge_reward_model
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.recipes import resolve_model_dir
from recurrent_lm.tasks import get_task

BENCHMARKS = Path(__file__).parent
EVAL_SEED = 777_003  # problems no training stream and no other benchmark draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-model", default="demo-prm")
    parser.add_argument("--policy", default="demo-cot")
    parser.add_argument("--task", default="permutation")
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--n", type=int, default=200, help="problems per difficulty")
    parser.add_argument("--samples", type=int, default=4, help="policy chains per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--budget", type=int, default=128, help="thinking budget of the policy's chains")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-prm-accuracy.json")
    args = parser.parse_args()

    scorer = load_reward_model(resolve_model_dir(args.reward_model))
    policy, tokenizer, task = load_model(args.policy), load_tokenizer(args.policy), get_task(args.task)
    torch.manual_seed(0)
    rows = []
    for k in args.difficulties:
        rows += judge_reward_model(scorer, policy, tokenizer, task.problems(k, args.n, seed=EVAL_SEED), args.samples,
                                   args.temperature, args.budget)
        for row in rows[-2:]:
            print(f"k={k} {row['chains']:>16}: accuracy {row['accuracy']:.3f} (majority {row['majority_rate']:.3f}) "
                  f"on {row['steps']} steps; good {row['accuracy_on_good']:.3f} of {row['good_steps']}, "
                  f"bad {row['accuracy_on_bad']:.3f} of {row['bad_steps']}", flush=True)
    args.out.write_text(json.dumps({
        "reward_model": args.reward_model, "policy": args.policy, "task": args.task, "eval_seed": EVAL_SEED,
        "n": args.n, "samples": args.samples, "temperature": args.temperature, "budget": args.budget,
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}", "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
