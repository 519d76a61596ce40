"""Intervals of the preconditions: percentile bootstraps that resample whole rollouts (or questions), Wilson intervals
of proportions, and the verdict rule."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np


def cluster_bootstrap(clusters: Sequence, stat: Callable[[list], float | None], *, n_boot: int = 1000,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """{'value', 'lo', 'hi', 'n'}: stat(clusters) and a percentile interval of stat over resampled lists of whole
    clusters (draws where stat is None are dropped). None everywhere when stat(clusters) is None."""
    clusters = list(clusters)
    value = stat(clusters) if clusters else None
    if value is None:
        return {"value": None, "lo": None, "hi": None, "n": len(clusters)}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        got = stat([clusters[i] for i in rng.integers(0, len(clusters), len(clusters))])
        if got is not None:
            draws.append(got)
    alpha = (1 - confidence) / 2
    lo, hi = (float(np.quantile(draws, q)) for q in (alpha, 1 - alpha)) if draws else (None, None)
    return {"value": float(value), "lo": lo, "hi": hi, "n": len(clusters)}



def wilson(successes: float, n: int, confidence: float = 0.95) -> dict:
    """A Wilson score interval of a proportion."""
    if n == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    z = z_value(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"value": p, "lo": max(0.0, centre - half), "hi": min(1.0, centre + half), "n": n}


def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def mean_or_none(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def above(ci: dict, threshold: float = 0.0) -> bool:
    """The interval lies wholly above `threshold`."""
    return ci.get("lo") is not None and ci["lo"] > threshold
