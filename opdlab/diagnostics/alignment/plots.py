"""Plots of a gradient alignment run, drawn from its JSON alone (so `opdlab report RUN_DIR` can redraw them).

    alignment_by_teacher.png   mean alignment per teacher / context, correct vs incorrect rollouts, with the
                               bootstrap intervals; one panel per signal
    alignment_positions.png    alignment along the completion of a few rollouts (the tokens on the x axis), one line
                               per teacher / context, for the first signal
    alignment_vs_kl.png        alignment against KL(p || q) at each node, one colour per teacher / context, one panel
                               per signal, with Spearman's rho in the legend

    opdlab report RUN_DIR     # redraws them from RUN_DIR/alignment.json (`redraw`)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from opdlab.diagnostics.alignment.report import node_rows, spearman
from opdlab.diagnostics.alignment.result import load_result

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BY_TEACHER, POSITIONS, VS_KL = "alignment_by_teacher.png", "alignment_positions.png", "alignment_vs_kl.png"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib only when plotting
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _shown(token: str) -> str:
    return {"\n": "\u23ce", " ": "\u2423", "": "\u2205"}.get(token, token)


def plot_by_teacher(result: dict, path: Path) -> Path:
    groups = result["summary"]["groups"]
    signals, teachers = result["signals"], result["teachers"]
    ncols = min(3, len(signals))
    nrows = math.ceil(len(signals) / ncols)
    fig = _figure(max(3.2, 0.75 * len(teachers) + 1.2) * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, signal in zip(axes, signals):
        for offset, (key, colour, label) in enumerate((("correct", "C2", "correct rollouts"),
                                                      ("incorrect", "C3", "incorrect rollouts"))):
            xs, ys, lo, hi = [], [], [], []
            for i, teacher in enumerate(teachers):
                g = next(g for g in groups if g["teacher"] == teacher and g["signal"] == signal)[key]
                if g["mean"] is None:
                    continue
                xs.append(i + (offset - 0.5) * 0.36)
                ys.append(g["mean"])
                lo.append(g["mean"] - g["lo"])
                hi.append(g["hi"] - g["mean"])
            ax.bar(xs, ys, width=0.34, color=colour, alpha=0.75, label=label, yerr=[lo, hi], capsize=3)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_xticks(range(len(teachers)), teachers, fontsize=7, rotation=20)
        ax.set_title(signal, fontsize=9)
        ax.set_ylabel("cos(g*, d)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    for ax in axes[len(signals):]:
        ax.set_visible(False)
    level = round(100 * result["summary"]["confidence"])
    fig.suptitle(f"gradient alignment by teacher / context ({level}% bootstrap CI over rollouts)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def example_rollouts(result: dict, k: int) -> list[dict]:
    """Up to k rollouts with the most informative nodes (g* != 0), alternating incorrect and correct ones while
    both are left."""
    informative = {}
    for n in result["nodes"]:
        informative[n["rollout"]] = informative.get(n["rollout"], 0) + bool(n["informative"])
    with_nodes = sorted((r for r in result["rollouts"] if informative.get(r["index"])),
                        key=lambda r: (-informative[r["index"]], r["index"]))
    pools = [[r for r in with_nodes if not r["correct"]], [r for r in with_nodes if r["correct"]]]
    out = []
    while len(out) < k and any(pools):
        for pool in pools:
            if pool and len(out) < k:
                out.append(pool.pop(0))
    return out


def plot_positions(result: dict, path: Path, examples: int = 3, signal: str | None = None) -> Path:
    signal = signal or result["signals"][0]
    chosen = example_rollouts(result, examples)
    by_node = {(n["rollout"], n["position"]): n for n in result["nodes"]}
    longest = max((r["length"] for r in chosen), default=10)
    fig = _figure(min(30.0, max(7.0, 0.16 * longest)), 2.3 * max(1, len(chosen)))
    axes = fig.subplots(max(1, len(chosen)), 1, squeeze=False).ravel()
    for ax, r in zip(axes, chosen):
        for i, teacher in enumerate(result["teachers"]):
            pts = [(t, by_node[r["index"], t]["teachers"][teacher]["signals"][signal]["alignment"])
                   for t in r["node_positions"]]
            pts = [(t, a) for t, a in pts if a is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=4, linewidth=1, color=f"C{i}", label=teacher)
        flat = [t for t in r["node_positions"] if not by_node[r["index"], t]["informative"]]
        if flat:
            ax.plot(flat, [0] * len(flat), "x", color="0.5", label="g* = 0 (undefined)")
        ax.set_xticks(range(r["length"]), [_shown(t) for t in r["tokens"]], fontsize=6)
        ax.set_xlim(-0.5, r["length"] - 0.5)
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="k", linewidth=0.5)
        ax.grid(alpha=0.3)
        ax.set_ylabel("cos", fontsize=8)
        verdict = "correct" if r["correct"] else "incorrect"
        ax.set_title(f"rollout {r['index']} ({verdict}): {r['question']}", fontsize=8, loc="left")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"alignment of {signal} along the completion (nodes at exponential depths)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_vs_kl(result: dict, path: Path) -> Path:
    rows = node_rows(result)
    signals = result["signals"]
    ncols = min(3, len(signals))
    nrows = math.ceil(len(signals) / ncols)
    fig = _figure(3.8 * ncols, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, signal in zip(axes, signals):
        for i, teacher in enumerate(result["teachers"]):
            rs = [r for r in rows if r["teacher"] == teacher and r["signal"] == signal]
            if not rs:
                continue
            kl = [max(r["kl_student_teacher"], 1e-6) for r in rs]
            rho = spearman(kl, [r["alignment"] for r in rs])
            label = f"{teacher} (rho {rho:+.2f})" if rho is not None else teacher
            ax.scatter(kl, [r["alignment"] for r in rs], s=9, alpha=0.6, color=f"C{i}", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("KL(p || q) at the node", fontsize=8)
        ax.set_ylabel("cos(g*, d)", fontsize=8)
        ax.set_title(signal, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in axes[len(signals):]:
        ax.set_visible(False)
    fig.suptitle("does a cheap divergence predict alignment?", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_alignment(result: dict, run_dir: str | Path, examples: int | None = None) -> list[Path]:
    """Write the three plots into run_dir; returns their paths."""
    run_dir = Path(run_dir)
    if examples is None:
        examples = result.get("config", {}).get("example_rollouts", 3)
    return [plot_by_teacher(result, run_dir / BY_TEACHER), plot_positions(result, run_dir / POSITIONS, examples),
            plot_vs_kl(result, run_dir / VS_KL)]


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw the plots of a finished run from its alignment.json (nothing is recomputed)."""
    return plot_alignment(load_result(run_dir), run_dir)
