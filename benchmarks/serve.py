"""Serving throughput and latency: `rlm serve` under 1, 4 and 16 concurrent clients against the same model driven
in-process by generate, at a fixed depth and with adaptive exit (a measurement, not a test).

Each setting sends the same requests (permutation problems, k = 1-6, greedy, zero initial state, up to --max-tokens
tokens): through the server with C clients at once (each a thread posting /v1/completions and waiting for the
answer), and in-process as sequential batch-1 generate calls (what a user without a server does) and as
left-padded batches of 16 (the server's batch, without HTTP, queues and processes). Printed: completion tokens per
second, latency percentiles, and the ratios; the target is >= 4x the tokens/s of the sequential batch-1 calls at 16
clients. Run it alone: other work on the cores moves every number.

    python benchmarks/serve.py                       # demo-latent, about 3 minutes on 2 cores
    python benchmarks/serve.py --model runs/x/model --requests 64 --out benchmarks/results-serve.json
"""

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from recurrent_lm.data import collate
from recurrent_lm.loading import load_model_and_tokenizer
from recurrent_lm.tasks import get_task

BENCHMARKS = Path(__file__).parent
SEED = 777_010  # problem seeds never drawn by training


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, batch: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "recurrent_lm.cli", "serve", "--model", model, "--port",
                                str(port), "--max_batch_size", str(batch), "--batch_timeout", "0.02"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    sys.exit("rlm serve did not start within 180 s")


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def served(port: int, model: str, prompts: list[str], clients: int, settings: dict, max_tokens: int) -> dict:
    session = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=clients))

    def ask(prompt: str):
        started = time.perf_counter()
        reply = session.post(f"http://127.0.0.1:{port}/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "init_scale": 0,
            **settings})
        reply.raise_for_status()
        return time.perf_counter() - started, reply.json()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, prompts))
    wall = time.perf_counter() - started
    tokens = sum(r["usage"]["completion_tokens"] for _, r in results)
    steps = [r["usage"].get("core_steps_per_token", 0) for _, r in results]
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_s": percentiles([t for t, _ in results]), "mean_core_steps": statistics.mean(steps),
            "texts": [r["choices"][0]["text"] for _, r in results]}


def in_process(model, tok, prompts: list[str], batch: int, settings: dict, max_tokens: int) -> dict:
    tokens, texts, latencies = 0, [], []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        encoded = collate([{"input_ids": tok(p).input_ids} for p in chunk], tok.pad_token_id, padding_side="left")
        began = time.perf_counter()
        out = model.generate(encoded["input_ids"], attention_mask=encoded["attention_mask"], max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             init_scale=0, generator=torch.Generator().manual_seed(0), **settings)
        latencies += [time.perf_counter() - began] * len(chunk)
        for row in out[:, encoded["input_ids"].shape[1]:].tolist():
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            row = [t for t in row if t != tok.pad_token_id]
            tokens += len(row)
            texts.append(tok.decode(row))
    wall = time.perf_counter() - started
    return {"batch": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_s": percentiles(latencies), "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo-latent")
    parser.add_argument("--requests", type=int, default=48, help="requests per setting and concurrency")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=8, help="the fixed depth")
    parser.add_argument("--exit-steps", type=int, default=32, help="the maximum depth under adaptive exit (kl)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-serve.json")
    args = parser.parse_args()

    task = get_task("permutation")
    problems = [p for k in range(1, 7) for p in task.problems(k, -(-args.requests // 6), seed=SEED)][: args.requests]
    prompts = [task.prompt(p) for p in problems]
    model, tok = load_model_and_tokenizer(args.model)
    batch = max(args.clients)
    settings = {"fixed depth": {"num_steps": args.num_steps},
                "adaptive exit": {"num_steps": args.exit_steps, "exit_criterion": "kl"}}
    results = {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
               "machine": f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "settings": {name: {} for name in settings}}
    # in-process first, with no server running (an idle LitServe worker polls its queue and takes CPU time)
    with torch.no_grad():
        for name, setting in settings.items():
            in_process(model, tok, prompts[:4], 4, setting, args.max_tokens)  # warm-up
            for size in (1, batch):
                results["settings"][name][f"in-process batch {size}"] = in_process(model, tok, prompts, size, setting,
                                                                                  args.max_tokens)
    port = free_port()
    server = start_server(args.model, port, batch)
    try:
        for name, setting in settings.items():
            served(port, args.model, prompts[:4], 4, setting, args.max_tokens)  # warm-up
            results["settings"][name]["served"] = [served(port, args.model, prompts, c, setting, args.max_tokens)
                                                   for c in args.clients]
    finally:
        server.terminate()
        server.wait(timeout=60)
    for name, row in results["settings"].items():
        sequential = row["in-process batch 1"]["tokens_per_s"]
        same_text = all(s["texts"] == row["in-process batch 1"]["texts"] for s in row["served"])
        row["served texts equal in-process batch-1 texts"] = same_text
        print(f"\n{name} ({settings[name]}): served text == in-process batch-1 text: {same_text}")
        print(f"{'':24} {'tokens/s':>9} {'x batch-1':>9} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7}")
        for label, r in [*((f"served, {s['clients']} clients", s) for s in row["served"]),
                         ("in-process batch 1", row["in-process batch 1"]),
                         (f"in-process batch {batch}", row[f"in-process batch {batch}"])]:
            print(f"{label:24} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / sequential:9.2f} "
                  f"{r['latency_s']['p50']:7.3f} {r['latency_s']['p90']:7.3f} {r['latency_s']['p99']:7.3f}")
        top = row["served"][-1]
        row[f"served {top['clients']} clients / in-process batch 1 (target >= 4)"] = top["tokens_per_s"] / sequential
        row[f"served {top['clients']} clients / in-process batch {batch} (server overhead)"] = (
            top["tokens_per_s"] / row[f"in-process batch {batch}"]["tokens_per_s"])
        for r in [*row["served"], row["in-process batch 1"], row[f"in-process batch {batch}"]]:
            r.pop("texts")
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
