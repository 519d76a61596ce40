"""`opdlab reproduce alignment`: distillation signals align better with the gradient of success on incorrect
rollouts than on correct ones (the gradient alignment paper: "clearly higher on incorrect rollouts").

Testbed: the built-in pair on the demo's task, or `--student/--teacher`; the external teacher, signals reverse_kl
(the headline) and opd. Per seed, one `opdlab diagnose alignment` run (its own student rollouts and targeted
rollouts; `BUDGET` targeted rollouts).

The split by correctness mixes in the composition of the two sets (incorrect rollouts hold most nodes after an
error, where P_succ is near 0), so the claim's figure is stratified: within each P_succ bin, incorrect minus correct
mean alignment, averaged over the bins that hold nodes of both kinds, weighted by the bin's node count; per seed,
t interval over seeds. Also reported: the unstratified difference and the difference over nodes up to the first
error.

Precondition (training-free, from the same runs): enough nodes, i.e. pooled over seeds every (P_succ bin, correct /
incorrect) cell holds at least `MIN_NODES` nodes.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from opdlab.config import ModelConfig
from opdlab.diagnostics.alignment.config import AlignmentConfig
from opdlab.diagnostics.alignment.run import run_alignment
from opdlab.experiments.demo import demo_config_path
from opdlab.experiments.pairs import prepare_models_of
from opdlab.experiments.reproduce.claims import ClaimResult, fmt_ci, t_interval
from opdlab.experiments.reproduce.common import BUILTIN_STUDENT, BUILTIN_TEACHER
from opdlab.run import load_run_config

SIGNAL, SIGNALS = "reverse_kl", ["reverse_kl", "opd"]
# 32 questions x 2 rollouts gave 4 correct nodes a seed in the [0, 0.2) bin; 96 x 2 give about three times as
# many, so the pooled cell can reach MIN_NODES. The budget grows with the nodes (about 48 targeted rollouts a node).
QUESTIONS, BUDGET, MIN_NODES = 96, 36000, 20


def stratified_difference(group: dict) -> float | None:
    """Node-weighted mean over P_succ bins holding both kinds of node of (incorrect - correct) mean alignment."""
    total, weight = 0.0, 0
    for b in group["by_p_succ"]:
        c, i = b["correct"], b["incorrect"]
        if c["mean"] is None or i["mean"] is None:
            continue
        n = c["n"] + i["n"]
        total += n * (i["mean"] - c["mean"])
        weight += n
    return total / weight if weight else None


def _group(result: dict, signal: str) -> dict:
    return next(g for g in result["summary"]["groups"] if g["teacher"] == "teacher" and g["signal"] == signal)


def reproduce(out: Path, seeds: list[int], quick: bool = False, progress: bool = True, student: str | None = None,
              teacher: str | None = None) -> ClaimResult:
    t0 = time.perf_counter()
    prepare_models_of(load_run_config(demo_config_path(), [f"student.path={student or BUILTIN_STUDENT}",
                                                           f"teacher.path={teacher or BUILTIN_TEACHER}"]))
    sizes = (dict(num_questions=3, samples_per_question=1, max_new_tokens=24, rollouts_per_candidate=2, budget=60,
                  bootstrap=100) if quick else dict(num_questions=QUESTIONS, samples_per_question=2, budget=BUDGET))
    results = {}
    for seed in seeds:
        cfg = AlignmentConfig(student=ModelConfig(path=student or BUILTIN_STUDENT),
                              teacher=ModelConfig(path=teacher or BUILTIN_TEACHER), teachers=["teacher"],
                              signals=SIGNALS, seed=seed, run_dir=str(out / f"seed-{seed}"), example_rollouts=0,
                              **sizes)
        results[seed] = run_alignment(cfg, console=Console(quiet=not progress), progress=progress)
    per = {sig: {s: _group(results[s], sig) for s in seeds} for sig in SIGNALS}
    strat = {sig: t_interval([stratified_difference(g) for g in per[sig].values()]) for sig in SIGNALS}
    plain = {sig: t_interval([g["incorrect_minus_correct"]["mean"] for g in per[sig].values()]) for sig in SIGNALS}
    first_error = {sig: t_interval([g["before_first_error"]["incorrect_minus_correct"]["mean"]
                                    for g in per[sig].values()]) for sig in SIGNALS}
    cells = {}
    for g in per[SIGNAL].values():
        for b in g["by_p_succ"]:
            key = f"[{b['lo']:g}, {b['hi']:g})"
            got = cells.setdefault(key, [0, 0])
            got[0] += b["correct"]["n"]
            got[1] += b["incorrect"]["n"]
    smallest = min(min(v) for v in cells.values())
    cell_text = ", ".join(f"{k}: {c} / {i}" for k, (c, i) in cells.items())
    nodes = sum(g["defined"] for g in per[SIGNAL].values())
    return ClaimResult(
        name="alignment", claim="distillation signals align better with the success gradient on incorrect rollouts",
        paper="alignment much higher on incorrect rollouts than on correct ones (Armandpour et al., "
              "arXiv 2605.10889)",
        testbed=f"built-in pair, demo task, external teacher, {sizes['num_questions']} questions x "
                f"{sizes['samples_per_question']} rollouts and {sizes['budget']} targeted rollouts per seed",
        precondition=(f"nodes per P_succ bin, correct / incorrect, pooled over seeds: {cell_text} (needs "
                      f"{MIN_NODES} in every cell)"),
        precondition_present=smallest >= MIN_NODES,
        figure_label=f"{SIGNAL} alignment, incorrect minus correct, within P_succ bins",
        figure=strat[SIGNAL],
        figure_text=(f"{fmt_ci(strat[SIGNAL], '+.3f')} over {nodes} nodes (unstratified "
                     f"{fmt_ci(plain[SIGNAL], '+.3f')}; up to the first error {fmt_ci(first_error[SIGNAL], '+.3f')}; "
                     f"opd within bins {fmt_ci(strat['opd'], '+.3f')})"),
        command="opdlab reproduce alignment", seeds=list(seeds),
        details={"stratified": strat, "unstratified": plain, "before_first_error": first_error, "cells": cells,
                 "by_p_succ": {sig: {s: g["by_p_succ"] for s, g in per[sig].items()} for sig in SIGNALS},
                 "sizes": sizes},
        wall_s=time.perf_counter() - t0)
