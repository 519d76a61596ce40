"""Tasks: sources of problems and their verifiers, and `make_task` to build one from a `TaskConfig`.

Heavy dependencies (datasets, math-verify, reasoning-gym) are imported only when a task needs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.tasks.base import ANSWER_INSTRUCTION, Task, extract_answer
from opdlab.tasks.files import FileTask
from opdlab.tasks.gym import GymTask
from opdlab.types import Problem

if TYPE_CHECKING:
    from opdlab.config import TaskConfig

__all__ = ["ANSWER_INSTRUCTION", "ArithmeticTask", "FileTask", "GymTask", "Problem", "Task", "extract_answer",
           "make_task"]


def make_task(cfg: TaskConfig) -> Task:
    """The task `cfg.name` selects, built from the config's fields."""
    if cfg.name == "arithmetic":
        return ArithmeticTask(cfg.min_steps, cfg.max_steps, seed=cfg.seed, test_size=cfg.test_size,
                              max_value=cfg.max_value)
    if cfg.name == "file":
        return FileTask(cfg.train_path, cfg.test_path, question_field=cfg.question_field,
                        answer_field=cfg.answer_field, solution_field=cfg.solution_field, seed=cfg.seed,
                        test_size=cfg.test_size)
    if cfg.name == "reasoning_gym":
        return GymTask(cfg.gym_name, train_size=cfg.gym_train_size, test_size=cfg.test_size, seed=cfg.seed,
                       threshold=cfg.gym_threshold)
    raise ValueError(f"unknown task {cfg.name!r}; known: arithmetic, file, reasoning_gym")
