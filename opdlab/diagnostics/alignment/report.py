"""Aggregates and the terminal table of a gradient alignment run, computed from its JSON alone.

For every (teacher / context, signal): mean alignment over all nodes, over nodes of correct rollouts and of
incorrect ones, and incorrect minus correct, each with a percentile bootstrap confidence interval. Nodes of one
rollout are not independent, so the bootstrap resamples whole rollouts (a cluster bootstrap: the mean is the sum
over the drawn rollouts' nodes divided by their count); the difference resamples the two groups independently.
Nodes where alignment is undefined (g* = 0: every candidate had the same success value) are left out and counted.

How well a cheap divergence screens for alignment: Spearman rank correlation between alignment and KL(p||q),
KL(q||p) and JS at the same nodes (p the student, q the teacher under that context), with average ranks for ties.
Per question: mean alignment over each question's nodes. Per position: mean alignment by completion position.
By success probability: the same split within bins of the node's P_succ (`P_SUCC_BINS`), since incorrect rollouts
hold most of the nodes that come after an error (P_succ near 0); and over the nodes up to the first error (prefixes
of the oracle's worked solution, `opdlab.diagnostics.alignment.nodes.before_first_error`), the other comparison in
which correct and incorrect rollouts hold the same kind of node. Every cell carries its node count.

    from opdlab.diagnostics.alignment.result import load_result
    from opdlab.diagnostics.alignment.report import summarise, summary_table
    rich.print(summary_table(load_result("runs/alignment")))
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from rich.table import Table

DIVERGENCES = ("kl_student_teacher", "kl_teacher_student", "js")
# Nodes binned by their success probability P_succ: past an error nothing the student is likely to write rescues
# the response (low P_succ), before it most things do; the split by rollout correctness mixes both kinds of node.
P_SUCC_BINS = ((0.0, 0.2), (0.2, 0.6), (0.6, 1.0))


def bootstrap_ci(values: Sequence[float], clusters: Sequence | None = None, *, n_boot: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> dict:
    """{'mean', 'lo', 'hi', 'n'}: the mean of `values` and a percentile bootstrap interval, resampling whole
    clusters (one cluster per value when `clusters` is None). Empty input gives None for mean, lo and hi."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    clusters = list(range(len(values))) if clusters is None else list(clusters)
    if len(clusters) != len(values):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    _, label = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    sums, counts = np.bincount(label, weights=values), np.bincount(label).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1 - confidence) / 2
    return {"mean": float(values.mean()), "lo": float(np.quantile(means, alpha)),
            "hi": float(np.quantile(means, 1 - alpha)), "n": int(len(values)), "_draws": means}


def difference_ci(a: dict, b: dict, confidence: float = 0.95) -> dict:
    """mean(a) - mean(b) with the interval of the difference of their (independent) bootstrap draws."""
    if a["mean"] is None or b["mean"] is None:
        return {"mean": None, "lo": None, "hi": None}
    diff = a["_draws"] - b["_draws"]
    alpha = (1 - confidence) / 2
    return {"mean": a["mean"] - b["mean"], "lo": float(np.quantile(diff, alpha)),
            "hi": float(np.quantile(diff, 1 - alpha))}


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson correlation of average ranks); None with < 3 points or a constant."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return None if denom == 0 else float((rx * ry).sum() / denom)


def node_rows(result: dict) -> list[dict]:
    """One flat row per (node, teacher, signal) with a defined alignment."""
    correct = {r["index"]: r["correct"] for r in result["rollouts"]}
    uid = {r["index"]: r["question_uid"] for r in result["rollouts"]}
    rows = []
    for node in result["nodes"]:
        for teacher, tv in node["teachers"].items():
            for signal, sv in tv["signals"].items():
                if sv.get("alignment") is None:
                    continue
                rows.append({"rollout": node["rollout"], "question": uid[node["rollout"]], "position": node["position"],
                             "p_succ": node["p_succ"], "correct": correct[node["rollout"]], "teacher": teacher,
                             "before_error": node.get("before_error"),
                             "signal": signal,
                             "alignment": sv["alignment"], "param_alignment": sv.get("param_alignment"),
                             **{k: tv[k] for k in DIVERGENCES}})
    return rows


def in_bin(p_succ: float, lo: float, hi: float) -> bool:
    """P_SUCC_BINS membership: [lo, hi), the last bin closed at 1."""
    return lo <= p_succ < hi or (hi == 1.0 and p_succ == 1.0)


def _public(ci: dict) -> dict:
    return {k: v for k, v in ci.items() if not k.startswith("_")}


def summarise(result: dict, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The aggregates described in the module docstring, as a JSON-able dict."""
    rows = node_rows(result)
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["teacher"], row["signal"]].append(row)
    groups, per_question, per_position = [], {}, {}
    total = len(result["nodes"])
    for teacher in result["teachers"]:
        for signal in result["signals"]:
            rs = grouped.get((teacher, signal), [])

            def ci(subset, key="alignment"):
                subset = [r for r in subset if r[key] is not None]
                return bootstrap_ci([r[key] for r in subset], [r["rollout"] for r in subset], n_boot=n_boot,
                                    confidence=confidence, seed=seed)
            everything, right = ci(rs), ci([r for r in rs if r["correct"]])
            wrong = ci([r for r in rs if not r["correct"]])
            entry = {"teacher": teacher, "signal": signal, "nodes": total, "defined": len(rs),
                     "all": _public(everything), "correct": _public(right), "incorrect": _public(wrong),
                     "incorrect_minus_correct": difference_ci(wrong, right, confidence),
                     **{f"spearman_{k}": spearman([r[k] for r in rs], [r["alignment"] for r in rs])
                        for k in DIVERGENCES}}
            def split(inside):
                a, b = ci([r for r in inside if r["correct"]]), ci([r for r in inside if not r["correct"]])
                return {"all": _public(ci(inside)), "correct": _public(a), "incorrect": _public(b),
                        "incorrect_minus_correct": difference_ci(b, a, confidence)}
            entry["by_p_succ"] = [{"lo": lo, "hi": hi, **split([r for r in rs if in_bin(r["p_succ"], lo, hi)])}
                                  for lo, hi in P_SUCC_BINS]
            entry["before_first_error"] = split([r for r in rs if r["before_error"]])
            if any(r["param_alignment"] is not None for r in rs):
                entry["param_all"] = _public(ci(rs, "param_alignment"))
            groups.append(entry)
            by_q, by_t = defaultdict(list), defaultdict(list)
            for r in rs:
                by_q[r["question"]].append(r["alignment"])
                by_t[r["position"]].append(r["alignment"])
            per_question.setdefault(teacher, {})[signal] = {q: float(np.mean(v)) for q, v in by_q.items()}
            per_position.setdefault(teacher, {})[signal] = [[t, float(np.mean(by_t[t])), len(by_t[t])]
                                                            for t in sorted(by_t)]
    rollouts = result["rollouts"]
    return {"groups": groups, "per_question": per_question, "per_position": per_position, "nodes": total,
            "informative_nodes": sum(bool(n["informative"]) for n in result["nodes"]),
            "rollouts": len(rollouts), "correct_rollouts": sum(r["correct"] for r in rollouts),
            "rollouts_with_nodes": len({n["rollout"] for n in result["nodes"]}), "confidence": confidence,
            "bootstrap": n_boot}


def _fmt(ci: dict) -> str:
    if ci.get("mean") is None:
        return "-"
    n = f" ({ci['n']})" if "n" in ci else ""
    return f"{ci['mean']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}]{n}"


def _rho(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def summary_table(result: dict) -> Table:
    """Alignment per teacher / context and signal: all nodes, correct vs incorrect rollouts, the difference."""
    s = result["summary"]
    level = round(100 * s["confidence"])
    table = Table(title=f"gradient alignment cos(g*, d) ({level}% bootstrap CI over rollouts); "
                        f"{s['nodes']} nodes ({s['informative_nodes']} with g* != 0) in {s['rollouts_with_nodes']} "
                        f"rollouts, {s['correct_rollouts']}/{s['rollouts']} rollouts correct")
    for col in ("teacher", "signal", "all", "correct rollouts", "incorrect rollouts", "incorrect - correct",
                "rho KL(p||q)", "rho JS"):
        table.add_column(col, justify="left" if col in ("teacher", "signal") else "right")
    for g in s["groups"]:
        table.add_row(g["teacher"], g["signal"], _fmt(g["all"]), _fmt(g["correct"]), _fmt(g["incorrect"]),
                      _fmt(g["incorrect_minus_correct"]), _rho(g["spearman_kl_student_teacher"]),
                      _rho(g["spearman_js"]))
    return table


def p_succ_table(result: dict) -> Table:
    """Mean alignment within bins of the node's success probability and over the nodes up to the first error,
    correct vs incorrect rollouts (node counts in brackets; the intervals are in the JSON)."""
    s = result["summary"]
    table = Table(title="gradient alignment by the node's success probability P_succ and up to the first error: "
                        "correct / incorrect rollouts (nodes)")
    table.add_column("teacher")
    table.add_column("signal")
    for lo, hi in P_SUCC_BINS:
        table.add_column(f"{lo:g} <= P_succ {'<=' if hi == 1.0 else '<'} {hi:g}", justify="right")
    table.add_column("up to the first error", justify="right")
    for g in s["groups"]:
        cells = []
        for b in [*g["by_p_succ"], g.get("before_first_error")]:
            if b is None:  # a result written before this stratum existed
                cells.append("-")
                continue
            parts = [f"{b[k]['mean']:+.2f} ({b[k]['n']})" if b[k]["mean"] is not None else "- (0)"
                     for k in ("correct", "incorrect")]
            cells.append(" / ".join(parts))
        table.add_row(g["teacher"], g["signal"], *cells)
    return table
