"""Does adaptive depth pay on a mixed-difficulty set, in FLOPs and on the clock? (a measurement, not a test)

A user's problems come in mixed difficulties. For each shipped model and its task, a fresh mixed set (the same
number of problems at every difficulty, shuffled, from a problem seed no training stream or other benchmark draws)
is written with `rlm tasks export --shuffle true` and answered through the public `rlm sweep --problems FILE
--mixed true` at batch 8: every fixed depth, every exit criterion at its default threshold grid, and the oracle
(the smallest right depth per problem); the latent rules also at coarser thresholds. Each position exits on its own and is charged the steps it ran
(recurrent_lm.active, recurrent_lm.flops.positions_flops). The sweeps run --repeats times (the fixed depths in each); a cell's wall
time is its fastest run (interference only adds time; accuracy and FLOPs are the same every run).

The issue's bar: take the cheapest fixed depth within 1 point of the best fixed depth's accuracy; some adaptive
setting within 1 point of it uses >= 2.5x fewer FLOPs per problem (prompt included, counted per position) and
>= 2x less wall time at batch 8. Checked on the pointer task (k uniform in 1..12, 240 problems); the permutation
demo task (k uniform in 1..4) is measured the same way and reported whatever it shows.

    python benchmarks/adaptive_depth.py              # both tasks, 3 repeats: about 10 minutes on 2 cores
    python benchmarks/adaptive_depth.py --repeats 1 --per-difficulty 5   # a quick look
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).parent
EVAL_SEED = 777_003  # problem seeds of the form "task/difficulty/seed": the training stream draws "train/..." ones
# every criterion at its default grid; then the latent rules (no coda pass per check) at coarser thresholds too
GRIDS = {"default": [], "coarse": ["--exit_criteria", "[cosine,latent-diff,acceleration]", "--exit_thresholds", "[0.5,0.3,0.2,0.1,0.05]"]}
STUDIES = {  # name: (model, task, difficulties, depths)
    "pointer": ("pointer-latent", "pointer", "1-12", "1-16"),
    "permutation": ("demo-exit-gate", "permutation", "1-4", "1-8"),
}


def rlm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "recurrent_lm.cli", *args], check=True)


def run_study(name: str, per_difficulty: int, repeats: int, batch_size: int, scratch: Path) -> dict:
    model, task, difficulties, depths = STUDIES[name]
    problems = scratch / f"{name}.jsonl"
    rlm("tasks", "export", task, str(problems), "--difficulties", difficulties, "--n", str(per_difficulty),
        "--seed", str(EVAL_SEED), "--shuffle", "true")
    cells: dict[tuple[str, str], dict] = {}
    for repeat in range(repeats):
        for grid, extra in GRIDS.items():
            out = scratch / f"{name}-{grid}-{repeat}"
            rlm("sweep", "--model", model, "--problems", str(problems), "--mixed", "true", "--n", "1000000",
                "--steps", depths, "--batch_size", str(batch_size), "--dynamics", "0", "--out", str(out), *extra)
            for row in json.loads((out / "results.json").read_text())["rows"]:
                row.pop("problem_scores", None), row.pop("problem_flops", None)
                kept = cells.setdefault((row["method"], row["setting"]), row)  # the same but for the clock
                kept["wall_seconds"] = min(kept["wall_seconds"], row["wall_seconds"])  # interference only adds
    rows = list(cells.values())
    from recurrent_lm.eval.latent import depth_frontier

    frontier = depth_frontier(rows, "mixed")
    passing = [s for s in frontier["adaptive_within_1_point"] if s["flops_saving"] >= 2.5 and s["wall_saving"] >= 2]
    return {"model": model, "task": task, "difficulties": difficulties, "depths": depths,
            "problems": rows[0]["n"],
            "frontier": frontier, "bar_holds": bool(passing), "passing_settings": [s["setting"] for s in passing],
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    parser.add_argument("--per-difficulty", type=int, default=20, help="problems per difficulty (pointer: x12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-adaptive-depth.json")
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "problem_seed": EVAL_SEED, "batch_size": args.batch_size, "repeats": args.repeats, "studies": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.studies:
            study = run_study(name, args.per_difficulty, args.repeats, args.batch_size, Path(scratch))
            results["studies"][name] = study
            f = study["frontier"]
            print(f"{name}: best fixed {f['best_fixed_accuracy']:.3f}; baseline r = {f['baseline_steps']} "
                  f"({f['baseline_accuracy']:.3f}); oracle {f['oracle_flops_saving']:.2f}x fewer FLOPs; bar "
                  f"{'holds' if study['bar_holds'] else 'fails'}")
            for s in f["adaptive_within_1_point"][:5]:
                print(f"  {s['setting']}: {s['accuracy']:.3f}, {s['flops_saving']:.2f}x fewer FLOPs, "
                      f"{s['wall_saving']:.2f}x less wall time")
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
