"""Forward time of RecurrentLM against a transformers Llama of the same FLOPs, CPU float32.

The Llama has the same width, heads and MLP width, and prelude + r * core + coda layers: the depth the recurrent
model materialises at r steps. The ratio ours / Llama measures the cost of the looped implementation (input
injection, sandwich norms, qk bias, adjacent-pair RoPE) over a plain, well-optimised transformer.
benchmarks/speed.py holds the target (time ratio <= FLOP ratio x 1.03). Then eager against compiled (train.parallel.compile_blocks: every block compiled with
inductor, the loop eager; one graph for every depth, so no recompilation between the depths measured).
Run: python benchmarks/forward.py [--steps 4 16] [--batch 8] [--seq 256] [--no-compile]
"""

import argparse
import copy

import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.train.parallel import compile_blocks
from timing import paired_best_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-compile", action="store_true", help="skip the eager-against-compiled comparison")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = RecurrentConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
                             intermediate_size=args.intermediate, num_prelude_layers=1, num_core_layers=2,
                             num_coda_layers=1, mean_recurrence=max(args.steps), max_position_embeddings=args.seq)
    ours = RecurrentLM(config).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch} x {args.seq}, "
          f"d={args.hidden}, heads={args.heads}, mlp={args.intermediate}, vocab={args.vocab}")
    print(f"{'r':>4} {'layers':>7} {'ours s':>8} {'llama s':>8} {'ratio':>6}")
    for steps in args.steps:
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
            intermediate_size=args.intermediate, num_hidden_layers=config.effective_depth(steps),
            max_position_embeddings=args.seq, tie_word_embeddings=True, attn_implementation="sdpa")).eval()
        with torch.no_grad():
            t_ours, t_llama = paired_best_seconds(lambda: ours(ids, num_steps=steps),
                                                  lambda: llama(ids, use_cache=False), repeats=args.repeats)
        print(f"{steps:>4} {config.effective_depth(steps):>7} {t_ours:>8.3f} {t_llama:>8.3f} {t_ours / t_llama:>6.2f}")
    if args.no_compile:
        return
    compiled = compile_blocks(copy.deepcopy(ours))
    print(f"{'r':>4} {'eager s':>8} {'compiled s':>10} {'speed-up':>8}  (recompilations so far)")
    for steps in args.steps:
        with torch.no_grad():
            compiled(ids, num_steps=steps)  # compiles at the first depth only
            t_eager, t_compiled = paired_best_seconds(lambda: ours(ids, num_steps=steps),
                                                      lambda: compiled(ids, num_steps=steps), repeats=args.repeats)
        print(f"{steps:>4} {t_eager:>8.3f} {t_compiled:>10.3f} {t_eager / t_compiled:>7.2f}x  "
              f"({counters['stats']['unique_graphs']} graphs)")


if __name__ == "__main__":
    main()
