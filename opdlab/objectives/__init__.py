"""The objective table: name -> objective function. Every objective has the same signature,

    fn(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores, cfg: ObjectiveConfig) -> ObjectiveOutput

and the training loop calls whichever `objective.name` selects; adding an objective is adding an entry here.
"""
from __future__ import annotations

from opdlab.objectives.opd import sampled_token_opd

OBJECTIVES = {
    "opd": sampled_token_opd,
}
