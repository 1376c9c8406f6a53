"""s1's Table 3 on the demo's permutation task: how well does each way of controlling the thinking length keep to a
budget, and what does it buy? (a measurement, not a test)

- budget forcing (cot-budget): thinking cut at B tokens, the end delimiter appended (demo-cot, greedy);
- rejection sampling (cot-rejection): chains sampled at T = 0.7 until one thinks for at most B tokens (8 tries,
  every draw paid for; demo-cot);
- token-conditional control (cot-token-conditional): the prompt asks for at most B tokens ("[B]" before <think>),
  nothing enforces it (demo-cot-stated, trained with its thinking length stated; greedy).
Control, Scaling and Performance per method and difficulty (s1_metrics.csv), accuracy against FLOPs beside the
latent model, on 100 problems per difficulty from the demo's held-out seed; everything through `rlm compare`.

    python benchmarks/s1_controls.py        # the shipped demo-cot-stated (retrain: rlm train --config demo-cot-stated)
"""

import argparse
from pathlib import Path

from recurrent_lm.eval.compare import compare
from recurrent_lm.recipes import resolve_model_dir

BENCHMARKS = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--difficulties", default="2,4,5")
    parser.add_argument("--stated-model", default="demo-cot-stated", help="a model directory or a shipped name")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-s1-controls")
    args = parser.parse_args()
    result = compare(resolve_model_dir("demo-latent"), resolve_model_dir("demo-cot"), task="permutation",
                     difficulties=args.difficulties, n=args.n, out=args.out, steps="2,3,4", exit_criterion=None,
                     budgets="12,24,36,48,60", votes="", vote_budget=72, temperature=0.7, rejection_tries=8,
                     methods="latent,budget,rejection,token-conditional",
                     token_conditional_cot=resolve_model_dir(args.stated_model), trained_max_difficulty=4,
                     seed=1234, overwrite=True)
    for metrics in result["s1_metrics"]:
        print(f"k={metrics['difficulty']} {metrics['method']:>22}: control {metrics['control']:.2f}, "
              f"scaling {metrics['scaling']:.4f}, performance {metrics['performance']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
