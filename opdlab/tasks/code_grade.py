"""Grading a program against a code problem's tests in `opdlab.tasks.sandbox.run`: `grade(program, tests, sandbox)`.

Two kinds of tests:

* `FunctionTests` (HumanEval, MBPP): statements run against the program's definitions. One sandboxed process runs a
  fixed harness that loads the program (as module `solution`, so an `if __name__ == '__main__'` block does not run),
  runs the set-up code, then each test statement in order with `per_test_s` seconds each (a SIGALRM timer; a failing
  or hanging statement fails only itself), and reports each result on a private copy of stdout tagged with a random
  nonce read from stdin; the program's own prints go to /dev/null. A HumanEval `check(candidate)` function is split
  by `split_check` into its top-level statements: each one that contains an `assert` and uses the candidate is a
  test, the others (imports, assignments, HumanEval's `assert True` lines) are set-up run in order. A test the harness
  never reported (the process timed out or crashed) failed.
* `StdioTests` (LiveCodeBench/APPS style): the program runs once per case, with the case's input on stdin; its
  stdout passes when it equals the expected output after normalisation (`same_output`): trailing whitespace on
  lines and trailing blank lines are ignored, and failing that, whitespace-separated tokens must match, numbers
  within 1e-6 relative or absolute. With `stop_at_first_failure` (all-pass reward) later cases are skipped.

`Verdict.passed / Verdict.total` is the fraction of tests passed; `reason` says why a program did not pass them all
(a load error, the first failing test's exception, a timeout, a crash), for the logs.
"""
from __future__ import annotations

import ast
import json
import math
import secrets
from dataclasses import dataclass, field

from opdlab.tasks.sandbox.run import RunResult, Sandbox

HARNESS = r'''
import json, os, signal, sys
nonce = sys.stdin.readline().strip()
out = os.dup(1)
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
os.close(null)
sys.setrecursionlimit(10000)
with open("tests.json") as f:
    spec = json.load(f)
os.remove("tests.json")


def report(*fields):
    os.write(out, (json.dumps([nonce, *fields]) + "\n").encode())


class TestTimeout(BaseException):
    pass


def on_alarm(signum, frame):
    raise TestTimeout(f"over {spec['per_test_s']} s")


def run(source, name, ns):
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, spec["per_test_s"])
    try:
        exec(compile(source, name, "exec"), ns)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def why(e):
    return f"{type(e).__name__}: {e}"[:300]


ns = {"__name__": "solution"}
try:
    with open("solution.py") as f:
        run(f.read(), "solution.py", ns)
except BaseException as e:
    report("load", False, why(e))
    raise SystemExit(0)
report("load", True, "")
t = 0
for i, (source, is_test) in enumerate(spec["steps"]):
    try:
        run(source, f"test_{i}", ns)
        ok, reason = True, ""
    except BaseException as e:
        ok, reason = False, why(e)
    if is_test:
        report("test", t, ok, reason)
        t += 1
    elif not ok:
        report("setup", i, False, reason)
report("done")
'''


@dataclass(frozen=True)
class FunctionTests:
    """Statements run after the program: `steps` = [(source, is_test)], in order."""

    steps: tuple[tuple[str, bool], ...]
    per_test_s: float = 3.0

    @property
    def total(self) -> int:
        return sum(is_test for _, is_test in self.steps)


@dataclass(frozen=True)
class StdioTests:
    """(stdin, expected stdout) cases."""

    cases: tuple[tuple[str, str], ...]

    @property
    def total(self) -> int:
        return len(self.cases)


@dataclass
class Verdict:
    passed: int
    total: int
    reason: str = ""
    runs: list[str] = field(default_factory=list)  # sandbox status of each process run

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def split_check(test_source: str, entry_point: str) -> list[tuple[str, bool]]:
    """HumanEval `test` text -> steps: define the test module, bind `candidate`, then check()'s body statements.

    A body statement that contains `assert` and uses the candidate is a test; the rest is set-up. A check() with no
    assert at the top of its body is one test: the call `check(entry_point)`.
    """
    module = ast.parse(test_source)
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise ValueError("the test code defines no check() function")
    if len(check.args.args) != 1:
        raise ValueError(f"check() must take one argument (the candidate), it takes {len(check.args.args)}")
    param = check.args.args[0].arg
    body = [(ast.unparse(stmt), _is_test(stmt, param)) for stmt in check.body]
    if not any(is_test for _, is_test in body):
        return [(test_source, False), (f"check({entry_point})", True)]
    # The module without check() itself, so a helper of the program that happens to be called `check` survives.
    rest = ast.unparse(ast.Module([n for n in module.body if n is not check], type_ignores=[]))
    return [(rest, False), (f"{param} = {entry_point}", False)] + body


def _is_test(stmt: ast.stmt, param: str) -> bool:
    """An assert that involves the candidate; HumanEval's `assert True, "..."` lines test nothing and are set-up."""
    nodes = list(ast.walk(stmt))
    return any(isinstance(n, ast.Assert) for n in nodes) and any(isinstance(n, ast.Name) and n.id == param
                                                                 for n in nodes)


def grade(program: str, tests: FunctionTests | StdioTests, sandbox: Sandbox, *,
          stop_at_first_failure: bool = False) -> Verdict:
    """Run `program` against `tests` in `sandbox`; never raises on anything the program does."""
    if isinstance(tests, StdioTests):
        return _grade_stdio(program, tests, sandbox, stop_at_first_failure)
    return _grade_function(program, tests, sandbox)


def _grade_function(program: str, tests: FunctionTests, sandbox: Sandbox) -> Verdict:
    nonce = secrets.token_hex(16)
    spec = {"steps": list(tests.steps), "per_test_s": tests.per_test_s}
    result = sandbox.run_python(HARNESS, stdin=(nonce + "\n").encode(),
                                files={"solution.py": program, "tests.json": json.dumps(spec)})
    loaded, done, passed, first_failure = None, False, 0, ""
    for line in result.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, list) or not msg or msg[0] != nonce:
            continue
        kind = msg[1]
        if kind == "load":
            loaded = bool(msg[2])
            first_failure = first_failure or (f"program failed to load: {msg[3]}" if not loaded else "")
        elif kind == "test":
            passed += bool(msg[3])
            if not msg[3] and not first_failure:
                first_failure = f"test {msg[2] + 1} of {tests.total}: {msg[4]}"
        elif kind == "setup" and not first_failure:
            first_failure = f"test set-up step {msg[2]} failed: {msg[3]}"
        elif kind == "done":
            done = True
    passed = min(passed, tests.total)
    if not done and passed < tests.total:
        why = result.reason or result.status
        first_failure = first_failure or (f"harness did not finish: {why}" if loaded else f"no result: {why}")
    return Verdict(passed, tests.total, "" if passed == tests.total else first_failure, [result.status])


def _grade_stdio(program: str, tests: StdioTests, sandbox: Sandbox, stop: bool) -> Verdict:
    passed, reason, runs = 0, "", []
    for i, (stdin, expected) in enumerate(tests.cases):
        result: RunResult = sandbox.run_python(program, stdin=stdin.encode())
        runs.append(result.status)
        if result.ok and same_output(result.stdout.decode(errors="replace"), expected):
            passed += 1
            continue
        if not reason:
            reason = f"case {i}: " + ("wrong output" if result.ok else (result.reason or result.status))
        if stop:
            break
    return Verdict(passed, tests.total, reason, runs)


def same_output(got: str, expected: str) -> bool:
    """Whether two outputs agree (rules in the module docstring)."""
    def lines(text: str) -> list[str]:
        out = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out

    if lines(got) == lines(expected):
        return True
    a, b = got.split(), expected.split()
    return len(a) == len(b) and all(x == y or _close(x, y) for x, y in zip(a, b))


def _close(x: str, y: str) -> bool:
    try:
        fx, fy = float(x), float(y)
    except ValueError:
        return False
    return math.isfinite(fx) and math.isfinite(fy) and math.isclose(fx, fy, rel_tol=1e-6, abs_tol=1e-6)
