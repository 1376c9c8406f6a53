"""Does the clock follow the compute counter when positions stop early? (a measurement, not a test)

A forward over a batch where each position runs its own depth (forward's position_depths: what adaptive exit does
once positions exit, through the same packed steps) against the same batch at the deepest depth for every
position. The counter (recurrent_lm.flops.positions_flops) charges each position its own steps; this prints the
FLOPs ratio beside the wall-time ratio, for a width where a step's arithmetic dominates and for the demo's tiny
width, where each step costs about the same fixed launch overhead whatever it computes, so wall time saves much
less than FLOPs. Random weights: only the shapes matter. CPU float32, best of --repeats alternating runs.

The depth pattern: most positions stop after --short steps (the prompt's table of the pointer task, say), one in
--every runs --deep steps (the position that needs them).

    python benchmarks/skipping.py                 # widths 128 and 768: about a minute on 2 cores
"""

import argparse

import torch

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.flops import forward_flops, positions_flops
from timing import paired_best_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 768])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--deep", type=int, default=16)
    parser.add_argument("--every", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"batch {args.batch} x {args.seq} positions; {args.short} steps, one in {args.every} runs {args.deep}; "
          f"{torch.get_num_threads()} threads")
    for width in args.widths:
        config = RecurrentConfig.preset("demo", hidden_size=width, num_attention_heads=max(4, width // 64),
                                        intermediate_size=width * 5 // 2, vocab_size=256)
        model = RecurrentLM(config).eval()
        ids = torch.randint(0, 256, (args.batch, args.seq))
        depths = torch.full_like(ids, args.short)
        depths[:, args.every - 1 :: args.every] = args.deep

        def fixed():
            model(ids, num_steps=args.deep, init_scale=0.0, logits_to_keep=1)

        def per_position():
            model(ids, num_steps=args.deep, init_scale=0.0, logits_to_keep=1, position_depths=depths)

        with torch.no_grad():
            t_fixed, t_skip = paired_best_seconds(fixed, per_position, repeats=args.repeats)
        full = forward_flops(config, args.deep, args.seq, logit_tokens=1).flops
        skipped = positions_flops(config, depths[0].tolist(), logit_tokens=1).flops
        print(f"width {width}: FLOPs {full / skipped:.2f}x fewer, wall {t_fixed / t_skip:.2f}x less "
              f"({t_fixed * 1e3:.1f} ms -> {t_skip * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
