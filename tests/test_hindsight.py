"""The shortcut-event and step-error detectors against their nulls (`opdlab.tasks.hindsight`).

The null set is responses with honest errors and no hindsight at all: a miscopied operand or start value in the
first line (or a wrong sum), then correct working from there. A detector of leakage must read 0 on it, while a
detector that matches values against the oracle's later lines (computed here independently) flags many of them by
coincidence; and it must catch the built-in student's shortcut ('Answer: <first number of the question>') and
skipped steps.

    python -m pytest tests/test_hindsight.py -q
"""
from __future__ import annotations

import random
import re

import pytest

from opdlab.tasks.arithmetic import ArithmeticTask, chain_lines, word_problem
from opdlab.tasks.hindsight import is_judged, rollout_diagnostics, shortcut_events, step_errors
from opdlab.types import Problem


def _ops(problem: Problem) -> tuple[int, list[tuple[str, int]]]:
    first, *rest = problem.question.removeprefix("Compute ").rstrip(".").split()
    return int(first), [(rest[i], int(rest[i + 1])) for i in range(0, len(rest), 2)]


def _values(first, ops):
    out, v = [first], first
    for op, n in ops:
        v = v + n if op == "+" else v - n
        out.append(v)
    return out


def honest_miscopy(problem: Problem, rng: random.Random) -> str:
    """The chain with one operand (or the start value) miscopied in line 1, then every rewrite correct."""
    first, ops = _ops(problem)
    while True:
        i = rng.randrange(len(ops) + 1)
        f, o = first, list(ops)
        if i == 0:
            f = rng.choice([v for v in range(0, 20) if v != first])
        else:
            op, n = o[i - 1]
            o[i - 1] = (op, rng.choice([m for m in range(1, 10) if m != n]))
        if min(_values(f, o)) >= 0:
            lines = chain_lines(f, o)
            return "\n".join(lines + [f"Answer: {_values(f, o)[-1]}"])


def value_matching_events(problem: Problem, response: str) -> int:
    """The naive detector: numbers absent from the question that the response writes at line i and the oracle
    first writes at a line j > i (what a detector without a notion of working would count)."""
    given = set(re.findall(r"\d+", problem.question))
    oracle = [line for line in problem.solution.splitlines() if line.strip()]
    first_at = {}
    for j, line in enumerate(oracle):
        for v in re.findall(r"\d+", line):
            first_at.setdefault(v, j)
    seen, count = set(), 0
    for i, line in enumerate(line for line in response.splitlines() if line.strip()):
        for v in re.findall(r"\d+", line):
            if v not in given and v not in seen:
                seen.add(v)
                count += first_at.get(v, -1) > i
    return count


@pytest.mark.parametrize("min_steps, max_steps", [(2, 3), (8, 12)])
def test_honest_errors_are_not_shortcut_events(min_steps, max_steps):
    task = ArithmeticTask(min_steps, max_steps, max_value=19, test_size=400)
    problems = list(task.problems("test"))
    rng = random.Random(0)
    responses = [honest_miscopy(p, rng) for p in problems]
    assert all(is_judged(p) for p in problems)
    assert sum(bool(shortcut_events(p, r)) for p, r in zip(problems, responses)) == 0
    # the null is a hard one: matching values against the oracle's later lines flags many of these responses
    naive = sum(value_matching_events(p, r) > 0 for p, r in zip(problems, responses)) / len(problems)
    assert naive > (0.05 if max_steps <= 3 else 0.2)
    d = rollout_diagnostics(problems, responses)
    assert d["leak/shortcut_rate"] == 0 and d["leak/events_per_rollout"] == 0
    # a correct rewrite of a miscopied line is no step error either
    assert d["drift/step_err_first_quarter"] == 0 and d["drift/step_err_last_quarter"] == 0


def test_the_question_number_shortcut_and_skipped_steps_are_caught():
    task = ArithmeticTask(2, 3, max_value=19, test_size=200, shortcut_frac=1.0)
    problems = list(task.problems("test"))
    shortcuts = [task.target(p) for p in problems]
    assert all(re.fullmatch(r"Answer: \d+", s) for s in shortcuts)  # the built-in student's habit
    assert all([(e.kind, e.value) for e in shortcut_events(p, s)] == [("answer", str(_ops(p)[0]))]
               for p, s in zip(problems, shortcuts))
    assert rollout_diagnostics(problems, shortcuts)["leak/shortcut_rate"] == 1.0
    # a skipped step: the oracle's trace with one middle line removed; its value is the oracle's (hindsight)
    skipped = []
    for p in problems:
        lines = p.solution.splitlines()
        skipped.append("\n".join(lines[:1] + lines[2:]))
    d = rollout_diagnostics(problems, skipped)
    # hindsight: the value skipped to is one the oracle derives, i.e. not already a number of the question
    derived = [re.findall(r"\d+", s.splitlines()[1])[0] not in re.findall(r"\d+", p.question)
               for p, s in zip(problems, skipped)]
    assert d["leak/shortcut_rate"] == 1.0 and d["leak/hindsight_rate"] == pytest.approx(sum(derived) / len(derived))
    assert 0.5 < d["leak/hindsight_rate"] < 1
    # the oracle's own traces read 0
    assert rollout_diagnostics(problems, [p.solution for p in problems])["leak/shortcut_rate"] == 0


def test_recovery_is_not_a_step_error():
    p = ArithmeticTask(3, 3, max_value=19).problems("test")[0]
    first, ops = _ops(p)
    oracle = p.solution.splitlines()
    op, n = ops[0]
    miscopied = " ".join([str(first), op, str(n % 9 + 1)] + [f"{o} {m}" for o, m in ops[1:]])
    recovered = "\n".join([miscopied] + oracle[1:])  # line 2 puts the question's true value back
    assert step_errors(recovered, p) == [False, False, False]
    assert step_errors(recovered) == [True, False, False]  # judged against its own line only, it is an error
    wrong = "\n".join([oracle[0], "= 0 " + oracle[1].split(" ", 2)[2]] + oracle[2:])  # a wrong head, then lost
    assert step_errors(wrong, p)[0] is True


def test_words_style_null_and_step_errors():
    rng = random.Random(1)
    problems, honest = [], []
    for i in range(100):
        first, ops = rng.randint(10, 40), [(rng.choice("+-"), rng.randint(1, 9)) for _ in range(rng.randint(3, 8))]
        question, lines = word_problem(random.Random(i), first, ops)
        value = _values(first, ops)[-1]
        problems.append(Problem(uid=str(i), question=question, answer=str(value),
                                solution="\n".join(lines + [f"Answer: {value}"])))
        _, wrong_lines = word_problem(random.Random(i), first + 1, ops)  # the start miscopied, then consistent
        honest.append("\n".join(wrong_lines + [f"Answer: {value + 1}"]))
    assert all(is_judged(p) for p in problems)
    d = rollout_diagnostics(problems, honest)
    assert d["leak/shortcut_rate"] == 0 and d["drift/step_err_first_quarter"] == 0
    assert step_errors("Sam has 7 + 5 = 13 coins.\nSam has 13 - 3 = 10 coins.") == [True, False]
    assert shortcut_events(problems[0], "Answer: 3")[0].kind == "answer"


def test_free_text_and_program_traces_are_not_judged():
    assert not is_judged(Problem(uid="a", question="q", answer="4", solution="Two and two make four.\nAnswer: 4"))
    assert not is_judged(Problem(uid="c", question="Write f.", answer="", solution="```python\nx = 1\n```"))
    assert rollout_diagnostics([Problem(uid="x", question="q", answer="1")], ["Answer: 1"]) == {}
