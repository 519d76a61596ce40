"""What every `opdlab reproduce NAME` returns: one claim, its precondition, our figure with a 95 % interval, a status.

The status follows one rule for every claim (docs/claims.md):

- `phenomenon absent on this testbed` when the precondition the claim needs is not present (its own verdict);
- `reproduced` when the precondition holds and the claim's figure, oriented so that the paper's direction is
  positive, has its whole interval above 0;
- `not reproduced` otherwise (the interval reaches 0 or lies below it).

Intervals over seeds are Student-t intervals of the per-seed figures (`t_interval`): with 3 seeds the half-width is
4.30 standard errors, so only an effect that is large against the seed spread counts.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPRODUCED, NOT_REPRODUCED, ABSENT = "reproduced", "not reproduced", "phenomenon absent on this testbed"


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom, by Simpson's rule on the density over [0, |x|]."""
    if x == 0:
        return 0.5
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n, a = 4000, abs(x)
    h = a / n
    total = 0.0
    for i in range(n + 1):
        t = i * h
        w = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += w * math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
    half = total * h / 3
    return 0.5 + half if x > 0 else 0.5 - half


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (0.5 < p < 1), by bisection on `_t_cdf`."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float], confidence: float = 0.95) -> dict:
    """{'value', 'lo', 'hi', 'n', 'values'}: the mean of per-seed figures and its Student-t interval (no interval
    from one value)."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"value": None, "lo": None, "hi": None, "n": 0, "values": []}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"value": mean, "lo": None, "hi": None, "n": 1, "values": values}
    half = t_quantile(1 - (1 - confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"value": mean, "lo": mean - half, "hi": mean + half, "n": len(values), "values": values}


def status_of(precondition_present: bool, *figures: dict) -> str:
    """The rule in the module docstring; each figure is oriented so that the paper's claim is > 0, and a claim
    with several parts needs every part's interval above 0."""
    if not precondition_present:
        return ABSENT
    return REPRODUCED if all(f.get("lo") is not None and f["lo"] > 0 for f in figures) else NOT_REPRODUCED


def fmt_ci(c: dict | None, spec: str = "+.3f", scale: float = 1.0, unit: str = "") -> str:
    """'v [lo, hi]' (or 'v' without an interval, '-' without a value)."""
    if not c or c.get("value") is None:
        return "-"
    v = f"{c['value'] * scale:{spec}}{unit}"
    if c.get("lo") is None:
        return v
    return f"{v} [{c['lo'] * scale:{spec}}, {c['hi'] * scale:{spec}}]{unit}"


@dataclass
class ClaimResult:
    """One row of docs/claims.md, with everything behind it."""
    name: str
    claim: str
    """The paper's claim, in one sentence."""
    paper: str
    """The paper's own figure for it."""
    testbed: str
    precondition: str
    """What the precondition is and what it read (with its interval)."""
    precondition_present: bool
    figure_label: str
    """What `figure` measures, oriented so that the claim's direction is positive."""
    figure: dict
    """t_interval over seeds of the claim's figure."""
    figure_text: str
    command: str
    seeds: list[int]
    details: dict = field(default_factory=dict)
    """Every number behind the row (per seed, secondary figures, the sizes used)."""
    required: dict = field(default_factory=dict)
    """Further parts of a compound claim, name -> t_interval, each oriented like `figure` and each needed."""
    wall_s: float = 0.0
    status: str = ""

    def __post_init__(self):
        self.status = status_of(self.precondition_present, self.figure, *self.required.values())

    def markdown_row(self) -> str:
        cells = [f"**{self.name}**: {self.claim}", self.paper, f"{self.figure_label}: {self.figure_text}",
                 self.precondition, f"**{self.status}**", f"`{self.command}` ({self.wall_s / 60:.0f} min)"]
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


TABLE_HEADER = ("| claim | paper | ours (95% interval over seeds) | precondition | status | command |\n"
                "|---|---|---|---|---|---|")


def write_claim(result: ClaimResult, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "claim.json"
    path.write_text(json.dumps(asdict(result), indent=1, default=float) + "\n")
    return path


def load_claim(path: Path) -> ClaimResult:
    data = json.loads(Path(path).read_text())
    status = data.pop("status")
    result = ClaimResult(**data)
    result.status = status  # as measured, even if the rule above changed since
    return result


def claims_table(paths: list[Path]) -> str:
    """The markdown table of docs/claims.md from claim.json files."""
    return "\n".join([TABLE_HEADER, *(load_claim(p).markdown_row() for p in paths)])
