"""Tasks: sources of problems and their verifiers, and `make_task` to build one from a `TaskConfig`.

Heavy dependencies (datasets, math-verify, reasoning-gym) are imported only when a task needs them.
"""
from __future__ import annotations

from opdlab.config import TaskConfig
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.tasks.base import ANSWER_INSTRUCTION, Task, extract_answer
from opdlab.tasks.code import CodeTask
from opdlab.tasks.files import FileTask
from opdlab.tasks.gym import GymTask
from opdlab.tasks.sandbox.run import Limits
from opdlab.types import Problem

__all__ = ["ANSWER_INSTRUCTION", "ArithmeticTask", "CodeTask", "FileTask", "GymTask", "Problem", "Task",
           "extract_answer", "make_task"]


def make_task(cfg: TaskConfig) -> Task:
    """The task `cfg.name` selects, built from the config's fields."""
    if cfg.name == "arithmetic":
        a = cfg.arithmetic
        return ArithmeticTask(a.min_steps, a.max_steps, seed=cfg.seed, test_size=cfg.test_size,
                              max_value=a.max_value, shortcut_frac=a.shortcut_frac, style=a.style,
                              compact_frac=a.compact_frac)
    if cfg.name == "file":
        f = cfg.file
        return FileTask(f.train_path, f.test_path, question_field=f.question_field, answer_field=f.answer_field,
                        solution_field=f.solution_field, seed=cfg.seed, test_size=cfg.test_size,
                        train_split=f.train_split, test_split=f.test_split)
    if cfg.name == "reasoning_gym":
        g = cfg.gym
        return GymTask(g.name, train_size=g.train_size, test_size=cfg.test_size, seed=cfg.seed,
                       threshold=g.threshold, gym_config=g.config)
    if cfg.name == "code":
        c = cfg.code
        limits = Limits(wall_s=c.timeout_s, cpu_s=c.cpu_s, memory_mb=c.memory_mb, processes=c.processes,
                        output_bytes=c.output_kb << 10)
        return CodeTask(c.path, c.test_path, fmt=c.format, reward=c.reward, seed=cfg.seed, test_size=cfg.test_size,
                        limits=limits, per_test_s=c.per_test_s, workers=c.workers, site_packages=c.site_packages)
    raise ValueError(f"unknown task {cfg.name!r}; known: arithmetic, file, reasoning_gym, code")
