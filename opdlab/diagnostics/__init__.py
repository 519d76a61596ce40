"""Diagnostics of a teacher/student pair, run from the command line as `opdlab diagnose NAME [CONFIG] [k=v ...]`.

  fidelity/   supervision fidelity decay (docs/methods.md#supervision-fidelity-decay): the teacher's
              max-probability F(t) by position on student prefixes vs its own, its accuracy when it continues a
              student prefix cut at position t, and a logistic fit of the decay (`opdlab.diagnostics.fidelity.measure`);
              also measured during training with `train.fidelity_every`.
  alignment/  gradient alignment (docs/methods.md#gradient-alignment): how well each distillation signal's logit
              gradient agrees with the ideal gradient of the student's success probability
              (`opdlab.diagnostics.alignment.run`).

  preconditions/  `opdlab diagnose [--pair NAME]` with no NAME: whether each phenomenon the methods address (fidelity
              decay, informative lookahead rewards, an informative trace, nodes in every P_succ bin) is present for a
              pair and task, with intervals (`opdlab.diagnostics.preconditions.run`).

Each diagnostic's entry module (the one named in `opdlab.cli.DIAGNOSTICS`) exposes `CONFIG` (its typed config,
which `--help` lists field by field) and `run_diagnostic(cfg, console)`.
"""
