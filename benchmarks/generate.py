"""Generation speed of RecurrentLM, CPU float32 (a script that prints ratios, not a timed test).

- tokens/s generating 128 tokens at r=8, batch 1 and 8, against a transformers Llama of equal effective depth
  (prelude + 8 * core + coda layers, same width/heads/MLP) with its own KV cache. Target: time ratio
  ours / Llama <= 1.25.
- the same against our own generation without a cache (recomputing the whole sequence per token).
- cache bytes per token for each cache strategy (full, and rings of N slots).
- mean core steps per token with kl adaptive exit at a few thresholds (an untrained model converges quickly;
  run it on a trained checkpoint with --model DIR for meaningful numbers).
- batched adaptive exit (latent-diff, no coda pass per step): wall time per token against fixed depth at the
  maximum and at the adaptive run's own mean depth. Rows whose every position has exited are not computed, so
  the adaptive run should cost about what its mean depth costs, not what its deepest row costs.
Run: python benchmarks/generate.py [--model DIR] [--new-tokens 128] [--steps 8]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recurrent_lm import RecurrentCache, RecurrentConfig, RecurrentLM
from timing import paired_best_seconds


def recompute_greedy(model, ids, new_tokens, steps):
    for _ in range(new_tokens):
        logits = model(ids, num_steps=steps, logits_to_keep=1).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a RecurrentLM directory (default: a random model of the shape below)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exit-threshold", type=float, default=0.03, help="latent-diff threshold of the batched run")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model:
        ours = RecurrentLM.from_pretrained(args.model).eval()
    else:
        ours = RecurrentLM(RecurrentConfig(vocab_size=4096, hidden_size=256, num_attention_heads=4,
                                           intermediate_size=704, num_prelude_layers=1, num_core_layers=2,
                                           num_coda_layers=1, mean_recurrence=args.steps,
                                           max_position_embeddings=1024)).eval()
    c = ours.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.effective_depth(args.steps),
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True)).eval()
    n = args.new_tokens
    fixed = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; d={c.hidden_size}, "
          f"layers {c.num_prelude_layers}/{c.num_core_layers}/{c.num_coda_layers}, r={args.steps} "
          f"(Llama: {c.effective_depth(args.steps)} layers), prompt {args.prompt}, {n} new tokens")
    print(f"{'batch':>5} {'ours tok/s':>11} {'llama tok/s':>12} {'ratio':>6} {'no-cache tok/s':>15} {'speed-up':>9}")
    with torch.no_grad():
        for batch in args.batches:
            ids = torch.randint(5, c.vocab_size, (batch, args.prompt))
            t_ours, t_llama = paired_best_seconds(lambda: ours.generate(ids, num_steps=args.steps, **fixed),
                                                  lambda: llama.generate(ids, **fixed), repeats=args.repeats)
            (t_nocache,) = paired_best_seconds(lambda: recompute_greedy(ours, ids, n, args.steps), repeats=1)
            tps = lambda t: batch * n / t  # noqa: E731
            print(f"{batch:>5} {tps(t_ours):>11.1f} {tps(t_llama):>12.1f} {t_ours / t_llama:>6.2f} "
                  f"{tps(t_nocache):>15.1f} {t_nocache / t_ours:>8.1f}x")

        ids = torch.randint(5, c.vocab_size, (1, args.prompt))
        print("\ncache bytes per token (float32), r =", args.steps)
        for slots in (None, 4, 2, 1):
            cache = RecurrentCache(core_slots=slots)
            ours.generate(ids, num_steps=args.steps, cache=cache, **{**fixed, "max_new_tokens": 8, "min_new_tokens": 8})
            name = "full (one per step)" if slots is None else f"ring of {slots} slots"
            print(f"  {name:>22}: {cache.bytes_per_token():>8.0f}")

        print("\nkl adaptive exit, max", 4 * args.steps, "steps:")
        for threshold in (1e-2, 1e-3, 1e-4, 1e-5):
            out = ours.generate(ids, num_steps=4 * args.steps, exit_criterion="kl", exit_threshold=threshold,
                                return_dict_in_generate=True, **{**fixed, "max_new_tokens": 32, "min_new_tokens": 32})
            print(f"  threshold {threshold:g}: mean {out.steps_per_token.float().mean():.2f} steps per token")

        batch, deepest = max(args.batches), 4 * args.steps
        ids = torch.randint(5, c.vocab_size, (batch, args.prompt))
        tokens = dict(fixed, max_new_tokens=32, min_new_tokens=32)
        adaptive = dict(num_steps=deepest, exit_criterion="latent-diff", exit_threshold=args.exit_threshold)
        mean = float(ours.generate(ids, **adaptive, return_dict_in_generate=True, **tokens).steps_per_token.float().mean())
        at_mean = max(1, round(mean))
        t_adaptive, t_max, t_mean = paired_best_seconds(
            lambda: ours.generate(ids, **adaptive, **tokens), lambda: ours.generate(ids, num_steps=deepest, **tokens),
            lambda: ours.generate(ids, num_steps=at_mean, **tokens), repeats=args.repeats)
        per_token = lambda t: 1000 * t / (batch * 32)  # noqa: E731
        print(f"\nbatch {batch}, latent-diff < {args.exit_threshold:g}, max {deepest} steps: mean {mean:.2f} steps per token")
        print(f"  ms per token: adaptive {per_token(t_adaptive):.2f}, fixed r={deepest} {per_token(t_max):.2f}, "
              f"fixed r={at_mean} {per_token(t_mean):.2f}; adaptive / fixed at its mean depth = {t_adaptive / t_mean:.2f}")


if __name__ == "__main__":
    main()
