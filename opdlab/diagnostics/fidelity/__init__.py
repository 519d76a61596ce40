"""Supervision fidelity decay (docs/methods.md#supervision-fidelity-decay): F(t) on student prefixes against the
teacher's own, continuation accuracy, the fit.

  measure.py       the measurement (`opdlab diagnose fidelity`: CONFIG, run_diagnostic) and the in-training probe
  continuation.py  teacher continuations of student prefixes cut at position t
  fit.py           the logistic fit of the decay curve
  result.py        the result dataclasses, their JSON and the training metrics
  report.py        tables and the plot
"""
