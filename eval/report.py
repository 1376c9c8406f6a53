"""The one report writer: results as JSON and CSV, plots as PNG, and a summary.md that reads on its own.
Sweeps, comparisons and the demo all write through it."""

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any



def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_stats(scores: Sequence[float]) -> dict[str, float]:
    """n, mean accuracy and its 95% Wilson interval: the columns every evaluation row starts with."""
    n = len(scores)
    low, high = wilson_interval(sum(scores), n)
    return {"n": n, "accuracy": sum(scores) / n, "ci_low": low, "ci_high": high}


# The columns every method's rows share, in the order tables show them; methods add their own settings after these.
RESULT_COLUMNS = ["method", "setting", "difficulty", "n", "accuracy", "ci_low", "ci_high", "flops_per_problem",
                  "generated_tokens"]


def result_row(method: str, setting: str, difficulty: int, scores: Sequence[float], flops: Sequence[float],
               tokens: Sequence[float], seconds: float, **extra: Any) -> dict[str, Any]:
    """One evaluated setting of one method on one difficulty: accuracy with its interval, and the mean FLOPs and
    generated tokens per problem (`flops` and `tokens` hold one value per problem)."""
    n = len(scores)
    return {"method": method, "setting": setting, "difficulty": difficulty, **accuracy_stats(scores),
            "flops_per_problem": sum(flops) / n, "generated_tokens": sum(tokens) / n, "wall_seconds": seconds, **extra}


def select(rows: Sequence[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """The rows whose fields equal every given value, e.g. select(rows, method="latent", difficulty=2)."""
    return [row for row in rows if all(row.get(key) == value for key, value in where.items())]


def write_results(out: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any], name: str = "results",
                  complete: bool = True) -> None:
    """{name}.json (meta, whether the run completed, rows) and {name}.csv (rows; columns = the union of keys, in
    first-seen order). An interrupted run writes what it finished with complete=False."""
    (out / f"{name}.json").write_text(json.dumps({**meta, "complete": complete, "rows": list(rows)}, indent=1,
                                                 default=str))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-2) else f"{value:.3f}".rstrip("0").rstrip(".")
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_summary(out: Path, title: str, sections: Sequence[tuple[str, str]], name: str = "summary.md") -> Path:
    """A markdown file of (heading, body) sections; bodies may embed plots as ![](file.png)."""
    text = f"# {title}\n\n" + "\n\n".join(f"## {heading}\n\n{body}" for heading, body in sections) + "\n"
    path = out / name
    path.write_text(text)
    return path


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display). Imported when a figure is drawn, not with this
    module: commands that only read results, and every `--help`, start without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def line_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
              title: str, logx: bool = False, bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
              points: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None, ylim=(0, 1.02)) -> Path:
    """One axes: a line per series (with an optional shaded band), and optional scatter points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y) in series.items():
        (line,) = ax.plot(x, y, marker="o", markersize=3.5, label=label)
        if bands and label in bands:
            ax.fill_between(x, *bands[label], color=line.get_color(), alpha=0.15, linewidth=0)
    for label, (x, y) in (points or {}).items():
        ax.scatter(x, y, marker="x", s=40, label=label, zorder=3)
    if logx:
        log_axis(ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_axis(ax) -> None:
    """Log x axis labelled at 1, 2 and 5 per decade only (matplotlib labels every minor tick of a narrow range,
    and the labels collide)."""
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 2 and 2e+08, not 2x10^0
    ax.xaxis.set_minor_formatter(NullFormatter())


def panel_plot(path: Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], xlabel: str,
               ylabel: str, title: str, logx: bool = True, ylim=(0, 1.02), columns: int = 4) -> Path:
    """One panel per key (e.g. per difficulty), each with several series, `columns` panels per row; shared
    legend."""
    n = len(panels)
    cols = min(n, columns)
    rows = -(-n // cols)
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    ncol = max(1, min(5, len(labels), cols * 2))  # legend columns that fit the figure's width
    legend_height = 0.2 * -(-len(labels) // ncol) + 0.2
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 6.4), 3.4 * rows + legend_height), squeeze=False,
                             sharey=True)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per series in every panel
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        for label in labels:
            if label in series:
                ax.plot(*series[label], marker="o", markersize=3.5, label=label, color=colors[label])
        if logx:
            log_axis(ax)
        ax.set(title=panel, xlabel=xlabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:  # the last row's empty places
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    handles = [plt.Line2D([], [], color=colors[label], marker="o", markersize=3.5) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_height / (3.4 * rows + legend_height) + 0.01, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
