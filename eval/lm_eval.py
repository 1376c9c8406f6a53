"""lm-evaluation-harness support (the optional extra `pip install -e ".[lm-eval]"`).

Registers the lm-eval model "recurrent_lm": every loglikelihood and generation call runs at the depth given in
model_args (num_steps, and optionally exit_criterion / exit_threshold / min_steps), so any lm-eval task can be
swept over depth:

    python -m recurrent_lm.eval.lm_eval --model recurrent_lm --model_args pretrained=DIR,num_steps=32 --tasks arc_easy
    rlm lm-eval --model DIR --tasks arc_easy,hellaswag --steps 1,4,8,16,32,64 --out DIR

Hub tasks (the paper's ARC, HellaSwag, MMLU, GSM8K ...) download their data: that needs the network. Offline,
point --include-path at local task YAMLs (dataset_path: json, with local data_files).
"""

import difflib
import sys
from pathlib import Path

from recurrent_lm.depth import check_depths
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.options import ranges
from recurrent_lm.outputs import claimed_output
from recurrent_lm.tasks import IntList, parse_int_list

from .report import line_plot, markdown_table, write_results, write_summary


@ranges(limit=">= 1", batch_size=">= 1")
def lm_eval_sweep(model: Path, tasks: str, steps: IntList = "1,4,8,16,32", out: Path = Path("lm-eval"),
                  include_path: Path | None = None, limit: int | None = None, batch_size: int = 8,
                  tokenizer: Path | None = None, overwrite: bool = False) -> dict:
    """Run lm-evaluation-harness tasks at every depth and write the metrics per depth.

    Args:
        model: a RecurrentLM directory.
        tasks: lm-eval task names, comma-separated (e.g. "arc_easy,hellaswag").
        steps: depths to evaluate, e.g. "1,4,8,16,32".
        out: output folder: results.json, results.csv, one plot per metric, summary.md.
        include_path: a folder of extra task YAMLs (local data for offline use).
        limit: evaluate at most this many documents per task.
        batch_size: lm-eval batch size.
        tokenizer: tokenizer directory, if the model directory has none.
        overwrite: replace an earlier run in `out`.
    """
    from .lm_eval_model import RecurrentLMEval  # the optional extra: it says how to install it when missing
    import lm_eval
    from lm_eval.tasks import TaskManager

    depths = check_depths(parse_int_list(steps, "--steps"))
    if include_path is not None and not Path(include_path).is_dir():
        raise NotADirectoryError(f"--include_path {include_path} is not a folder (of task YAMLs)")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown or not names:
        hint = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in unknown}
        raise ValueError(f"--tasks: unknown lm-eval tasks {unknown or tasks!r} (close names: {hint}); "
                         "`lm_eval ls tasks` lists them, --include_path adds local ones")
    with claimed_output(out, option="--out", overwrite=overwrite, inputs=[model, tokenizer, include_path],
                        command="rlm lm-eval") as output:
        net, tok = load_model(model), load_tokenizer(tokenizer or model)
        rows = []
        for depth in depths:
            harness = RecurrentLMEval(pretrained=net, tokenizer=tok, num_steps=depth, batch_size=batch_size)
            results = lm_eval.simple_evaluate(model=harness, tasks=names, task_manager=manager, limit=limit)
            for task, metrics in results["results"].items():
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and "," in key and not key.startswith("alias"):
                        metric, _ = key.split(",", 1)
                        rows.append({"task": task, "metric": metric, "steps": depth, "value": float(value)})
        write_lm_eval(output.path, rows, {"model": str(model), "tasks": tasks, "depths": depths, "limit": limit})
    return {"rows": rows, "out": str(out)}


def write_lm_eval(out: Path, rows: list[dict], meta: dict) -> None:
    """results.json/.csv, a plot per task (its metrics against depth) and summary.md."""
    write_results(out, rows, meta)
    plots = []
    for task in sorted({r["task"] for r in rows}):
        series = {m: ([r["steps"] for r in rows if r["task"] == task and r["metric"] == m],
                      [r["value"] for r in rows if r["task"] == task and r["metric"] == m])
                  for m in sorted({r["metric"] for r in rows if r["task"] == task and not r["metric"].endswith("_stderr")})}
        plots.append(line_plot(out / f"{task}.png", series, "test-time depth", "metric", f"{task} against depth",
                               logx=True, ylim=None).name)
    write_summary(out, "lm-evaluation-harness against depth", [
        ("Results", markdown_table(rows, ["task", "metric", "steps", "value"])),
        ("Plots", "\n\n".join(f"![{p}]({p})" for p in plots))])


if __name__ == "__main__":  # lm-eval's own command line, with "recurrent_lm" registered
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers the model)

    sys.exit(cli_evaluate())
