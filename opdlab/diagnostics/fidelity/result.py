"""The result of a fidelity measurement (`opdlab.diagnostics.fidelity.measure`): plain dataclasses, their JSON
(OUTPUT/fidelity.json, one line of RUN_DIR/fidelity.jsonl in training) and the few `fidelity/*` training metrics.

    FidelityResult   both prefix sources and the continuation accuracy by cut, with `info`
    SideResult       the rollouts of one model (the prefix source), scored by the teacher, binned and fitted
    PositionBin      the teacher's statistics over one bin of completion positions
    CutResult        the teacher continuing student prefixes cut after t tokens
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opdlab.diagnostics.fidelity.fit import LogisticFit


@dataclass
class PositionBin:
    """Teacher statistics over the completion positions [start, end) of a set of rollouts (None when empty)."""

    start: int
    end: int
    tokens: int
    rollouts: int
    mean_position: float | None
    fidelity: float | None  # mean teacher max-prob
    entropy: float | None  # mean teacher entropy (nats)


@dataclass
class SideResult:
    """Rollouts of one model (the prefix source), scored by the teacher."""

    source: str  # 'student' or 'teacher'
    bins: list[PositionBin]
    fit: LogisticFit | None
    accuracy: float  # mean verifier reward of these rollouts
    mean_length: float
    rollouts: int
    texts: list[str]
    completions: list[list[int]] = field(default_factory=list, repr=False)  # token ids; not written to JSON
    rewards: list[float] = field(default_factory=list, repr=False)
    # per rollout, the teacher's F at each completion position in order; not written to JSON
    token_fidelity: list[list[float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("completions", "rewards", "fit", "token_fidelity")}
        d["fit"] = self.fit.to_dict() if self.fit else None
        return d


@dataclass
class CutResult:
    """The teacher continuing student prefixes cut after `position` completion tokens."""

    position: int
    prefixes: int
    continuations: int
    accuracy: float | None  # mean verifier reward of prefix + teacher continuation
    stderr: float | None  # binomial standard error sqrt(p (1 - p) / continuations)
    student_accuracy: float | None  # mean reward of the same student rollouts, uncut


@dataclass
class FidelityResult:
    """One measurement: both prefix sources, the continuation accuracy by cut (empty when not measured), and
    `info` (task, problems, seed, the config, wall time; the command adds the model paths)."""

    student: SideResult
    teacher: SideResult
    cuts: list[CutResult]
    min_bin_tokens: int
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"info": self.info, "min_bin_tokens": self.min_bin_tokens, "student": self.student.to_dict(),
                "teacher": self.teacher.to_dict(), "cuts": [asdict(c) for c in self.cuts]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def summary_metrics(self, prefix: str = "fidelity/") -> dict[str, float]:
        """A few numbers that show the curve move during training (absent when undefined, never NaN)."""
        out: dict[str, float] = {}
        for side in (self.student, self.teacher):
            full = [b for b in side.bins if b.tokens >= self.min_bin_tokens]
            if full:
                out[f"{prefix}{side.source}_F_early"] = full[0].fidelity
                out[f"{prefix}{side.source}_F_late"] = full[-1].fidelity
                out[f"{prefix}{side.source}_late_bin_start"] = float(full[-1].start)
            out[f"{prefix}{side.source}_accuracy"] = side.accuracy
            total = sum(b.tokens for b in side.bins)
            if total:
                out[f"{prefix}{side.source}_F_mean"] = sum(b.fidelity * b.tokens for b in side.bins if b.tokens) / total
        s = self.student
        out[f"{prefix}student_len"] = s.mean_length
        if s.fit is not None:
            out.update({f"{prefix}fit_{k}": getattr(s.fit, k) for k in ("floor", "amplitude", "slope", "midpoint")})
            if math.isfinite(s.fit.r2):
                out[f"{prefix}fit_r2"] = s.fit.r2
        scored = [c for c in self.cuts if c.accuracy is not None]
        if scored:
            out[f"{prefix}continuation_acc_first_cut"] = scored[0].accuracy
            out[f"{prefix}continuation_acc_last_cut"] = scored[-1].accuracy
            out[f"{prefix}last_cut"] = float(scored[-1].position)
        return out
