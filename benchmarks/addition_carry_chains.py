"""Long carry chains: where the shipped addition-columns model's depth must grow with the length (a measurement,
not a test).

Random sums (the benchmark's test, as in the papers) rarely hold a carry chain longer than a few columns, so they
are solved at a small fixed depth at any length. This probe builds the worst cases, in which one column decides
every column above it: the answer's last digit depends on the first column through a run of nines.

- carry through: 99...9 + 1 (the lowest column's carry crosses every column);
- no carry: 99...90 + 1 (the same run of nines, no carry anywhere);
- carry from the middle: 99...9 + 10^(n/2) (nines below it stay, nines above it turn to zeros).

Each case at n = 10, 20, 40, 80 digits, read at every depth in DEPTHS (zero initial state, one forward pass),
through the task's own renderer (`problem_of`) and reader. Writes benchmarks/results-addition-carry-chains.json.

    python benchmarks/addition_carry_chains.py [--model addition-columns]
"""

import argparse
import json
from pathlib import Path

from recurrent_lm.answering import answer_problems
from recurrent_lm.loading import load_model_and_tokenizer, resolve_model_dir
from recurrent_lm.tasks import get_task

LENGTHS = (10, 20, 40, 80)
DEPTHS = (1, 2, 3, 5, 10, 20, 40, 60, 80, 120, 160)
CASES = {"carry through": lambda n: (10**n - 1, 1),
         "no carry": lambda n: (10**n - 10, 1),
         "carry from the middle": lambda n: (10**n - 1, 10 ** (n // 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="addition-columns")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-addition-carry-chains.json")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(resolve_model_dir(args.model))
    model.eval()
    task, rows = get_task("addition-columns"), []
    for case, operands in CASES.items():
        for n in LENGTHS:
            problem = task.problem_of(*operands(n), n)
            solved = [depth for depth in DEPTHS
                      if answer_problems(model, tokenizer, [problem], num_steps=depth, init_scale=0.0)[0].score == 1.0]
            rows.append({"case": case, "digits": n, "solved_at_depths": solved})
            print(f"{case}, {n} digits: right at r = {solved}", flush=True)
    args.out.write_text(json.dumps({"model": args.model, "depths": DEPTHS, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
