"""Speed at every depth, against a transformers Llama of the same width (CPU float32; a script that prints ratios,
not a timed test). Every ratio of issue 30 in one run, each next to its target:

1. forward: time / Llama of equal effective depth (prelude + r * core + coda layers) at r = 1, 4, 16, 32, against
   the FLOP ratio of the same two models from the one counter (recurrent_lm.flops); target ratio <= FLOP ratio x 1.03.
2. cached greedy generation at r = 8, batch 1 and 8: time / Llama; target <= 0.9.
3. batched adaptive exit (latent-diff, max 4r steps): wall time per token / fixed depth at the adaptive run's own
   mean depth, batch 8 and 32; target <= 1.1. Also printed: the deepest row's steps per token over the mean, the
   floor of that ratio where a step costs the same however few rows it runs (every row waits for the deepest).
4. a training step (random depth, truncated backprop: several (no-grad, grad) draws) in FLOP/s / an equal-width
   Llama's forward + backward of about the same FLOPs, eager and with compiled blocks; target >= 0.95.
5. start-up: `rlm --help` wall time (median of 5) and the heavy modules it loads; target: no torch, Lightning or
   matplotlib.

Shape (the issue's): d = 256, 8 heads, MLP 704, vocabulary 512, layers 1/2/1, batch 8 x 256. Timings alternate the
two sides over rounds and keep each one's best (interference only adds time). Run it alone on a quiet machine:
    python benchmarks/speed.py [--repeats 5] [--no-compile] [--parts forward generation ...] [--out FILE]
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.flops import causal_lm_forward_flops, forward_flops
from timing import paired_best_seconds

BENCHMARKS = Path(__file__).parent
PARTS = ["start_up", "forward", "generation", "adaptive_exit", "training"]
SHAPE = dict(vocab_size=512, hidden_size=256, num_attention_heads=8, intermediate_size=704)


def recurrent(steps: int, positions: int = 1024, **extra) -> RecurrentLM:
    torch.manual_seed(0)
    config = RecurrentConfig(**SHAPE, num_prelude_layers=1, num_core_layers=2, num_coda_layers=1,
                             mean_recurrence=steps, max_position_embeddings=positions, **extra)
    return RecurrentLM(config).eval()


def llama(layers: int, positions: int = 1024) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, num_hidden_layers=layers, max_position_embeddings=positions,
                                        tie_word_embeddings=True, attn_implementation="sdpa")).eval()


def forward_ratios(depths: list[int], batch: int, seq: int, repeats: int) -> list[dict]:
    rows = []
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq))
    for steps in depths:
        ours = recurrent(steps, seq)
        other = llama(ours.config.effective_depth(steps), seq)
        with torch.no_grad():
            t_ours, t_llama = paired_best_seconds(lambda: ours(ids, num_steps=steps),
                                                  lambda: other(ids, use_cache=False), repeats=repeats)
        flops = causal_lm_forward_flops(ours, seq, logit_tokens=seq, num_steps=steps)
        flop_ratio = flops / causal_lm_forward_flops(other, seq, logit_tokens=seq)
        rows.append({"r": steps, "time_ratio": t_ours / t_llama, "flop_ratio": flop_ratio,
                     "target": flop_ratio * 1.03, "holds": t_ours / t_llama <= flop_ratio * 1.03,
                     "ours_s": t_ours, "llama_s": t_llama})
        print(f"  forward r={steps:>2}: time / Llama {t_ours / t_llama:.3f}, FLOP ratio {flop_ratio:.3f} "
              f"(target <= {flop_ratio * 1.03:.3f})", flush=True)
    return rows


def generation_ratios(batches: list[int], steps: int, prompt: int, new_tokens: int, repeats: int) -> list[dict]:
    ours = recurrent(steps)
    other = llama(ours.config.effective_depth(steps))
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                 eos_token_id=None)
    rows = []
    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(5, SHAPE["vocab_size"], (batch, prompt))
            t_ours, t_llama = paired_best_seconds(lambda: ours.generate(ids, num_steps=steps, **fixed),
                                                  lambda: other.generate(ids, **fixed), repeats=repeats)
            rows.append({"batch": batch, "r": steps, "time_ratio": t_ours / t_llama, "target": 0.9,
                         "holds": t_ours / t_llama <= 0.9})
            print(f"  generation r={steps} batch {batch}: time / Llama {t_ours / t_llama:.3f} (target <= 0.9)",
                  flush=True)
    return rows


def adaptive_ratios(batches: list[int], steps: int, prompt: int, new_tokens: int, threshold: float,
                    repeats: int) -> list[dict]:
    ours = recurrent(steps)
    deepest = 4 * steps
    tokens = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    adaptive = dict(num_steps=deepest, exit_criterion="latent-diff", exit_threshold=threshold)
    rows = []
    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(5, SHAPE["vocab_size"], (batch, prompt))
            out = ours.generate(ids, **adaptive, return_dict_in_generate=True, **tokens)
            depths = out.steps_per_token.float()
            mean = float(depths.mean())
            floor = float(depths.max(0).values.mean()) / mean  # every row waits for the deepest of its token
            at_mean = max(1, round(mean))
            t_adaptive, t_mean = paired_best_seconds(lambda: ours.generate(ids, **adaptive, **tokens),
                                                     lambda: ours.generate(ids, num_steps=at_mean, **tokens),
                                                     repeats=repeats)
            rows.append({"batch": batch, "mean_steps": mean, "fixed_steps": at_mean, "threshold": threshold,
                         "time_ratio": t_adaptive / t_mean, "deepest_over_mean": floor, "target": 1.1,
                         "holds": t_adaptive / t_mean <= 1.1})
            print(f"  adaptive exit batch {batch}: mean {mean:.2f} steps per token; wall / fixed r={at_mean} "
                  f"{t_adaptive / t_mean:.3f} (target <= 1.1; deepest row / mean {floor:.3f})", flush=True)
    return rows


def training_ratios(batch: int, seq: int, compiled: bool, repeats: int) -> list[dict]:
    """FLOP/s of training steps at several (no-grad, grad) depth draws, against the Llama whose forward + backward
    FLOPs are closest to their mean. Model FLOPs: forward at the whole depth plus backward (2x forward) of the part
    with gradients, as benchmarks/train_throughput.py counts them."""
    draws = [(4, 4), (2, 4), (0, 3), (8, 4), (5, 4)]
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq))
    rows = []
    for compile_blocks in [False, True] if compiled else [False]:
        ours = recurrent(8, seq, mean_backprop_depth=4).train()
        flops = sum(forward_flops(ours.config, n + k, seq, batch_size=batch).flops
                    + 2 * forward_flops(ours.config, k, seq, batch_size=batch).flops for n, k in draws) / len(draws)
        layers = min(range(1, 64), key=lambda n: abs(3 * batch * causal_lm_forward_flops(llama(n, seq), seq, logit_tokens=seq) - flops))
        other = llama(layers, seq).train()
        other_flops = 3 * batch * causal_lm_forward_flops(other, seq, logit_tokens=seq)
        if compile_blocks:
            from recurrent_lm.train.parallel import compile_blocks as compile_ours

            compile_ours(ours)
            for layer in other.model.layers:
                layer.compile()

        def ours_steps():
            for n, k in draws:
                ours(ids, labels=ids, num_steps=(n, k)).loss.backward()

        def llama_steps():
            for _ in draws:
                other(ids, labels=ids, use_cache=False).loss.backward()

        t_ours, t_llama = paired_best_seconds(ours_steps, llama_steps, repeats=repeats)
        ratio = (flops / t_ours) / (other_flops / t_llama)
        rows.append({"compiled": compile_blocks, "llama_layers": layers, "flops_per_s": flops * len(draws) / t_ours,
                     "llama_flops_per_s": other_flops * len(draws) / t_llama, "ratio": ratio, "target": 0.95,
                     "holds": ratio >= 0.95})
        print(f"  training step{' (compiled blocks)' if compile_blocks else ''}: FLOP/s / Llama's ({layers} layers) "
              f"{ratio:.3f} (target >= 0.95)", flush=True)
    return rows


def start_up() -> dict:
    code = ("import sys, runpy; sys.argv = ['rlm', '--help']\ntry: runpy.run_module('recurrent_lm.cli', "
            "run_name='__main__')\nexcept SystemExit: pass\nprint(sorted(m for m in ('torch', 'lightning', "
            "'matplotlib') if m in sys.modules), file=sys.stderr)")
    walls, transformers_walls, loaded = [], [], None
    for _ in range(5):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - start)
        loaded = done.stderr.strip().splitlines()[-1]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import transformers"], check=True)
        transformers_walls.append(time.perf_counter() - start)
    wall, reference = statistics.median(walls), statistics.median(transformers_walls)
    print(f"  rlm --help: {wall:.2f} s wall (median of 5), {wall / reference:.2f}x `import transformers`; "
          f"heavy modules loaded: {loaded} (target: none)", flush=True)
    return {"wall_s": wall, "over_import_transformers": wall / reference, "heavy_modules": loaded,
            "holds": loaded == "[]"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled training step (minutes)")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="measure only these")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-speed.json")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {platform.machine()}; "
          f"d={SHAPE['hidden_size']}, {SHAPE['num_attention_heads']} heads, MLP {SHAPE['intermediate_size']}, "
          f"vocabulary {SHAPE['vocab_size']}, layers 1/2/1", flush=True)
    parts = {
        "start_up": lambda: start_up(),
        "forward": lambda: forward_ratios([1, 4, 16, 32], batch=8, seq=256, repeats=args.repeats),
        "generation": lambda: generation_ratios([1, 8], steps=8, prompt=32, new_tokens=128, repeats=args.repeats),
        "adaptive_exit": lambda: adaptive_ratios([8, 32], steps=8, prompt=32, new_tokens=32, threshold=0.03,
                                                 repeats=args.repeats),
        "training": lambda: training_ratios(batch=8, seq=256, compiled=not args.no_compile,
                                            repeats=max(2, args.repeats // 2)),
    }
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    results.update({name: measure() for name, measure in parts.items() if name in args.parts})
    failing = [f"{name}: {row}" for name, rows in results.items() if name != "machine"
               for row in (rows if isinstance(rows, list) else [rows]) if not row["holds"]]
    results["all_targets_hold"] = not failing
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'every target holds' if not failing else f'{len(failing)} targets fail'}; wrote {args.out}")


if __name__ == "__main__":
    main()
