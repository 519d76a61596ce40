"""Weighted least-squares fit of a logistic decay curve, with numpy only.

    from opdlab.diagnostics.fidelity.fit import fit_logistic, logistic
    fit = fit_logistic(position_N, fidelity_N, weight_N)     # None when there are too few points
    fit.midpoint, fit.slope, fit.r2, fit.predict(position_N)

The curve (docs/methods.md#supervision-fidelity-decay) is `floor + amplitude / (1 + exp(slope * (t - midpoint)))`:
it starts near `floor + amplitude` and falls to `floor` around `t = midpoint`, the faster the larger `slope` (in
1 / position).
The form has one symmetry, (floor, amplitude, slope) ~ (floor + amplitude, -amplitude, -slope); the fit reports
the member with slope >= 0, so `floor` is always the level far to the right and `floor + amplitude` the level far
to the left: amplitude > 0 is a decay, amplitude < 0 a rise.

The fit minimises sum_i w_i (y_i - f(t_i))^2. For fixed (slope, midpoint) the curve is linear in (floor, amplitude),
so a grid over (slope, midpoint) with those two solved exactly gives a starting point near the global optimum,
and Levenberg-Marquardt on all four parameters refines it. Positions are rescaled to [0, 1] inside the fit so
that one grid serves curves of any length. Two bounds keep the fit identifiable on curves that are nearly flat or
nearly straight (where a far-away midpoint with a huge amplitude fits as well as anything): the midpoint stays
within the positions observed, and |slope| * span within [1, 500]. R^2 = 1 - SS_res / SS_tot
with both sums weighted by w.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MIN_POINTS = 5  # four parameters: with fewer points than five the fit is exact or underdetermined
MID_RANGE = (0.0, 1.0)  # midpoint bounds, in positions rescaled to [0, 1]
SLOPE_RANGE = (1.0, 500.0)  # |slope| bounds, in 1 / rescaled position


@dataclass
class LogisticFit:
    """A fitted logistic curve in the data's own position units, and how well it fits."""

    floor: float
    amplitude: float
    slope: float
    midpoint: float
    r2: float
    num_points: int

    def predict(self, t) -> np.ndarray:
        return logistic(np.asarray(t, dtype=float), self.floor, self.amplitude, self.slope, self.midpoint)

    def to_dict(self) -> dict:
        return asdict(self)


def _sigmoid_neg(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(z)), without overflow for large |z|."""
    return 0.5 * (1.0 - np.tanh(0.5 * z))


def logistic(t: np.ndarray, floor: float, amplitude: float, slope: float, midpoint: float) -> np.ndarray:
    return floor + amplitude * _sigmoid_neg(slope * (t - midpoint))


def _linear_part(g: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Best (floor, amplitude) for fixed g = 1 / (1 + exp(...)), and the weighted residual sum of squares."""
    a_N_2 = np.stack([np.ones_like(g), g], axis=1) * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(a_N_2, y * np.sqrt(w), rcond=None)
    resid = y - coef[0] - coef[1] * g
    return float(coef[0]), float(coef[1]), float(np.sum(w * resid ** 2))


def _project(theta: np.ndarray) -> np.ndarray:
    floor, amp, slope, mid = theta
    slope = np.copysign(np.clip(abs(slope), *SLOPE_RANGE), slope)
    return np.array([floor, amp, slope, np.clip(mid, *MID_RANGE)])


def _levenberg_marquardt(u, y, w, theta, iters: int = 300) -> np.ndarray:
    """Levenberg-Marquardt, each step projected back into the bounds."""
    sw = np.sqrt(w)

    def residual(th):
        return sw * (logistic(u, *th) - y)

    def jacobian(th):
        floor, amp, slope, mid = th
        g = _sigmoid_neg(slope * (u - mid))
        dg = g * (1.0 - g)  # d g / d z is -dg, with z = slope * (u - mid)
        cols = [np.ones_like(u), g, -amp * dg * (u - mid), amp * dg * slope]
        return np.stack(cols, axis=1) * sw[:, None]

    r = residual(theta)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        j = jacobian(theta)
        jtj, jtr = j.T @ j, j.T @ r
        step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -jtr)
        candidate = _project(theta + step)
        r_new = residual(candidate)
        new_cost = float(r_new @ r_new)
        if np.isfinite(new_cost) and new_cost < cost:
            done = cost - new_cost <= 1e-14 * max(cost, 1e-30)
            theta, r, cost, lam = candidate, r_new, new_cost, max(lam / 3.0, 1e-12)
            if done:
                break
        else:
            lam *= 4.0
            if lam > 1e12:
                break
    return theta


def fit_logistic(t, y, w=None) -> LogisticFit | None:
    """Fit `floor + amplitude / (1 + exp(slope * (t - midpoint)))` to points (t, y) with weights w (default 1).

    Returns None with fewer than MIN_POINTS points of positive weight or fewer than two distinct positions."""
    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    w = np.ones_like(t) if w is None else np.asarray(w, dtype=float)
    if not (t.shape == y.shape == w.shape) or t.ndim != 1:
        raise ValueError(f"fit_logistic: t, y and w must be 1-D of one length, got {t.shape}, {y.shape}, {w.shape}")
    if not (np.isfinite(t).all() and np.isfinite(y).all() and np.isfinite(w).all()) or (w < 0).any():
        raise ValueError("fit_logistic: t, y and w must be finite and w non-negative")
    keep = w > 0
    t, y, w = t[keep], y[keep], w[keep]
    if len(t) < MIN_POINTS or np.ptp(t) == 0:
        return None
    w = w / w.sum()
    lo, span = float(t.min()), float(np.ptp(t))
    u = (t - lo) / span  # positions rescaled to [0, 1]

    best = None
    for slope in (-64, -16, -6, -2, 2, 6, 16, 64):
        for mid in np.linspace(0.0, 1.0, 11):
            floor, amp, sse = _linear_part(_sigmoid_neg(slope * (u - mid)), y, w)
            if best is None or sse < best[0]:
                best = (sse, np.array([floor, amp, float(slope), float(mid)]))
    floor, amp, slope_u, mid_u = _levenberg_marquardt(u, y, w, best[1])
    if slope_u < 0:  # the same curve written with slope >= 0
        floor, amp, slope_u = floor + amp, -amp, -slope_u

    fit = LogisticFit(floor=float(floor), amplitude=float(amp), slope=float(slope_u / span),
                      midpoint=float(lo + mid_u * span), r2=float("nan"), num_points=len(t))
    mean = float(np.sum(w * y))
    ss_tot = float(np.sum(w * (y - mean) ** 2))
    ss_res = float(np.sum(w * (y - fit.predict(t)) ** 2))
    fit.r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return fit
