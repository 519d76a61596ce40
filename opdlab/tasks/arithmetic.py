"""The built-in task: multi-step integer arithmetic with a step-by-step worked solution.

A problem is a chain of `steps` additions and subtractions of 1..9 to a start value, with every intermediate value
kept in [0, max_value] (default 99). The worked solution rewrites the expression, carrying out one operation per line:

    question:  Compute 7 + 5 - 3 + 9.
    solution:  7 + 5 - 3 + 9
               = 12 - 3 + 9
               = 9 + 9
               = 18
               Answer: 18

Each line is the previous one with its head replaced, which a small transformer learns by copying at a short
distance; the work per line is one addition or subtraction of a digit.

The question carries no answer-format instruction: the built-in models are character-level and learn the format
in their warm start, and a short prompt keeps their sequences short. Solution lengths (characters, i.e. tokens of
the built-in tokenizer): ~35 for 2 steps, ~130 for 6, ~280 for 10, ~385 for 12, so `min_steps`/`max_steps` reach
completions from ~30 to several hundred tokens. Problem i of a split is generated from (seed, split, i) alone, so
the data are deterministic and the train and test splits never share a generator stream.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from opdlab.tasks.base import ANSWER_INSTRUCTION, Task, check_split, extract_answer
from opdlab.tasks.hindsight import rollout_diagnostics
from opdlab.types import Problem


# The words style: a story about one person and one kind of thing, one line of working per event.
NAMES = ("Sam", "Ana", "Tom", "Mia", "Leo", "Ida", "Ben", "Zoe", "Max", "Eva", "Kai", "Noa")
THINGS = ("marbles", "apples", "stamps", "coins", "shells", "books", "cards", "pencils", "stickers", "beads")
GAINS = ("finds", "buys", "is given", "wins", "picks up")
LOSSES = ("loses", "gives away", "sells", "drops", "trades away")


def make_problem(seed: int, split: str, index: int | str, min_steps: int, max_steps: int,
                 max_value: int = 99, style: str = "chain") -> Problem:
    rng = random.Random(f"{seed}/{split}/{index}")
    steps = rng.randint(min_steps, max_steps)
    first = value = rng.randint(1, max_value)
    ops: list[tuple[str, int]] = []
    for _ in range(steps):
        # every step whose result stays in [0, max_value] is equally likely
        choices = [("+", n) for n in range(1, 10) if value + n <= max_value]
        choices += [("-", n) for n in range(1, 10) if value - n >= 0]
        op, operand = rng.choice(choices)
        ops.append((op, operand))
        value = value + operand if op == "+" else value - operand
    uid = f"arith-{split}-{str(index).split('/')[0]}"
    if style == "words":
        question, lines = word_problem(rng, first, ops)
        return Problem(uid=uid, question=question, answer=str(value),
                       solution="\n".join(lines + [f"Answer: {value}"]), meta={"steps": steps})
    lines = chain_lines(first, ops)
    return Problem(uid=uid, question=f"Compute {lines[0]}.", answer=str(value),
                   solution="\n".join(lines + [f"Answer: {value}"]), meta={"steps": steps})


def word_problem(rng: random.Random, first: int, ops: list[tuple[str, int]]) -> tuple[str, list[str]]:
    """(question, worked-solution lines) of the chain told as a story: each event is one line of working,
    'She buys 5 more stamps, so she has 7 + 5 = 12 stamps.'"""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    verbs = [rng.choice(GAINS if op == "+" else LOSSES) for op, _ in ops]
    events = [f"{verb} {n}" for verb, (_, n) in zip(verbs, ops)]
    story = ", then ".join(events)
    question = (f"{name} has {first} {thing}. {name} {story}. How many {thing} does {name} have at the end? "
                f"{ANSWER_INSTRUCTION}")
    lines, value = [f"{name} starts with {first} {thing}."], first
    for verb, (op, n) in zip(verbs, ops):
        new = value + n if op == "+" else value - n
        lines.append(f"{name} {verb} {n}, so {name} has {value} {op} {n} = {new} {thing}.")
        value = new
    return question, lines


def chain_lines(first: int, ops: list[tuple[str, int]]) -> list[str]:
    """The worked solution: each line is the previous one with its first operation carried out."""
    lines = [" ".join([str(first)] + [f"{op} {n}" for op, n in ops])]
    value = first
    for i, (op, n) in enumerate(ops):
        value = value + n if op == "+" else value - n
        lines.append("= " + " ".join([str(value)] + [f"{o} {m}" for o, m in ops[i + 1:]]))
    return lines


def compact_solution(solution: str) -> str:
    """The chain style's worked solution in a second format: the first line (the question's expression) as it is,
    the working lines after it without spaces ('= 12 - 3 + 9' -> '=12-3+9'), the answer line as it is."""
    lines = solution.split("\n")
    return "\n".join([lines[0]] + [ln.replace(" ", "") if ln.startswith("=") else ln for ln in lines[1:]])


def answer_only(response: str) -> bool:
    """Whether a response's first non-empty line is its answer line ("Answer: ..."): no working before it."""
    first = next((line.strip() for line in response.splitlines() if line.strip()), "")
    return first.startswith("Answer:")


class _LazyProblems(Sequence):
    def __init__(self, n: int, make):
        self._n, self._make = n, make

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._make(i % self._n)


class ArithmeticTask(Task):
    """Multi-step arithmetic. Difficulty = number of steps, drawn uniformly from [min_steps, max_steps]."""

    name = "arithmetic"

    def __init__(self, min_steps: int = 2, max_steps: int = 4, seed: int = 0, train_size: int = 100_000,
                 test_size: int = 200, max_value: int = 99, shortcut_frac: float = 0.0, style: str = "chain",
                 compact_frac: float = 0.0):
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
        if max_value < 9:
            raise ValueError(f"max_value must be at least 9, got {max_value}")
        if not 0.0 <= shortcut_frac <= 1.0:
            raise ValueError(f"shortcut_frac must be in [0, 1], got {shortcut_frac}")
        if style not in ("chain", "words"):
            raise ValueError(f"style must be 'chain' or 'words', got {style!r}")
        if not 0.0 <= compact_frac <= 1.0:
            raise ValueError(f"compact_frac must be in [0, 1], got {compact_frac}")
        if compact_frac and style != "chain":
            raise ValueError(f"compact_frac rewrites the chain style's working lines; style is {style!r}")
        self.style, self.compact_frac = style, compact_frac
        self.min_steps, self.max_steps, self.seed, self.max_value = min_steps, max_steps, seed, max_value
        self.shortcut_frac = shortcut_frac
        self.sizes = {"train": train_size, "test": test_size}
        self._test_questions: set[str] | None = None

    def problems(self, split: str) -> Sequence[Problem]:
        check_split(split)
        if split == "test":
            return _LazyProblems(self.sizes["test"], self._test_problem)
        return _LazyProblems(self.sizes["train"], self._train_problem)

    def _test_problem(self, i: int) -> Problem:
        return make_problem(self.seed, "test", i, self.min_steps, self.max_steps, self.max_value, self.style)

    def _train_problem(self, i: int) -> Problem:
        # Short chains repeat often; redraw a training problem until it is not one of the held-out test questions.
        if self._test_questions is None:
            self._test_questions = {self._test_problem(j).question for j in range(self.sizes["test"])}
        attempt = 0
        while True:
            p = make_problem(self.seed, "train", i if attempt == 0 else f"{i}/{attempt}", self.min_steps,
                             self.max_steps, self.max_value, self.style)
            if p.question not in self._test_questions:
                return p
            attempt += 1

    def target(self, problem: Problem) -> str:
        """The worked solution; or, for a fixed `shortcut_frac` share of problems (drawn from the problem's uid), a
        shortcut: no working, and the question's first number given as the answer (wrong unless the operations
        cancel out). Warm-start data with such a share teach a model a habit that a teacher trained on clean data
        does not have."""
        if self.shortcut_frac and random.Random(f"shortcut/{problem.uid}").random() < self.shortcut_frac:
            return f"Answer: {re.search(r'[0-9]+', problem.question).group()}"
        if self.compact_frac and random.Random(f"compact/{problem.uid}").random() < self.compact_frac:
            return compact_solution(problem.solution)
        return super().target(problem)

    def rollout_diagnostics(self, problems: Sequence[Problem], responses: Sequence[str]) -> dict[str, float]:
        """Shortcut events against the oracle trace and step errors of the chain format (`opdlab.tasks.hindsight`),
        and `format/answer_only`: the share of responses that give an answer line before any working (the habit
        `shortcut_frac` teaches)."""
        out = rollout_diagnostics(list(problems), list(responses))
        if responses:
            out["format/answer_only"] = sum(answer_only(r) for r in responses) / len(responses)
        return out

    def verify(self, problem: Problem, response: str) -> float:
        got = extract_answer(response)
        if got is None:
            return 0.0
        try:
            return float(int(got) == int(problem.answer))
        except ValueError:
            return 0.0
