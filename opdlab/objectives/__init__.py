"""The objective table: name -> `Objective`. Every objective function has the same signature,

    fn(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores, cfg: ObjectiveConfig) -> ObjectiveOutput

and the training loop calls whichever `objective.name` selects; adding an objective is adding an entry here.
An entry also says what the objective needs from the teacher (`teacher_request(cfg)`: top-K ids/log-probs, and
whether to keep the teacher's hidden states for its full distribution) and its default rollout top-p, so the
loop asks `opdlab.teacher.scoring.score` for exactly that and never branches on the objective's name. A plain function
is accepted too (`as_objective`): it needs nothing beyond the sampled-token scores and samples with top-p 1.

One file per family: `opd` (sampled-token OPD), `divergence` (full-vocabulary KLs and JSD / GKD), `lsm` (teacher
top-K local support matching), `privileged` (privileged OPD on the full / partial view of an oracle trace and
the anchored residual target, AR-OPD), `lookahead` (Lookahead Group Reward, LGR); `common` holds the chunk
machinery and the per-step metrics they share.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opdlab.config import ConfigError, ObjectiveConfig
from opdlab.objectives.divergence import forward_kl, jsd, reverse_kl
from opdlab.objectives.lsm import lsm, lsm_teacher_request
from opdlab.objectives.lookahead import lookahead, lookahead_teacher_request
from opdlab.objectives.opd import sampled_token_opd
from opdlab.objectives.privileged import anchored_residual, privileged_full, privileged_partial, \
    privileged_teacher_request
from opdlab.types import ObjectiveOutput, Rollouts, StudentOutputs, TeacherRequest, TeacherScores

ObjectiveFn = Callable[[Rollouts, StudentOutputs, TeacherScores, ObjectiveConfig], ObjectiveOutput]


def _scores_only(cfg: ObjectiveConfig) -> TeacherRequest:
    return TeacherRequest()


def _top_k(cfg: ObjectiveConfig) -> TeacherRequest:
    return TeacherRequest(top_k=cfg.support_k)


def _full_distribution(cfg: ObjectiveConfig) -> TeacherRequest:
    # at temperature 1 the objective's own teacher logits give the token statistics `score` would make again
    return TeacherRequest(hidden=True, stats_from_objective=cfg.divergence.temperature == 1)


@dataclass(frozen=True)
class Objective:
    """A table entry: the function, what it needs from the teacher, and its default rollout top-p.

    Called like its function; its `__doc__` is the function's (what `opdlab objectives` prints)."""

    fn: ObjectiveFn
    teacher_request: Callable[[ObjectiveConfig], TeacherRequest] = _scores_only
    default_top_p: float = 1.0
    reward_term: bool = False  # adds objective.reward_weight's task-reward term to a sampled-token advantage

    def __post_init__(self):
        object.__setattr__(self, "__doc__", self.fn.__doc__)

    def __call__(self, rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
                 cfg: ObjectiveConfig) -> ObjectiveOutput:
        return self.fn(rollouts, student, teacher, cfg)


def as_objective(entry: Objective | ObjectiveFn) -> Objective:
    """A table entry as an `Objective` (a plain function gets the defaults)."""
    return entry if isinstance(entry, Objective) else Objective(entry)


OBJECTIVES: dict[str, Objective | ObjectiveFn] = {
    "opd": Objective(sampled_token_opd, teacher_request=_top_k, reward_term=True),  # top-K only for the support/* diagnostics
    "forward_kl": Objective(forward_kl, teacher_request=_full_distribution),
    "reverse_kl": Objective(reverse_kl, teacher_request=_full_distribution),
    "jsd": Objective(jsd, teacher_request=_full_distribution),
    "lsm": Objective(lsm, teacher_request=lsm_teacher_request, default_top_p=0.9),
    # privileged OPD (docs/methods.md#privileged-opd-and-anchored-residual-guidance-ar-opd): the teacher scores both
    # views of the oracle trace in one pass
    "privileged_full": Objective(privileged_full, teacher_request=privileged_teacher_request),
    "privileged_partial": Objective(privileged_partial, teacher_request=privileged_teacher_request),
    "anchored_residual": Objective(anchored_residual, teacher_request=privileged_teacher_request),
    # LGR (docs/methods.md#lookahead-group-reward-lgr): the teacher also scores the student's top-K candidates one step
    # ahead
    "lookahead": Objective(lookahead, teacher_request=lookahead_teacher_request, reward_term=True),
}


def check_objective(cfg: ObjectiveConfig) -> Objective:
    """`get_objective(cfg.name)`, and a `ConfigError` when the settings ask for what it does not do (a reward
    term, objective.reward_weight, on an objective without a sampled-token advantage)."""
    objective = get_objective(cfg.name)
    if cfg.reward_weight > 0 and not objective.reward_term:
        with_term = sorted(n for n, e in OBJECTIVES.items() if as_objective(e).reward_term)
        raise ConfigError(f"invalid configuration: objective.reward_weight: {cfg.name!r} has no sampled-token "
                          f"advantage to add the task-reward term to (got reward_weight={cfg.reward_weight}); "
                          f"objectives with one: {', '.join(with_term)}")
    return objective


def get_objective(name: str) -> Objective:
    """The table entry named `name` (`objective.name`), as an `Objective`; an unknown name is a `ConfigError`."""
    if name not in OBJECTIVES:
        raise ConfigError(f"invalid configuration: objective.name: unknown objective {name!r} (got {name!r}); "
                          f"allowed: {', '.join(sorted(OBJECTIVES))}")
    return as_objective(OBJECTIVES[name])
