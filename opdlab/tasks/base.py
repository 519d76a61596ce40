"""The Task interface: problems, a verifier, and the text a model is trained to write.

A task is a source of `Problem`s split into `train` and `test`, plus `verify(problem, response) -> reward in [0, 1]`.
Prompt formatting (chat templates) is the model's business and lives in `opdlab.models.prompts`, not here.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from opdlab.types import Problem

ANSWER_INSTRUCTION = "Reason step by step, then give the final answer on its own last line as 'Answer: <answer>'."
_ANSWER_RE = re.compile(r"Answer:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def extract_answer(response: str) -> str | None:
    """The text after the last 'Answer:' in a response, or None when there is none."""
    found = _ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


class Task(ABC):
    """A task: `problems(split)` and `verify(problem, response)`."""

    name: str = "task"

    @abstractmethod
    def problems(self, split: str) -> Sequence[Problem]:
        """The problems of `split` ('train' or 'test'), in a fixed order (deterministic by the task's seed)."""

    @abstractmethod
    def verify(self, problem: Problem, response: str) -> float:
        """Reward of `response` to `problem`, in [0, 1]; never raises on bad model output."""

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        """Rewards of a batch, in order. Tasks whose verifier is slow (running programs) grade in parallel."""
        return [self.verify(p, r) for p, r in zip(problems, responses, strict=True)]

    def rollout_diagnostics(self, problems: Sequence[Problem], responses: Sequence[str]) -> dict[str, float]:
        """Behaviour metrics of a batch of responses that only make sense for this task (e.g. shortcut events
        against its oracle traces, `opdlab.tasks.hindsight`), logged every training step and by `opdlab eval`.
        A task declares them by overriding this; by default there are none."""
        return {}

    def target(self, problem: Problem) -> str:
        """The response a warm-start (SFT) step trains on: the worked solution, else just the answer line."""
        if problem.solution:
            return problem.solution
        return f"Answer: {problem.answer}"


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class ProblemStream:
    """An endless, reshuffled-every-epoch walk over a split. Its whole state is one integer (`position`), so a
    resumed run draws exactly the problems the interrupted run would have drawn."""

    def __init__(self, problems: Sequence[Problem], seed: int, position: int = 0):
        if len(problems) == 0:
            raise ValueError("the task's train split is empty")
        self.problems, self.seed, self.position = problems, seed, position
        self._epoch, self._order = -1, None

    def _order_for(self, epoch: int):
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))
        return self._order

    def take(self, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.problems))
            out.append(self.problems[int(self._order_for(epoch)[i])])
            self.position += 1
        return out
