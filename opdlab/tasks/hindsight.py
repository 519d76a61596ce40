"""Shortcut events and step errors, measured on a rollout's text (docs/methods.md#hindsight-leakage-and-step-errors).

Privileged teachers know where a solution is going; a student distilled from them can learn to write results it has
not worked out. The source paper leaves the detector open; this is the definition opdlab uses. It asks of every
result the response states whether the response's own working produced it, so an honest error (a miscopied operand,
a wrong sum, then correct steps from there) is never an event, however its values happen to match the oracle's:

* Results. A result is the number right after an '=' or after 'Answer:' (up to the first answer line).
* Worked. An '=' result is worked when the '=' follows an operation on the same line ('7 + 5 = 12'), or when its
  line starts with '=' and carries out one operation of the previous line's chain (the previous line has n >= 1
  operations, this one n - 1: '7 + 5 - 3' then '= 12 - 3'). Whether the arithmetic is right does not matter here.
  The answer is worked when it equals the last '=' result before it.
* Shortcut event: a result that is not worked, each value once per rollout: a skipped step ('12 - 3 + 9' then
  '= 18'), an answer without working ('Answer: 7', the first number of the question, as the built-in student's
  shortcut habit writes it), or an answer its working did not reach. An event whose value the oracle derives (a
  number of the trace absent from the question, or the final answer) is a *hindsight* event: a value from the
  solution path, written without its step.
* Which problems are judged: those whose oracle trace itself reads as worked (at least one result, no event), so
  the chain and words styles of the arithmetic task, and any trace written the same way; program traces and free
  text are left out.
* Metrics: `leak/shortcut_rate` (rollouts with at least one event), `leak/hindsight_rate` (with at least one
  hindsight event), `leak/events_per_rollout`.

Step errors (late-stage drift in the text). In the chain format ("7 + 5 - 3 + 9", "= 12 - 3 + 9", each line the
previous with its first operation carried out) step s is right when line s+1 is the exact rewrite of line s, or is
the oracle's own line at that stage (the one with as many operations left): a recovery, which puts back the
question's true value after a miscopy, is not an error. Checking stops at the answer line or the first line that is
not a chain. In the words format every 'a + b = c' is a step, wrong when c is not a + b. Over a rollout's S checked
steps, its first quarter is steps s < ceil(S/4) and its last quarter s >= S - ceil(S/4);
`drift/step_err_first_quarter` and `drift/step_err_last_quarter` are the error rates there over long rollouts (at
least the batch's median length in characters). Responses with no checked steps are left out.

    from opdlab.tasks.hindsight import shortcut_events, rollout_diagnostics
    shortcut_events(problem, "7 + 5 - 3 + 9\\n= 18\\nAnswer: 18")   # [ShortcutEvent('18', 1, 'step', 3)]
"""
from __future__ import annotations

import functools
import math
import re
import statistics
from dataclasses import dataclass

from opdlab.types import Problem

_NUM = r"\d+(?:\.\d+)?"
_NUMBER = re.compile(_NUM)
_ANSWER_LINE = re.compile(r"^\s*Answer:", re.IGNORECASE)
_ANSWER_VALUE = re.compile(rf"^\s*Answer:\s*({_NUM})", re.IGNORECASE)
_RESULT = re.compile(rf"=\s*({_NUM})")
_OPERATION_BEFORE = re.compile(rf"{_NUM}(?:\s*[-+*/×÷]\s*{_NUM})+\s*$")  # '7 + 5 ' just before an '='
_CHAIN = re.compile(r"^=?\s*(\d+)((?:\s*[+-]\s*\d+)*)\s*$")
_OP = re.compile(r"([+-])\s*(\d+)")
_EQUATION = re.compile(r"(\d+)\s*([+-])\s*(\d+)\s*=\s*(\d+)")


@dataclass(frozen=True)
class ShortcutEvent:
    value: str  # the number, as written (normalised: no leading zeros)
    student_line: int  # the response's (non-empty) line that states it
    kind: str  # 'step' (an '=' result without its operation) or 'answer' (an answer its working did not reach)
    oracle_line: int | None = None  # the oracle's line that derives the value; None when the oracle never does


def _normalise(number: str) -> str:
    whole, _, frac = number.partition(".")
    frac = frac.rstrip("0")
    return str(int(whole)) + (f".{frac}" if frac else "")


def _numbers(text: str) -> list[str]:
    return [_normalise(m) for m in _NUMBER.findall(text)]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _parse_chain(line: str):
    m = _CHAIN.match(line.strip())
    if not m:
        return None
    return int(m.group(1)), [(op, int(n)) for op, n in _OP.findall(m.group(2))]


def _unworked(text: str) -> list[tuple[str, int, str]]:
    """(value, line, kind) of every result of `text` that its own working did not produce, in order."""
    out, last_result, previous = [], None, None
    for i, line in enumerate(_lines(text)):
        answer = _ANSWER_VALUE.match(line)
        if answer or _ANSWER_LINE.match(line):
            if answer and _normalise(answer.group(1)) != last_result:
                out.append((_normalise(answer.group(1)), i, "answer"))
            break
        chain = _parse_chain(line)
        for m in _RESULT.finditer(line):
            value = _normalise(m.group(1))
            before = line[:m.start()]
            if before.strip():
                worked = bool(_OPERATION_BEFORE.search(before))
            else:  # a chain continuation: one operation of the previous line carried out
                worked = (chain is not None and previous is not None and len(previous[1]) >= 1
                          and len(chain[1]) == len(previous[1]) - 1)
            if not worked:
                out.append((value, i, "step"))
            last_result = value
        previous = chain
    return out


def oracle_derivations(problem: Problem) -> dict[str, int]:
    """{value: line index of the trace that first writes it}, for every number of the trace absent from the question
    (and the final answer: at the answer line if the reasoning never writes it); empty when the problem has no trace,
    or when the trace is a program (a fenced code block, as code tasks give), whose lines have no derivation order."""
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


@functools.lru_cache(maxsize=4096)
def _judged(solution: str | None) -> bool:
    if not solution or solution.lstrip().startswith("```"):
        return False
    has_result = any(_RESULT.search(line) for line in _lines(solution))
    return has_result and not _unworked(solution)


def is_judged(problem: Problem) -> bool:
    """True when the detector applies: the problem's oracle trace states results and reads as worked throughout."""
    return _judged(problem.solution)


def shortcut_events(problem: Problem, response: str) -> list[ShortcutEvent]:
    """The shortcut events of one response (empty when the problem is not judged, `is_judged`)."""
    if not is_judged(problem):
        return []
    derived, given = oracle_derivations(problem), set(_numbers(problem.question))
    seen: set[str] = set()
    events = []
    for value, line, kind in _unworked(response):
        if value in seen:
            continue
        seen.add(value)
        events.append(ShortcutEvent(value, line, kind, None if value in given else derived.get(value)))
    return events


def _oracle_states(problem: Problem | None) -> dict[int, tuple]:
    """{operations left: the oracle's chain line with that many} of a chain-format trace ({} otherwise)."""
    states = {}
    for line in _lines(problem.solution or "") if problem is not None else []:
        parsed = _parse_chain(line)
        if parsed is None:
            break
        states.setdefault(len(parsed[1]), parsed)
    return states


def step_errors(response: str, problem: Problem | None = None) -> list[bool]:
    """Per checked step of a response: True where the step is wrong.

    Chain format: step s is right when line s+1 is the exact rewrite of line s, or (given `problem`) the oracle's
    line with as many operations left (a recovery). Words format: each 'a + b = c' is a step, right when c = a + b.
    Checking stops at the answer line or, in the chain format, at the first line that is not a chain; [] when
    nothing can be checked."""
    chain, equations = [], []
    for line in _lines(response):
        if _ANSWER_LINE.match(line):
            break
        parsed = _parse_chain(line)
        if parsed is None and chain:
            break
        if parsed is not None:
            chain.append(parsed)
        else:
            equations.extend(_EQUATION.findall(line))
    if len(chain) >= 2:
        oracle = _oracle_states(problem)
        errors = []
        for (value, ops), nxt in zip(chain, chain[1:]):
            if not ops:
                break
            op, n = ops[0]
            rewrite = (value + n if op == "+" else value - n, ops[1:])
            errors.append(nxt != rewrite and nxt != oracle.get(len(ops) - 1))
        return errors
    return [int(c) != (int(a) + int(b) if op == "+" else int(a) - int(b)) for a, op, b, c in equations]


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
    """`leak/*` over a batch: shortcut and hindsight event rates, events per rollout (left out when no problem is
    judged)."""
    judged = [(p, t) for p, t in zip(problems, texts, strict=True) if is_judged(p)]
    if not judged:
        return {}
    events = [shortcut_events(p, t) for p, t in judged]
    n = len(events)
    return {"leak/shortcut_rate": sum(bool(e) for e in events) / n,
            "leak/hindsight_rate": sum(any(x.oracle_line is not None for x in e) for e in events) / n,
            "leak/events_per_rollout": sum(len(e) for e in events) / n}


def step_error_metrics(texts: list[str], problems: list[Problem] | None = None) -> dict[str, float]:
    """`drift/step_err_*` over the batch's long rollouts (left out when none has checked steps); with `problems`,
    a step that recovers the oracle's line is not an error."""
    if not texts:
        return {}
    problems = problems if problems is not None else [None] * len(texts)
    median = statistics.median(len(t) for t in texts)
    first, last = quarter_rates([step_errors(t, p) for t, p in zip(texts, problems, strict=True)
                                 if len(t) >= median])
    return {k: v for k, v in (("drift/step_err_first_quarter", first), ("drift/step_err_last_quarter", last))
            if not math.isnan(v)}


def rollout_diagnostics(problems: list[Problem], texts: list[str]) -> dict[str, float]:
    """`leak/*` and `drift/step_err_*` over a batch (keys left out when no rollout can be judged)."""
    return {**shortcut_metrics(problems, texts), **step_error_metrics(texts, problems)}
