"""`opdlab reproduce estimator`: the token-level OPD gradient estimator's variance grows more slowly with the
horizon T than the sequence-level one's (the LSM paper: O(T^2) against O(T^4)).

Testbed: the 1-D control toy of `opdlab toy estimators` (`opdlab.experiments.toy.estimators`). Per seed and per
horizon T, a REINFORCE teacher is trained at that horizon and a fresh student (the same initialisation for both
estimators) is measured before any update: the trace of the covariance of the B-trajectory gradient estimate over
M micro-batches, for gamma = 0 (token-level) and gamma = 1 (sequence-level). The growth exponent of each is the
slope of log variance against log T (least squares over the horizons); the claim's figure is the sequence-level
slope minus the token-level one (the paper's scaling: 4 - 2 = 2), with a t interval over seeds.

Precondition: there is something to estimate, i.e. the student starts away from the teacher (the sequence
KL(pi_theta || q) at the start, every horizon, above 0) and the teacher solves its task (its distance to the target
below the toy's failure distance).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.experiments.reproduce.claims import ClaimResult, fmt_ci, t_interval
from opdlab.experiments.toy.estimators import GaussianPolicy, ToyConfig, evaluate, gradient_variance, train_teacher


@dataclass(frozen=True)
class Sizes:
    horizons: tuple[int, ...] = (10, 14, 20, 28, 40)
    """Horizons T (the toy needs T >= 10: the target is 10 maximal steps away)."""
    micro_batches: int = 16
    """M: micro-batches of the variance estimate."""
    teacher_steps: int = 300
    teacher_batch: int = 256


QUICK = Sizes(horizons=(10, 20), micro_batches=4, teacher_steps=20, teacher_batch=64)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def measure(seed: int, sizes: Sizes, progress: bool = True) -> dict:
    per_t = []
    for T in tqdm(sizes.horizons, desc=f"seed {seed}: horizons", disable=not progress, leave=False):
        cfg = replace(ToyConfig(), horizon=T, seeds=(seed,), micro_batches=sizes.micro_batches,
                      teacher_steps=sizes.teacher_steps, teacher_batch=sizes.teacher_batch)
        teacher = train_teacher(cfg, seed, progress=False)
        torch.manual_seed(10_000 + seed)
        student = GaussianPolicy(cfg)
        gen = torch.Generator().manual_seed(30_000 + seed)
        start = evaluate(student, teacher, cfg, gen)
        row = {"horizon": T, "kl_start": start["kl"],
               "teacher_distance": evaluate(teacher, teacher, cfg, gen)["distance"]}
        for gamma, key in ((0.0, "token"), (1.0, "sequence")):
            row[f"var_{key}"], row[f"mean_sq_{key}"] = gradient_variance(student, teacher, gamma, cfg, gen)
        per_t.append(row)
    horizons = [r["horizon"] for r in per_t]
    return {"seed": seed, "per_horizon": per_t,
            "slope_token": slope(horizons, [r["var_token"] for r in per_t]),
            "slope_sequence": slope(horizons, [r["var_sequence"] for r in per_t])}


def reproduce(out: Path, seeds: list[int], quick: bool = False, progress: bool = True, **_) -> ClaimResult:
    t0 = time.perf_counter()
    sizes = QUICK if quick else Sizes()
    runs = [measure(s, sizes, progress) for s in tqdm(seeds, desc="seeds", disable=not progress)]
    token = t_interval([r["slope_token"] for r in runs])
    sequence = t_interval([r["slope_sequence"] for r in runs])
    diff = t_interval([r["slope_sequence"] - r["slope_token"] for r in runs])
    kl_min = min(r["kl_start"] for run in runs for r in run["per_horizon"])
    dist_max = max(r["teacher_distance"] for run in runs for r in run["per_horizon"])
    fail = ToyConfig().fail_distance
    present = kl_min > 0 and dist_max < fail
    ratio = t_interval([math.log(run["per_horizon"][-1]["var_sequence"] / run["per_horizon"][-1]["var_token"])
                        for run in runs])
    return ClaimResult(
        name="estimator", claim="token-level OPD gradient variance grows more slowly with length than sequence-level",
        paper="worst-case variance bound O(T^2) token-level against O(T^4) sequence-level: exponent difference "
              "2 (Fu et al., arXiv 2603.25562)",
        testbed=f"1-D control toy, horizons {list(sizes.horizons)}, gradient variance at the student's start over "
                f"M = {sizes.micro_batches} micro-batches of 64 trajectories",
        precondition=(f"student starts away from the teacher: smallest start KL {kl_min:.2f} (> 0); teachers solve "
                      f"their task: largest distance to target {dist_max:.3f} (< {fail})"),
        precondition_present=present,
        figure_label="growth exponent, sequence-level minus token-level",
        figure=diff,
        figure_text=(f"{fmt_ci(diff, '+.2f')} (token {fmt_ci(token, '.2f')}, sequence {fmt_ci(sequence, '.2f')}; "
                     f"at T={sizes.horizons[-1]} sequence/token variance x{math.exp(ratio['value']):.0f})"),
        command="opdlab reproduce estimator", seeds=list(seeds),
        details={"runs": runs, "slope_token": token, "slope_sequence": sequence, "log_ratio_longest": ratio,
                 "sizes": sizes.__dict__},
        wall_s=time.perf_counter() - t0)
