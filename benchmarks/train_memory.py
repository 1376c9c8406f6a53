"""Peak memory of one training step at mean_recurrence 32 / backprop 8 against 8 / 8 (a script, not a test).

Truncated backprop keeps no autograd graph for the steps before the last k, so memory should stay flat in depth:
target ratio <= 1.3. Each depth runs in a fresh process (CPU: peak resident memory over the step, against the
process before the step; GPU: torch.cuda.max_memory_allocated).
Run: python benchmarks/train_memory.py [--hidden 512] [--batch 8] [--seq 256]
"""

import argparse
import json
import resource
import subprocess
import sys

import torch

from recurrent_lm import RecurrentConfig, RecurrentLM


def one_step(args, steps: tuple[int, int]) -> float:
    """Peak bytes of one forward + backward + optimizer step at (no-grad, grad) steps, in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = RecurrentConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                             intermediate_size=int(2.75 * args.hidden), num_prelude_layers=2, num_core_layers=4,
                             num_coda_layers=2, mean_recurrence=sum(steps), mean_backprop_depth=steps[1],
                             max_position_embeddings=args.seq)
    model = RecurrentLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    model(ids, labels=ids, num_steps=(0, 1)).loss.backward()  # warm-up: allocator, optimizer state
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model(ids, labels=ids, num_steps=steps).loss.backward()
    optimizer.step()
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args, tuple(json.loads(args.child)))))
        return
    peaks = {}
    for label, steps in (("mean 8 / backprop 8", (0, 8)), ("mean 32 / backprop 8", (24, 8))):
        cmd = [sys.executable, __file__, "--child", json.dumps(steps), "--hidden", str(args.hidden),
               "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq)]
        peaks[label] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"{label}: peak {peaks[label] / 2**20:.0f} MiB above the step's start")
    ratio = peaks["mean 32 / backprop 8"] / peaks["mean 8 / backprop 8"]
    print(f"ratio 32/8 = {ratio:.2f} (target <= 1.3), d={args.hidden}, batch {args.batch} x {args.seq}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")


if __name__ == "__main__":
    main()
