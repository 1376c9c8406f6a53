"""Training throughput: tokens/s, peak memory per rank and, on a GPU, model FLOPs utilisation, for one process and
for DDP and FSDP2 over several (a script, not a test).

Model FLOPs of a step come from the project's compute counter: the forward at the drawn depth (n + k steps) plus
the backward (2x the forward) of the part with gradients (prelude, the last k steps, coda, head). Every rank draws
the same depths. Under ddp and fsdp2 each rank takes `--batch` sequences (the global batch is devices x batch);
FSDP2 shards by the project's plan (recurrent_lm.train.parallel.shard_model). Peak memory: CUDA's max allocated
per rank, or on CPU the process's peak resident set (which includes the Python runtime).

    python benchmarks/train_throughput.py --config configs/gpu-100m.yaml [--compile] [--steps 30]
    python benchmarks/train_throughput.py --strategies single,ddp,fsdp2 --devices 2   # side by side, with ratios
(on CPU the defaults use configs/debug.yaml's model; several processes run through torchrun, gloo on CPU)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.device_mesh import init_device_mesh

from recurrent_lm import RecurrentLM
from recurrent_lm.depth import sample_num_steps
from recurrent_lm.flops import forward_flops
from recurrent_lm.train.checkpoints import ArchitectureSpec, build_config
from recurrent_lm.train.parallel import ShardingPlan, shard_model

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def measure(args) -> dict:
    """One rank's run of `args.steps` training steps under args.strategy (after 3 warm-up steps)."""
    raw = yaml.safe_load(open(args.config))
    config = build_config(ArchitectureSpec(**raw["model"]["architecture"]))
    batch = args.batch or raw["data"].get("batch_size", 8)
    seq = args.seq or min(raw["data"].get("seq_len", 128), config.max_position_embeddings)
    cuda = torch.cuda.is_available()
    distributed = args.strategy != "single"
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = RecurrentLM(config).to(device).train()
    step_fn = model
    if args.strategy == "ddp":
        step_fn = torch.nn.parallel.DistributedDataParallel(model)
    elif args.strategy == "fsdp2":
        plan = ShardingPlan(param_dtype="bfloat16" if cuda else None)
        step_fn = shard_model(model, init_device_mesh("cuda" if cuda else "cpu", (world,)), plan)
    if args.compile:
        for block in [*model.prelude, *model.core, *model.coda]:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda and args.strategy != "fsdp2")
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16,
                              enabled=cuda and args.strategy != "fsdp2")  # fsdp2: its own mixed precision
    data = torch.Generator().manual_seed(1 + rank)

    def train_step(steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=data).to(device)
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
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    flops = 0
    for n, k in draws:
        train_step((n, k))
        flops += (forward_flops(config, n + k, seq, batch_size=batch).flops
                  + 2 * forward_flops(config, k, seq, batch_size=batch).flops)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_memory = (torch.cuda.max_memory_allocated() if cuda
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    result = {"strategy": args.strategy, "world_size": world, "device": name,
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),  # DTensors count whole
              "batch_per_rank": batch, "seq": seq, "tokens_per_s": args.steps * batch * seq * world / elapsed,
              "tflops_per_rank": flops / elapsed / 1e12, "peak_memory_gib_per_rank": peak_memory / 2**30,
              "compiled": args.compile, "threads_per_rank": torch.get_num_threads()}
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    result["mfu"] = flops / elapsed / peak if peak else None
    memories = [None] * world
    if distributed:
        dist.all_gather_object(memories, result["peak_memory_gib_per_rank"])
        result["peak_memory_gib_per_rank"] = max(memories)
        dist.destroy_process_group()
    return result


def launch(args, strategy: str) -> dict:
    """Run one strategy: in this process, or across args.devices processes through torchrun."""
    if strategy == "single":
        return measure(argparse.Namespace(**{**vars(args), "strategy": "single"}))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.devices}", __file__,
                   "--worker", strategy, "--out", str(out), "--config", args.config, "--steps", str(args.steps)]
        command += [f"--batch={args.batch}"] * bool(args.batch) + [f"--seq={args.seq}"] * bool(args.seq)
        command += ["--compile"] * args.compile
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads))})
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--batch", type=int, help="per rank; default: the config's data.batch_size")
    parser.add_argument("--seq", type=int, help="default: the config's data.seq_len (or 128)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="compile every block (the loop stays eager)")
    parser.add_argument("--strategies", default="single", help="any of single, ddp, fsdp2, comma-separated")
    parser.add_argument("--devices", type=int, default=2, help="processes for ddp and fsdp2")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process under ddp and fsdp2")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.worker:  # one rank of a torchrun launch
        result = measure(argparse.Namespace(**{**vars(args), "strategy": args.worker}))
        if int(os.environ.get("RANK", 0)) == 0:
            args.out.write_text(json.dumps(result))
        return
    results = [launch(args, strategy) for strategy in args.strategies.split(",")]
    for r in results:
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
        print(f"{r['strategy']:>6} x{r['world_size']} on {r['device']}: {r['params_m']}M parameters, "
              f"{r['batch_per_rank']} x {r['seq']} tokens per rank, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tflops_per_rank']:.3f} TFLOP/s per rank{mfu}, peak memory {r['peak_memory_gib_per_rank']:.2f} "
              f"GiB per rank{', compiled' if r['compiled'] else ''}")
    base = results[0]
    for r in results[1:]:
        print(f"{r['strategy']} / {base['strategy']}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
              f"{r['peak_memory_gib_per_rank'] / base['peak_memory_gib_per_rank']:.2f}x peak memory per rank")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
