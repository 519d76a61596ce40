"""Tasks: sources of problems and their verifiers, and `make_task` to build one from a `TaskConfig`.

Heavy dependencies (datasets, math-verify, reasoning-gym) and the code task's sandbox are imported only when a task
needs them.
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
                              max_value=cfg.max_value, shortcut_frac=cfg.shortcut_frac)
    if cfg.name == "file":
        return FileTask(cfg.train_path, cfg.test_path, question_field=cfg.question_field,
                        answer_field=cfg.answer_field, solution_field=cfg.solution_field, seed=cfg.seed,
                        test_size=cfg.test_size)
    if cfg.name == "reasoning_gym":
        return GymTask(cfg.gym_name, train_size=cfg.gym_train_size, test_size=cfg.test_size, seed=cfg.seed,
                       threshold=cfg.gym_threshold)
    if cfg.name == "code":
        from opdlab.sandbox import Limits
        from opdlab.tasks.code import CodeTask

        c = cfg.code
        limits = Limits(wall_s=c.timeout_s, cpu_s=c.cpu_s, memory_mb=c.memory_mb, processes=c.processes,
                        output_bytes=c.output_kb << 10)
        return CodeTask(c.path, c.test_path, fmt=c.format, reward=c.reward, seed=cfg.seed, test_size=cfg.test_size,
                        limits=limits, per_test_s=c.per_test_s, workers=c.workers, site_packages=c.site_packages)
    raise ValueError(f"unknown task {cfg.name!r}; known: arithmetic, file, reasoning_gym, code")
