"""Pieces the claim modules share: the precondition measurement (`opdlab diagnose`), objective runs from the same
student (`opdlab compare`), and the sizes of a quick smoke run."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from opdlab.config import ModelConfig
from opdlab.diagnostics.preconditions.config import PreconditionsConfig
from opdlab.diagnostics.preconditions.run import run_preconditions
from opdlab.experiments.compare import run_compare

BUILTIN_STUDENT, BUILTIN_TEACHER = "builtin:student", "builtin:teacher"

# A quick run: a handful of problems, steps and tokens. It goes through every code path; its figures mean nothing.
QUICK_TRAIN = ["train.steps=2", "train.save_every=2", "rollout.prompts_per_step=4",
               "rollout.max_new_tokens=24", "eval.num_problems=6", "eval.k=2", "eval.max_new_tokens=24"]
QUICK_DIAGNOSE = dict(num_questions=3, samples_per_question=1, max_new_tokens=24, lgr_nodes=2, lgr_k=2,
                      lgr_rollouts_per_candidate=2, sfd_continuations=1, sfd_num_cuts=2, alignment_rollouts_per_node=2,
                      alignment_min_nodes=1, bootstrap=100)


def model_overrides(student: str | None, teacher: str | None) -> list[str]:
    return [f"student.path={student or BUILTIN_STUDENT}", f"teacher.path={teacher or BUILTIN_TEACHER}"]


def preconditions(out: Path, checks: list[str], *, student: str | None = None, teacher: str | None = None,
                  quick: bool = False, console: Console | None = None, **fields) -> dict:
    """`opdlab diagnose` on the built-in pair's task (or the given models), writing OUT/diagnose.json."""
    sizes = {**(QUICK_DIAGNOSE if quick else {}), **fields}
    cfg = PreconditionsConfig(pair="builtin", checks=checks, output=str(out),
                              student=ModelConfig(path=student or BUILTIN_STUDENT),
                              teacher=ModelConfig(path=teacher or BUILTIN_TEACHER), **sizes)
    return run_preconditions(cfg, console=console, progress=False)


def compare(objectives: list[str], seeds: list[int], out: Path, *, student: str | None = None,
            teacher: str | None = None, quick: bool = False, overrides: list[str] = (),
            console: Console | None = None) -> dict:
    """`opdlab compare` of `objectives` from the same student on the demo config plus `overrides`."""
    items = [*model_overrides(student, teacher), *overrides, *(QUICK_TRAIN if quick else [])]
    return run_compare(objectives, seeds, items, out, console=console)
