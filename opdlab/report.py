"""Plots from what a run wrote to disk; nothing here trains or samples.

`plot_training_curves(run_dir)` reads `run_dir/metrics.jsonl` (one JSON object per line; each line holds "step"
and whichever metrics were logged at that step) and writes `run_dir/curves.png`: one small panel per numeric
metric, most important first, at most `max_panels`. A truncated last line, as a killed run leaves, is skipped.
`plot_eval_by_length(results, path)` draws accuracy and sample counts per response-length bucket for several
evaluated models.

    python -m opdlab.report RUN_DIR        # writes RUN_DIR/curves.png (and the plots of any diagnostic JSON there)

Figures are drawn on matplotlib's Agg canvas directly, so importing this module never touches pyplot's global
backend or needs a display.
"""
from __future__ import annotations

import importlib
import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from opdlab.evaluate import EvalResult

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
MAX_PANELS = 12

# Which metrics matter most, as regexes over the full key; earlier patterns win panels first when there are more
# metrics than panels. Keys matching none come after, ordered by prefix group then name.
PRIORITY = [
    r"train/loss", r"train/reverse_kl", r"eval/mean@\d+", r"eval/pass@\d+", r"train/reward",
    r"train/response_len", r"teacher/entropy", r"teacher/maxp", r"student/entropy", r"perf/tokens_per_s",
    r"eval/pass@1", r"eval/response_len", r"train/grad_norm", r"train/lr", r"eval/truncated",
]
# Panels are laid out grouped by prefix, in this order; unknown prefixes follow alphabetically.
GROUP_ORDER = ["train", "eval", "teacher", "student", "perf"]
# Keys that are bookkeeping, not curves.
SKIP_KEYS = {"step", "time", "timestamp", "wall_time", "epoch"}


def load_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file. A broken last line (a run killed mid-write) is dropped quietly;
    broken lines elsewhere are dropped with a warning."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number != len(lines):
                warnings.warn(f"{path}:{number}: not valid JSON, skipped", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) for every numeric key; lines without a step use their line index."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for index, row in enumerate(rows):
        step = row.get("step", index)
        if not _is_number(step):
            step = index
        for key, value in row.items():
            if key in SKIP_KEYS or not _is_number(value):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(float(step))
            ys.append(float(value))
    return out


def _group(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else ""


def _group_rank(key: str) -> tuple[int, str]:
    g = _group(key)
    return (GROUP_ORDER.index(g), "") if g in GROUP_ORDER else (len(GROUP_ORDER), g)


def _priority(key: str) -> int:
    for i, pattern in enumerate(PRIORITY):
        if re.fullmatch(pattern, key):
            return i
    return len(PRIORITY)


def choose_panels(keys: Sequence[str], max_panels: int = MAX_PANELS) -> list[str]:
    """The `max_panels` most important keys, laid out grouped by prefix (train, eval, teacher, student, perf)."""
    chosen = sorted(keys, key=lambda k: (_priority(k), _group_rank(k), k))[:max_panels]
    return sorted(chosen, key=lambda k: (_group_rank(k), _priority(k), k))


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average that ignores non-finite values (a skipped step logs NaN)."""
    out, buf = [], []
    for y in ys:
        if math.isfinite(y):
            buf.append(y)
        buf = buf[-window:]
        out.append(sum(buf) / len(buf) if buf else float("nan"))
    return out


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_training_curves(run_dir: str | Path, max_panels: int = MAX_PANELS, out: str | Path | None = None) -> Path:
    """Write `run_dir/curves.png` (or `out`) from `run_dir/metrics.jsonl`; returns the image path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a run directory?")
    series = _series(load_metrics(metrics_path))
    if not series:
        raise ValueError(f"{metrics_path} holds no numeric metrics yet")
    keys = choose_panels(list(series), max_panels)

    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _new_figure(3.4 * ncols, 2.5 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        xs, ys = series[key]
        if len(xs) <= 30:  # sparse metrics (eval every N steps) read better as points joined by lines
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2)
        else:
            ax.plot(xs, ys, linewidth=0.8, alpha=0.35, color="C0")
            ax.plot(xs, _smooth(ys, max(3, len(ys) // 20)), linewidth=1.5, color="C0")
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        # No offset text: a flat learning rate would otherwise read as "+1e-4" with ticks around zero.
        ax.ticklabel_format(axis="y", useOffset=False, scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=7)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    skipped = len(series) - len(keys)
    fig.suptitle(run_dir.name + (f"  ({skipped} more metrics not shown)" if skipped else ""), fontsize=10)
    path = Path(out) if out is not None else run_dir / CURVES_FILE
    fig.savefig(path, dpi=110)
    return path


def plot_eval_by_length(results: dict[str, EvalResult], path: str | Path) -> Path:
    """Mean reward (top) and number of samples (bottom) per response-length bucket, one bar per model."""
    if not results:
        raise ValueError("plot_eval_by_length: no results to plot")
    labels = [b.label for b in next(iter(results.values())).buckets]
    for name, r in results.items():
        if [b.label for b in r.buckets] != labels:
            raise ValueError(f"plot_eval_by_length: {name!r} uses other length buckets "
                             f"({[b.label for b in r.buckets]} vs {labels})")
    fig = _new_figure(max(7.0, 1.1 * len(labels) * len(results) ** 0.5 + 4), 5.0)
    ax_acc, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    width = 0.8 / len(results)
    for j, (name, r) in enumerate(results.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        # Empty buckets get no bar (NaN) rather than a misleading zero-accuracy bar.
        acc = [float("nan") if b.mean_reward is None else b.mean_reward for b in r.buckets]
        ax_acc.bar(xs, acc, width, label=f"{name} (mean@{r.k} {100 * r.mean_at_k:.1f}%)", color=f"C{j}")
        ax_n.bar(xs, [b.count for b in r.buckets], width, color=f"C{j}")
    ax_acc.set_ylabel("mean reward")
    ax_acc.set_ylim(0, 1.05)
    ax_acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax_acc.grid(axis="y", alpha=0.3)
    ax_n.set_ylabel("samples")
    ax_n.set_xlabel("response length (tokens)")
    ax_n.set_xticks(range(len(labels)), labels)
    ax_n.grid(axis="y", alpha=0.3)
    fig.suptitle("accuracy by response length")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# Diagnostics that write a JSON file into their run directory, and the function that redraws their plots from it
# ("module:function", called with the run directory, returning the image paths).
DIAGNOSTIC_PLOTS = {
    "alignment.json": "opdlab.diagnostics.alignment.plots:redraw",
}


def redraw_run(run_dir: str | Path) -> list[Path]:
    """Every plot a run directory's files allow, redrawn without recomputing: the training curves from
    metrics.jsonl and each diagnostic's plots from its JSON (`DIAGNOSTIC_PLOTS`)."""
    run_dir = Path(run_dir)
    paths = [plot_training_curves(run_dir)] if (run_dir / METRICS_FILE).is_file() else []
    for name, target in DIAGNOSTIC_PLOTS.items():
        if (run_dir / name).is_file():
            module, function = target.split(":")
            paths += getattr(importlib.import_module(module), function)(run_dir)
    if not paths:
        raise FileNotFoundError(f"nothing to draw in {run_dir}: no {METRICS_FILE} and none of "
                                f"{', '.join(DIAGNOSTIC_PLOTS)}; is it a run directory?")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m opdlab.report RUN_DIR", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in redraw_run(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
