"""The SFD precondition: does the teacher's confidence decay on the student's prefixes more than on its own?

One fidelity measurement (`opdlab.diagnostics.fidelity.measure.measure_fidelity`, sized by the `sfd_*` fields) gives
F(t) = max_v pi_T(v | x, y_<t) on student and on teacher rollouts, the logistic fit of each curve (amplitude, R^2)
and the teacher's accuracy continuing cut student prefixes. Reported with intervals:

- decay = mean F over the first bin minus mean F from the late threshold on (the start of the last bin of the
  student curve holding `sfd_min_bin_tokens` tokens), for each side, resampling rollouts; and the student's decay
  minus the teacher's (the null: a decay both share is an effect of position, not of the student's prefixes);
- the continuation accuracy at the first cut (t = 0: the teacher alone) and the last, Wilson intervals, and the drop.
"""
from __future__ import annotations

import math

import numpy as np

from opdlab.diagnostics.preconditions.stats import cluster_bootstrap, wilson, z_value


def _decay(rows: list[list[float]], early_end: int, late_start: int) -> float | None:
    early = [f for row in rows for f in row[:early_end]]
    late = [f for row in rows for f in row[late_start:]]
    return float(np.mean(early) - np.mean(late)) if early and late else None


def summarise_sfd(result, cfg) -> dict:
    boot = dict(n_boot=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    s, t = result.student, result.teacher
    full = [b for b in s.bins if b.tokens >= cfg.sfd_min_bin_tokens]
    late = full[-1].start if len(full) > 1 else None
    out = {"late_from": late, "student_accuracy": s.accuracy, "teacher_accuracy": t.accuracy,
           "student_length": s.mean_length, "teacher_length": t.mean_length,
           "fit": {side.source: side.fit.to_dict() if side.fit else None for side in (s, t)}}
    if late is None:
        out.update(student_decay=None, teacher_decay=None, excess_decay=None)
    else:
        e = cfg.sfd_bin_size
        out["student_decay"] = cluster_bootstrap(s.token_fidelity, lambda rs: _decay(rs, e, late), **boot)
        out["teacher_decay"] = cluster_bootstrap(t.token_fidelity, lambda rs: _decay(rs, e, late), **boot)
        pairs = list(zip(s.token_fidelity, t.token_fidelity))  # the same question and sample index on both sides

        def excess(ps):
            a, b = _decay([p[0] for p in ps], e, late), _decay([p[1] for p in ps], e, late)
            return None if a is None or b is None else a - b
        out["excess_decay"] = cluster_bootstrap(pairs, excess, **boot)
    cuts = [c for c in result.cuts if c.accuracy is not None]
    out["cuts"] = [{"position": c.position, **wilson(c.accuracy * c.continuations, c.continuations,
                                                     cfg.confidence)} for c in cuts]
    if len(cuts) >= 2:
        a, b = cuts[0], cuts[-1]
        se = math.sqrt(sum(c.accuracy * (1 - c.accuracy) / c.continuations for c in (a, b)))
        z = z_value(cfg.confidence)
        drop = a.accuracy - b.accuracy
        out["continuation_drop"] = {"value": drop, "lo": drop - z * se, "hi": drop + z * se,
                                    "first_cut": a.position, "last_cut": b.position}
    else:
        out["continuation_drop"] = {"value": None, "lo": None, "hi": None}
    return out

