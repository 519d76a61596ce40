"""Gradient alignment (docs/methods.md#gradient-alignment): each distillation signal's logit gradient against the
ideal gradient of P(success).

  run.py       the diagnostic (`opdlab diagnose alignment`: CONFIG, run_diagnostic): rollouts, nodes, report
  config.py    its config, AlignmentConfig
  spec.py      the teachers / contexts compared ('MODEL+VIEW') and their prompts
  nodes.py     nodes chosen along rollouts and their targeted continuations
  targeted.py  forced-token continuations that estimate V_j
  signals.py   the descent directions of every objective, by autograd
  result.py    RUN_DIR/alignment.json: writing and reading it
  report.py    aggregation by correctness, P_succ bin and teacher
  plots.py     the figures
"""
