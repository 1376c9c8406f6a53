"""Does the chain-of-thought twin solve longer pointer chains if forced to think longer? (a measurement, not a test)

The extrapolation study's CoT model (checkpoints/pointer-cot, trained on worked solutions of 1..4 hops) writes
exactly four hops and answers, whatever the chain's length (`rlm compare` gives it 0.00 beyond k = 4 at every
budget). Here s1's budget forcing makes it think for exactly the full chain's length, 2k tokens (the end of thinking
suppressed until then, cut there): is each further hop right? Fresh problems from the extrapolation benchmark's
seed; 95% Wilson intervals.

    python benchmarks/cot_forced_thinking.py
"""

import argparse
import json
from pathlib import Path

import torch

from recurrent_lm.eval.budget_forcing import budget_forced_generate
from recurrent_lm.eval.report import accuracy_stats
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.tasks import get_task

BENCHMARKS = Path(__file__).parent
EVAL_SEED = 777_001  # the extrapolation benchmark's problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pointer-cot")
    parser.add_argument("--difficulties", type=int, nargs="+", default=[4, 6, 8, 10, 12])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-cot-forced-thinking.json")
    args = parser.parse_args()

    model, tokenizer, task = load_model(args.model), load_tokenizer(args.model), get_task("pointer")
    rows = []
    for k in args.difficulties:
        problems = task.problems(k, args.n, seed=EVAL_SEED)
        runs = budget_forced_generate(model, tokenizer, [task.prompt(p, cot=True) for p in problems],
                                      max_thinking=2 * k, min_thinking=2 * k)
        hops = [run.thinking.split(";") for run in runs]  # "c;k;e;" -> the node after each hop
        right_by_hop = [sum(len(h) > i and h[i] == p.steps[i] for h, p in zip(hops, problems)) / len(problems)
                        for i in range(k)]
        scores = [task.score(task.parse_answer(run.answer_text), p) for run, p in zip(runs, problems)]
        rows.append({"difficulty": k, "thinking_tokens": 2 * k, **accuracy_stats(scores),
                     "hop_right_share": right_by_hop})
        print(f"k={k}: accuracy {rows[-1]['accuracy']:.3f} [{rows[-1]['ci_low']:.3f}, {rows[-1]['ci_high']:.3f}]; "
              "share of hops right, hop by hop: " + " ".join(f"{x:.2f}" for x in right_by_hop), flush=True)
    args.out.write_text(json.dumps({"model": args.model, "eval_seed": EVAL_SEED, "n": args.n,
                                    "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
