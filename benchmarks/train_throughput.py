"""Training throughput: tokens/s and, on a GPU, model FLOPs utilisation (a script, not a test).

Model FLOPs of a step come from the project's compute counter: the forward at the drawn depth (n + k steps) plus
the backward (2x the forward) of the part with gradients (prelude, the last k steps, coda, head).
Run: python benchmarks/train_throughput.py --config configs/gpu-100m.yaml [--compile] [--steps 30]
     (on CPU the defaults use configs/debug.yaml's model)
"""

import argparse
import time

import torch
import yaml

from recurrent_lm.flops import forward_flops
from recurrent_lm.train.module import ArchitectureSpec, build_config
from recurrent_lm import RecurrentLM
from recurrent_lm.depth import sample_num_steps

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--batch", type=int, help="default: the config's data.batch_size")
    parser.add_argument("--seq", type=int, help="default: the config's data.seq_len (or 128)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    raw = yaml.safe_load(open(args.config))
    config = build_config(ArchitectureSpec(**raw["model"]["architecture"]))
    batch = args.batch or raw["data"].get("batch_size", 8)
    seq = args.seq or min(raw["data"].get("seq_len", 128), config.max_position_embeddings)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = RecurrentLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    def train_step(steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        with autocast:
            loss = step_fn(ids, labels=ids, num_steps=steps).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    draws = [sample_num_steps(config.mean_recurrence, config.mean_backprop_depth, generator) for _ in range(args.steps)]
    for steps in draws[:3]:  # warm-up (and compilation)
        train_step(steps)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    flops = 0
    for n, k in draws:
        train_step((n, k))
        flops += forward_flops(config, n + k, seq, batch_size=batch).flops + 2 * forward_flops(config, k, seq, batch_size=batch).flops
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    name = torch.cuda.get_device_name() if cuda else "CPU"
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e6:.1f}M parameters, batch {batch} x {seq}, mean depth {config.mean_recurrence}, "
          f"backprop {config.mean_backprop_depth}, {'bf16' if cuda else 'float32'}{', compiled' if args.compile else ''}")
    print(f"{args.steps * batch * seq / elapsed:,.0f} tokens/s, {flops / elapsed / 1e12:.2f} TFLOP/s achieved")
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak:
        print(f"MFU {flops / elapsed / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (target >= 40% on an H100)")


if __name__ == "__main__":
    main()
