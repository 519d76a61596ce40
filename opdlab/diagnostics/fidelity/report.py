"""Tables and the figure of a fidelity measurement (`opdlab.diagnostics.fidelity.measure`).

    from opdlab.diagnostics.fidelity.report import fidelity_tables, plot_fidelity
    for table in fidelity_tables(result): rich.print(table)
    plot_fidelity(result, "runs/fidelity/fidelity.png")

The figure has two panels: left, the teacher's mean max-probability F(t) by position on student prefixes and on
its own, each with its logistic fit (only bins with at least `min_bin_tokens` tokens are drawn filled and fitted);
right, the teacher's accuracy when it continues a student prefix cut at t (± one standard error), beside the
student's own accuracy on the same rollouts and the teacher's accuracy on its own rollouts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from opdlab.diagnostics.fidelity.result import FidelityResult, PositionBin, SideResult


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fidelity_tables(result: FidelityResult) -> list[Table]:
    """F(t) by position bin, the logistic fits, and the continuation accuracy by cut position."""
    s, t = result.student, result.teacher
    n_bins = max(len(s.bins), len(t.bins))
    curve = Table(title=f"teacher fidelity F(t) = max-prob by completion position ({s.rollouts} student and "
                        f"{t.rollouts} teacher rollouts)", header_style="bold")
    for col in ("positions", "F, student prefixes", "tokens", "F, teacher prefixes", "tokens", "student fit"):
        curve.add_column(col, justify="right")
    for b in range(n_bins):
        sb = s.bins[b] if b < len(s.bins) else None
        tb = t.bins[b] if b < len(t.bins) else None
        ref = sb or tb
        fitted = s.fit.predict([sb.mean_position])[0] if (s.fit and sb and sb.tokens) else None
        curve.add_row(f"{ref.start}-{ref.end - 1}", *_bin_cells(sb, result.min_bin_tokens),
                      *_bin_cells(tb, result.min_bin_tokens), _num(fitted))

    fits = Table(title="logistic fit F(t) = floor + amplitude / (1 + exp(slope (t - midpoint)))",
                 header_style="bold")
    fits.add_column("")
    fits.add_column("student prefixes", justify="right")
    fits.add_column("teacher prefixes", justify="right")
    rows = [("floor", "floor", ".3f"), ("amplitude", "amplitude", ".3f"), ("slope", "slope", ".4f"),
            ("midpoint t*", "midpoint", ".1f"), ("R^2", "r2", ".3f"), ("bins fitted", "num_points", "d")]
    for label, attr, fmt in rows:
        fits.add_row(label, *(_num(getattr(side.fit, attr), fmt) if side.fit else "too few bins" for side in (s, t)))
    fits.add_row("own accuracy", _pct(s.accuracy), _pct(t.accuracy))
    fits.add_row("mean length", f"{s.mean_length:.1f}", f"{t.mean_length:.1f}")

    tables = [curve, fits]
    if result.cuts:
        cont = Table(title="the teacher continuing a student prefix cut after t tokens", header_style="bold")
        for col in ("cut t", "prefixes", "continuations", "teacher accuracy", "± s.e.", "student alone"):
            cont.add_column(col, justify="right")
        for c in result.cuts:
            cont.add_row(str(c.position), str(c.prefixes), str(c.continuations), _pct(c.accuracy), _pct(c.stderr),
                         _pct(c.student_accuracy))
        tables.append(cont)
    return tables


def _bin_cells(b: PositionBin | None, min_tokens: int) -> list[str]:
    if b is None or not b.tokens:
        return ["-", "0"]
    return [_num(b.fidelity) + ("" if b.tokens >= min_tokens else "*"), str(b.tokens)]


def _draw_side(ax, side: SideResult, min_tokens: int, color: str, label: str) -> None:
    filled = [b for b in side.bins if b.tokens >= min_tokens]
    sparse = [b for b in side.bins if 0 < b.tokens < min_tokens]
    ax.plot([b.mean_position for b in filled], [b.fidelity for b in filled], "o", color=color,
            label=f"{label} ({side.rollouts} rollouts)")
    if sparse:
        ax.plot([b.mean_position for b in sparse], [b.fidelity for b in sparse], "o", mfc="none", color=color)
    if side.fit is not None and filled:
        grid = np.linspace(filled[0].mean_position, filled[-1].mean_position, 200)  # no extrapolation
        f = side.fit
        ax.plot(grid, f.predict(grid), "-" if side.source == "student" else "--", color=color,
                label=f"fit: midpoint {f.midpoint:.0f}, slope {f.slope:.3f}, R² {f.r2:.2f}")


def plot_fidelity(result: FidelityResult, path: str | Path, title: str | None = None) -> Path:
    from matplotlib.figure import Figure  # lazy: matplotlib only when plotting

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_f, ax_c = fig.subplots(1, 2)
    _draw_side(ax_f, result.student, result.min_bin_tokens, "tab:red", "student prefixes")
    _draw_side(ax_f, result.teacher, result.min_bin_tokens, "tab:blue", "teacher's own prefixes")
    ax_f.set(xlabel="completion position t", ylabel="teacher max-prob F(t)", ylim=(None, 1.01),
             title=f"teacher fidelity (open markers: bins under {result.min_bin_tokens} tokens)")
    ax_f.legend(fontsize=8)
    if result.cuts:
        cuts = [c for c in result.cuts if c.accuracy is not None]
        ax_c.errorbar([c.position for c in cuts], [c.accuracy for c in cuts], yerr=[c.stderr for c in cuts],
                      fmt="o-", color="tab:purple", capsize=3, label="teacher continues the student's prefix")
        ax_c.plot([c.position for c in cuts], [c.student_accuracy for c in cuts], "s:", color="tab:red",
                  label="student alone (same rollouts)")
    ax_c.axhline(result.teacher.accuracy, color="tab:blue", ls="--", label="teacher alone (own rollouts)")
    ax_c.set(xlabel="cut position t (student tokens kept)", ylabel="accuracy", ylim=(-0.03, 1.03),
             title="teacher accuracy from a student prefix" if result.cuts else "continuations not measured")
    ax_c.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
