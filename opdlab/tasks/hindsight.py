"""Hindsight leakage (shortcut events) and late-stage drift, measured on a rollout's text against the oracle trace.

Privileged teachers know where a solution is going; a student distilled from them can learn to write results before
it has worked them out. The source paper leaves the detector open (a reconstruction,
docs/methods.md#hindsight-leakage-and-step-errors); this is the definition opdlab uses, for any task whose problems
carry a worked solution (`Problem.solution`):

* Oracle derivations. Split the trace into its non-empty lines; a number (a run of digits, with an optional
  decimal part) is *derived at line j* when line j is the first line holding it and the question does not hold it.
  The final answer (`Problem.answer`, when it is a number) is derived where it first appears in the trace's
  reasoning, or at the trace's answer line if the reasoning never writes it.
* Shortcut event. The student's response is split into non-empty lines the same way. A number the question does
  not hold, written first in the student's line i, is a shortcut event when the oracle derives it at a line j > i:
  the student states the final answer, or an intermediate value, before the step of the oracle's derivation that
  produces it. Each value counts once per rollout. A value that the question already holds cannot be detected, and
  a coincidence (a wrong computation that happens to hit a later value) counts as an event.
* Shortcut rate: the fraction of rollouts with at least one event (`leak/shortcut_rate`, `eval` extra
  `shortcut_rate`); `leak/events_per_rollout` is the mean number of events.

Step errors (late-stage drift in the text). Responses in the built-in chain format ("7 + 5 - 3", "= 12 - 3",
"= 9", each line the previous with its first operation carried out) are checked line by line: step s is wrong when
line s+1 is not the exact rewrite of line s. Over a rollout's S checked steps, its first quarter is steps
s < ceil(S/4) and its last quarter s >= S - ceil(S/4); `drift/step_err_first_quarter` and
`drift/step_err_last_quarter` are the error rates there over long rollouts (at least the batch's median length in
characters). Responses not in that format have no checked steps and are left out.

    from opdlab.tasks.hindsight import shortcut_events, rollout_diagnostics
    shortcut_events(problem, "7 + 5 - 3 + 9\\n= 18\\nAnswer: 18")   # [(18, student line 1, oracle line 3)]
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

from opdlab.types import Problem

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_ANSWER_LINE = re.compile(r"^\s*Answer:", re.IGNORECASE)
_CHAIN = re.compile(r"^=?\s*(\d+)((?:\s*[+-]\s*\d+)*)\s*$")
_OP = re.compile(r"([+-])\s*(\d+)")


@dataclass(frozen=True)
class ShortcutEvent:
    value: str  # the number, as written (normalised: no leading zeros)
    student_line: int  # the student's (non-empty) line that first writes it
    oracle_line: int  # the oracle's line that derives it


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.findall(text):
        whole, _, frac = m.partition(".")
        frac = frac.rstrip("0")
        out.append(str(int(whole)) + (f".{frac}" if frac else ""))
    return out


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def oracle_derivations(problem: Problem) -> dict[str, int]:
    """{value: line index of the trace that first derives it}; empty when the problem has no trace, or when the
    trace is a program (a fenced code block, as code tasks give), whose lines have no derivation order."""
    if not problem.solution or problem.solution.lstrip().startswith("```"):
        return {}
    given = set(_numbers(problem.question))
    lines = _lines(problem.solution)
    derived: dict[str, int] = {}
    answer_line = next((j for j in range(len(lines) - 1, -1, -1) if _ANSWER_LINE.match(lines[j])), len(lines))
    for j, line in enumerate(lines[:answer_line]):
        for v in _numbers(line):
            if v not in given and v not in derived:
                derived[v] = j
    for v in _numbers(problem.answer):
        if v not in given and v not in derived:
            derived[v] = answer_line
    return derived


def shortcut_events(problem: Problem, response: str) -> list[ShortcutEvent]:
    """The shortcut events of one response (empty when the problem has no oracle trace)."""
    derived = oracle_derivations(problem)
    if not derived:
        return []
    given = set(_numbers(problem.question))
    seen: set[str] = set()
    events = []
    for i, line in enumerate(_lines(response)):
        for v in _numbers(line):
            if v in given or v in seen:
                continue
            seen.add(v)
            if v in derived and derived[v] > i:
                events.append(ShortcutEvent(v, i, derived[v]))
    return events


def _parse_chain(line: str):
    m = _CHAIN.match(line.strip())
    if not m:
        return None
    return int(m.group(1)), [(op, int(n)) for op, n in _OP.findall(m.group(2))]


def step_errors(response: str) -> list[bool]:
    """Per checked step of a chain-format response: True where the next line is not the exact rewrite of this one.

    Checking stops at the answer line or at the first line that is not a chain; [] when nothing can be checked."""
    chain = []
    for line in _lines(response):
        if _ANSWER_LINE.match(line):
            break
        parsed = _parse_chain(line)
        if parsed is None:
            break
        chain.append(parsed)
    errors = []
    for (value, ops), nxt in zip(chain, chain[1:]):
        if not ops:
            break
        op, n = ops[0]
        errors.append(nxt != (value + n if op == "+" else value - n, ops[1:]))
    return errors


def quarter_rates(errors_per_rollout: list[list[bool]]) -> tuple[float, float]:
    """(first-quarter, last-quarter) step error rates over the given rollouts' checked steps (NaN when none)."""
    first, last = [], []
    for errors in errors_per_rollout:
        S = len(errors)
        if S == 0:
            continue
        q = math.ceil(S / 4)
        first.extend(errors[:q])
        last.extend(errors[S - q:])
    rate = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return rate(first), rate(last)


def shortcut_metrics(problems: list[Problem], texts: list[str]) -> dict[str, float]:
    """`leak/*` over a batch: shortcut-event rate and events per rollout (left out when no problem has a trace)."""
    judged = [(p, t) for p, t in zip(problems, texts, strict=True) if oracle_derivations(p)]
    if not judged:
        return {}
    counts = [len(shortcut_events(p, t)) for p, t in judged]
    return {"leak/shortcut_rate": sum(c > 0 for c in counts) / len(counts),
            "leak/events_per_rollout": sum(counts) / len(counts)}


def step_error_metrics(texts: list[str]) -> dict[str, float]:
    """`drift/step_err_*` over the batch's long rollouts (left out when none is in the chain format)."""
    if not texts:
        return {}
    median = statistics.median(len(t) for t in texts)
    first, last = quarter_rates([step_errors(t) for t in texts if len(t) >= median])
    return {k: v for k, v in (("drift/step_err_first_quarter", first), ("drift/step_err_last_quarter", last))
            if not math.isnan(v)}


def rollout_diagnostics(problems: list[Problem], texts: list[str]) -> dict[str, float]:
    """`leak/*` and `drift/step_err_*` over a batch (keys left out when no rollout can be judged)."""
    return {**shortcut_metrics(problems, texts), **step_error_metrics(texts)}
