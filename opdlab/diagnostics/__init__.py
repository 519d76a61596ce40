"""Diagnostics of a teacher/student pair, run from the command line as `opdlab diagnose NAME [CONFIG] [k=v ...]`.

  fidelity   supervision fidelity decay (METHODS.md section 2): the teacher's max-probability F(t) by position on
             student prefixes vs its own, its accuracy when it continues a student prefix cut at position t, and a
             logistic fit of the decay (`opdlab.diagnostics.fidelity`); also measured during training with
             `train.fidelity_every`.
  alignment  gradient alignment (METHODS.md section 4): how well each distillation signal's logit gradient agrees
             with the ideal gradient of the student's success probability (`opdlab.diagnostics.alignment`).

Each diagnostic module exposes `CONFIG` (its typed config, which `--help` lists field by field) and
`run_diagnostic(cfg, console)`.
"""
