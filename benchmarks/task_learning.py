"""How fast does a tiny recurrent-depth model learn each task on this CPU? (a measurement, not a test)

For each task: train a tiny RecurrentLM (random depth, truncated backprop) with a curriculum over difficulty and,
where the task has them, dense hints, for a fixed wall-clock budget; every `--eval-every` seconds, report greedy
accuracy on fixed held-out problems per difficulty, at depth 1 and at the mean training depth.
Run: python benchmarks/task_learning.py [--tasks chain permutation parity] [--minutes 4] [--hints]
"""

import argparse
import json
import math
import time

import torch

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.answering import accuracy, answer_problems
from recurrent_lm.data import Curriculum, TaskStream, heldout_problems
from recurrent_lm.tasks import get_task, task_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["chain", "parity", "permutation"])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--eval-every", type=float, default=60.0, help="seconds")
    parser.add_argument("--max-difficulty", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--mean-recurrence", type=int, default=4)
    parser.add_argument("--backprop", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ramp", type=int, default=300, help="curriculum ramp, batches")
    parser.add_argument("--hints", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--vocabulary-of", nargs="+", help="build the tokenizer of these tasks (default: --tasks)")
    args = parser.parse_args()

    tokenizer = task_tokenizer(args.vocabulary_of or args.tasks)
    results = {}
    for name in args.tasks:
        torch.manual_seed(0)
        top = min(args.max_difficulty, get_task(name).max_difficulty)
        config = RecurrentConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_attention_heads=4,
                                 intermediate_size=int(2.5 * args.hidden), num_prelude_layers=1, num_core_layers=2,
                                 num_coda_layers=1, mean_recurrence=args.mean_recurrence,
                                 mean_backprop_depth=args.backprop, max_position_embeddings=256)
        model = RecurrentLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
        stream = iter(TaskStream([name], tokenizer, args.batch, Curriculum(1, top, args.ramp), hints=args.hints))
        heldout = heldout_problems([name], range(1, top + 1), n=50)
        start, next_eval, step, rows = time.time(), args.eval_every, 0, []
        print(f"\n{name}: d={args.hidden}, mean r {args.mean_recurrence}, backprop {args.backprop}, batch {args.batch}, "
              f"difficulties 1..{top}, hints {args.hints}")
        while True:
            elapsed = time.time() - start
            if elapsed >= next_eval or elapsed >= 60 * args.minutes:
                model.eval()
                row = {"step": step, "seconds": round(elapsed)}
                for depth in (1, args.mean_recurrence, 2 * args.mean_recurrence):
                    answers = answer_problems(model, tokenizer, heldout, num_steps=depth, init_scale=0.0)
                    row[f"r={depth}"] = {d: round(accuracy([a for a in answers if a.problem.difficulty == d]), 2)
                                         for d in range(1, top + 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                model.train()
                next_eval += args.eval_every
                if elapsed >= 60 * args.minutes:
                    break
            batch = next(stream)
            lr = args.lr * min(1.0, (step + 1) / 100) * (0.5 + 0.5 * math.cos(math.pi * min(1.0, elapsed / (60 * args.minutes))))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
        results[name] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
