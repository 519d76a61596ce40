"""Question/answer tasks read from files, with answers checked by math-verify.

`FileTask` reads rows holding a question, a reference answer and optionally a worked solution from

* JSON Lines (`.jsonl`, `.ndjson`; a `.json` file is read as JSON Lines unless it holds one JSON array of objects),
* Parquet (`.parquet`),
* a directory written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` whose split is chosen by name).

Every row is validated on load; a bad row raises `ValueError` naming the file and the place: `line N` (1-based, as an
editor shows it) for JSON Lines, `row N` (0-based, as `dataset[N]` indexes it) for the other formats.

Splits. With `test_path` the test split is that file, used whole. Without it, a saved `DatasetDict` that has a
'test' split supplies it; otherwise `test_size` rows of the training file, drawn at random by `seed` (so a file sorted
by topic or difficulty still gives a representative test set), are held out, and every training row whose question
is one of theirs is dropped, so no test question is ever trained on. Both splits keep the file's row order.

Checking. `verify` takes the response's last 'Answer:' line (else its last \\boxed{...}) and compares it with the
reference using math-verify, reading both as LaTeX math (`$...$`) first: the plain-text reading math-verify falls
back to otherwise keeps only a trailing number of '2\\sqrt{3}' or '5, 7', which would accept wrong answers.
math-verify's own time limits use signals and so fail outside the main thread; with them off, some answers
(9^{9^{9}}) make sympy run for ever. So checks run in a helper process (`CheckWorker`) that is killed and replaced
when a check exceeds `verify_timeout` (reward 0); `verify_timeout=None` checks in-process with no limit. `GymTask`
runs its scorers through the same worker (`run_check`). A worker that cannot start raises `CheckWorkerError` from
`verify` rather than passing for a run of wrong answers.
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
import math
import os
import pickle
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from opdlab.tasks.base import ANSWER_INSTRUCTION, Task, check_split, extract_answer
from opdlab.types import Problem

log = logging.getLogger(__name__)

SUPPORTED_KINDS = (
    ".jsonl or .ndjson (JSON Lines)",
    ".json (JSON Lines, or one JSON array of objects)",
    ".parquet",
    "a directory written by datasets' save_to_disk",
)
_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")

# Longer "answers" are not answers, and in-process checks of them can be slow.
MAX_ANSWER_CHARS = 2000


# ---------------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fields:
    """Names of the fields a row is read from; `solution=None` ignores solutions."""

    question: str = "question"
    answer: str = "answer"
    solution: str | None = "solution"


@dataclass(frozen=True)
class _Record:
    """One raw row: its 0-based index among the data rows, where it sits (for messages), and its value."""

    row: int
    where: str
    line: int | None
    value: Any


def load_problems(path: str | os.PathLike, fields: Fields = Fields(), split: str = "train") -> list[Problem]:
    """All rows of `path` as Problems; `split` picks the split of a saved `DatasetDict`."""
    path = _existing(path)
    stem, records = _read_records(path, fields, split)
    problems = [_make_problem(str(path), stem, rec, fields) for rec in records]
    if not problems:
        raise ValueError(f"{path}: no rows")
    return problems


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"task data file not found: {p} (resolved: {p.resolve()})")
    return p


def _read_records(path: Path, fields: Fields, split: str) -> tuple[str, Iterable[_Record]]:
    """(uid stem, records) of a file or saved dataset."""
    if path.is_dir():
        return _read_saved_dataset(path, fields, split)
    suffix = path.suffix.lower()
    if suffix in _JSON_LINES_SUFFIXES:
        return path.stem, _read_json_lines(path)
    if suffix == ".json":
        return path.stem, _read_json(path)
    if suffix == ".parquet":
        return path.stem, _read_parquet(path, fields)
    raise ValueError(f"{path}: unsupported kind of file {suffix or '(no extension)'!r}; supported: "
                     + "; ".join(SUPPORTED_KINDS))


def _read_json_lines(path: Path) -> Iterator[_Record]:
    # Decoded line by line (not via a text-mode file) so a bad byte is reported with its line number.
    row = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield _Record(row, f"line {lineno}", lineno, value)
            row += 1


def _read_json(path: Path) -> Iterable[_Record]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("["):
        return _read_json_lines(path)  # what `Dataset.to_json` writes
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return [_Record(i, f"row {i}", None, item) for i, item in enumerate(items)]


def _read_parquet(path: Path, fields: Fields) -> list[_Record]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise ValueError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    # Reading only the needed columns keeps wide files (images, metadata) cheap.
    table = pq.read_table(path, columns=_columns(str(path), names, fields))
    return [_Record(i, f"row {i}", None, value) for i, value in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path, fields: Fields, split: str) -> tuple[str, list[_Record]]:
    ds, chosen = _load_saved(path, split)
    ds = ds.select_columns(_columns(str(path), ds.column_names, fields))
    stem = path.name if chosen is None else f"{path.name}.{chosen}"
    return stem, [_Record(i, f"row {i}", None, value) for i, value in enumerate(ds.to_list())]


def _load_saved(path: Path, split: str):
    """(Dataset, name of the split taken from a DatasetDict or None)."""
    from datasets import DatasetDict, load_from_disk

    try:
        obj = load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"{path}: a directory, but not a dataset written by save_to_disk ({e}); "
                         f"supported: " + "; ".join(SUPPORTED_KINDS)) from None
    if not isinstance(obj, DatasetDict):
        return obj, None
    if split in obj:
        return obj[split], split
    if len(obj) == 1:
        (only,) = obj.keys()
        return obj[only], only
    raise ValueError(f"{path}: saved DatasetDict has no {split!r} split (splits: {', '.join(obj)})")


def saved_splits(path: str | os.PathLike) -> list[str] | None:
    """The split names of a saved DatasetDict at `path`, or None when it is not one."""
    p = Path(path)
    if not p.is_dir():
        return None
    from datasets import DatasetDict, load_from_disk

    try:
        obj = load_from_disk(str(p))
    except Exception:
        return None
    return list(obj) if isinstance(obj, DatasetDict) else None


def _columns(label: str, present: Sequence[str], fields: Fields) -> list[str]:
    """Columns to read; a required one absent from a columnar file is an error for every row, so say so once."""
    for name in (fields.question, fields.answer):
        if name not in present:
            raise ValueError(f"{label}: missing field {name!r} (fields present: {', '.join(present) or 'none'})")
    wanted = [fields.question, fields.answer]
    if fields.solution and fields.solution in present and fields.solution not in wanted:
        wanted.append(fields.solution)
    return wanted


# ---------------------------------------------------------------------------------------------------------------
# Rows to problems
# ---------------------------------------------------------------------------------------------------------------

def _make_problem(label: str, stem: str, rec: _Record, fields: Fields) -> Problem:
    where = f"{label} {rec.where}"
    row = rec.value
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with fields, got {_kind(row)}")
    for name in (fields.question, fields.answer):
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r} (fields present: {', '.join(map(str, row)) or 'none'})")
    question = row[fields.question]
    if not isinstance(question, str):
        raise ValueError(f"{where}: field {fields.question!r} must be a string, got {_kind(question)}")
    if not question.strip():
        raise ValueError(f"{where}: field {fields.question!r} is empty")
    answer = _answer_text(where, fields.answer, row[fields.answer])
    solution = _solution_text(where, fields.solution, row.get(fields.solution) if fields.solution else None, answer)
    meta: dict[str, Any] = {"source": label, "row": rec.row}
    if rec.line is not None:
        meta["line"] = rec.line
    return Problem(uid=f"{stem}-{rec.row}", question=f"{question.strip()} {ANSWER_INSTRUCTION}", answer=answer,
                   solution=solution, meta=meta)


def _answer_text(where: str, name: str, value: Any) -> str:
    if value is None:
        raise ValueError(f"{where}: field {name!r} is null")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {name!r} has unsupported type {_kind(value)}; expected a string or a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: field {name!r} is {value}, not a usable answer")
        # Positional notation: math-verify reads '1e-07' as e - 7.
        return format(Decimal(repr(value)), "f")
    text = str(value).strip()
    if not text:
        raise ValueError(f"{where}: field {name!r} is empty")
    return text


def _solution_text(where: str, name: str | None, value: Any, answer: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string or null, got {_kind(value)}")
    return with_answer_line(value, answer) if value.strip() else None


def with_answer_line(solution: str, answer: str) -> str:
    """`solution` ending in an 'Answer: ...' line, the format the model is taught to write.

    A final GSM8K-style '#### 42' line is replaced rather than kept next to the new line; a solution whose last line
    already is an answer line is returned unchanged (apart from trailing whitespace).
    """
    lines = solution.rstrip().splitlines()
    if lines and lines[-1].lstrip().startswith("####"):
        lines = "\n".join(lines[:-1]).rstrip().splitlines()
    if lines and extract_answer(lines[-1]) is not None:
        return "\n".join(lines)
    return "\n".join(lines + [f"Answer: {answer}"])


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def hold_out(problems: Sequence[Problem], test_size: int, seed: int, label: str) -> tuple[list[Problem], list[Problem]]:
    """(train, test): `test_size` rows drawn by `seed` for test, the rest minus repeats of test questions for train."""
    n = len(problems)
    if test_size >= n:
        raise ValueError(f"{label} has {n} rows, too few to hold out test_size={test_size} for testing and keep "
                         f"some for training; lower task.test_size or give task.test_path")
    rng = random.Random(f"opdlab-holdout/{seed}")
    test = [problems[i] for i in sorted(rng.sample(range(n), test_size))]
    held = {p.question for p in test}
    train = [p for p in problems if p.question not in held]
    if not train:
        raise ValueError(f"{label}: every row repeats a held-out test question; nothing is left for training")
    return train, test


# ---------------------------------------------------------------------------------------------------------------
# Checking answers
# ---------------------------------------------------------------------------------------------------------------

def final_answer(response: str) -> str | None:
    """The answer a response commits to: its last 'Answer:' line, else its last \\boxed{...}, else None."""
    found = extract_answer(response)
    if found is None:
        found = last_boxed(response)
    if found is None:
        return None
    # Models often bold the answer line ('**42**'); the stars are formatting, not maths.
    found = found.strip().strip("*").strip()
    return found or None


def last_boxed(text: str) -> str | None:
    """The contents of the last well-formed \\boxed{...} in `text` (nested braces allowed), or None."""
    start = len(text)
    while (start := text.rfind("\\boxed", 0, start)) >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
    return None


def _parse_math(text: str) -> list:
    """math-verify's reading of a short answer, as LaTeX math first and as plain text when that finds nothing."""
    from math_verify import parse

    delimited = "$" in text or "\\(" in text or "\\[" in text
    parsed = [] if delimited else parse(f"${text}$", parsing_timeout=None)
    return parsed or parse(text, parsing_timeout=None)


# References repeat across samples of one prompt and across steps; parsing them is most of a check's cost.
_parse_reference = lru_cache(maxsize=8192)(_parse_math)


def math_equal(reference: str, candidate: str) -> bool:
    """Whether `candidate` is mathematically the reference answer (1/2 = 0.5 = \\frac{1}{2}; x=3 matches 3)."""
    from math_verify import verify

    if len(candidate) > MAX_ANSWER_CHARS:
        return False
    gold = _parse_reference(reference)
    if not gold:
        return reference.strip().casefold() == candidate.strip().casefold()
    pred = _parse_math(candidate)
    return bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


class CheckWorkerError(RuntimeError):
    """The check process itself is broken (cannot import, set up or start); not a verdict on an answer."""


class CheckWorker:
    """A helper Python process that runs checks (a 'module:function' and its arguments) under a wall-clock limit.

    A check that overruns is abandoned: the process is killed and a new one started. Calls from several threads are
    served one at a time. Requests and replies are pickles over the process's stdin/stdout; the process imports
    this module, so it finds `opdlab` through the parent's `sys.path`. POSIX only (select on pipes).
    """

    # Time allowed for a warm-up call: a fresh process imports torch (via opdlab) and the checker's libraries.
    STARTUP_GRACE_S = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid: int | None = None
        self._warm: set[str] = set()

    def start(self) -> None:
        """Start the process now (it imports in the background) rather than on the first check."""
        with self._lock:
            self._ensure_started()

    def call(self, target: str, args: tuple, timeout: float, warmup: tuple[str, tuple] | None = None) -> Any:
        """`target(*args)` in the worker; TimeoutError after `timeout` s, RuntimeError if it raised or crashed.

        `warmup` (target, args) is run first, with STARTUP_GRACE_S, whenever this process has not run it yet, so
        that imports and set-up never count against `timeout` (nor a hanging check ever gets the grace).
        """
        with self._lock:
            self._ensure_started()
            if warmup is not None and repr(warmup) not in self._warm:
                try:
                    self._exchange(*warmup, self.STARTUP_GRACE_S)
                except (TimeoutError, RuntimeError) as e:
                    raise CheckWorkerError(f"the answer-check process failed to start: {e}") from e
                self._warm.add(repr(warmup))
            return self._exchange(target, args, timeout)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._owner_pid != os.getpid():
            self._proc = None  # inherited across fork: the parent's worker, not ours to use or stop
        if self._proc is not None and self._proc.poll() is None:
            return
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), CUDA_VISIBLE_DEVICES="")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from opdlab.tasks.files import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env, close_fds=True)
        self._owner_pid = os.getpid()
        self._warm = set()

    def _restart(self) -> None:
        self._stop()
        self._ensure_started()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or self._owner_pid != os.getpid():
            return
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            pipe.close()

    def _exchange(self, target: str, args: tuple, timeout: float) -> Any:
        try:
            self._send(pickle.dumps((target, args)))
            ok, value = self._receive(timeout)
        except TimeoutError:
            self._restart()
            raise TimeoutError(f"{target} took over {timeout:g} s") from None
        except (EOFError, OSError) as e:
            self._restart()  # it crashed (out of memory, killed): the next call gets a fresh one
            raise RuntimeError(f"check worker died during {target}: {e}") from None
        except BaseException:
            self._stop()  # interrupted mid-exchange (Ctrl-C): its late reply would answer the next request
            raise
        if not ok:
            raise RuntimeError(value)
        return value

    def _send(self, data: bytes) -> None:
        _write_all(self._proc.stdin.fileno(), struct.pack(">I", len(data)) + data)

    def _receive(self, timeout: float) -> tuple[bool, Any]:
        deadline = time.monotonic() + timeout
        (size,) = struct.unpack(">I", self._read_exact(4, deadline))
        return pickle.loads(self._read_exact(size, deadline))

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd, buf = self._proc.stdout.fileno(), bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError("worker exited")
            buf += chunk
        return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _serve() -> None:
    """Main loop of a CheckWorker process: read a request, run it, reply; exit when stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; we exit when it closes our stdin
    replies = os.dup(1)
    os.dup2(2, 1)  # what checked code prints must not land in the reply stream
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notice; we time out ourselves
    requests = sys.stdin.buffer
    while len(header := requests.read(4)) == 4:
        target, args = pickle.loads(requests.read(struct.unpack(">I", header)[0]))
        try:
            reply = (True, _resolve(target)(*args))
        except Exception as e:
            reply = (False, f"{target}: {type(e).__name__}: {e}")
        data = pickle.dumps(reply)
        _write_all(replies, struct.pack(">I", len(data)) + data)


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_MATH_EQUAL = "opdlab.tasks.files:math_equal"
_worker: CheckWorker | None = None
_worker_lock = threading.Lock()


def shared_worker() -> CheckWorker:
    """The process-wide CheckWorker (started on first use, stopped at exit)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = CheckWorker()
            atexit.register(_worker.close)
        return _worker


def run_check(target: str, args: tuple, timeout: float | None, warmup: tuple[str, tuple] | None = None) -> Any:
    """`target(*args)` ('module:function'): in the shared worker under `timeout` s, or in-process when None.

    `warmup` is a cheap call of the same kind that loads what `target` needs (see `CheckWorker.call`).
    """
    if timeout is None:
        return _resolve(target)(*args)
    return shared_worker().call(target, args, timeout, warmup)


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------

class FileTask(Task):
    """Question/answer rows from files (see the module docstring for formats, splits and checking).

    Problems: uid `<file stem>-<row>` (0-based row), question = the question + ANSWER_INSTRUCTION, answer = the
    reference as text (numbers in positional notation), solution = the solution field ending in an 'Answer: ...'
    line (None when absent), meta = source path, row, and 1-based line for JSON Lines.
    """

    name = "file"

    def __init__(self, train_path: str | os.PathLike, test_path: str | os.PathLike | None = None, *,
                 question_field: str = "question", answer_field: str = "answer",
                 solution_field: str | None = "solution", seed: int = 0, test_size: int = 200,
                 verify_timeout: float | None = 5.0):
        if verify_timeout is not None and verify_timeout <= 0:
            raise ValueError(f"verify_timeout must be positive or None, got {verify_timeout}")
        self.fields = Fields(question_field, answer_field, solution_field)
        self.seed, self.verify_timeout = seed, verify_timeout
        train = load_problems(train_path, self.fields, "train")
        if test_path is not None:
            test = load_problems(test_path, self.fields, "test")
            _warn_overlap(train_path, test_path, train, test)
        elif "test" in (saved_splits(train_path) or ()):
            test = load_problems(train_path, self.fields, "test")
        else:
            train, test = hold_out(train, test_size, seed, str(train_path))
        self._splits = {"train": tuple(train), "test": tuple(test)}
        if verify_timeout is not None:
            shared_worker().start()  # let it import math-verify while the caller gets on with set-up

    def problems(self, split: str) -> Sequence[Problem]:
        check_split(split)
        return self._splits[split]

    def verify(self, problem: Problem, response: str) -> float:
        candidate = final_answer(response)
        if candidate is None:
            return 0.0
        try:
            same = run_check(_MATH_EQUAL, (problem.answer, candidate), self.verify_timeout,
                             warmup=(_MATH_EQUAL, ("1", "1")))
        except CheckWorkerError:
            raise  # a broken set-up must not pass for a run of wrong answers
        except TimeoutError as e:
            log.warning("answer check gave up (%s) on %r", e, candidate[:200])
            return 0.0
        except Exception:
            return 0.0
        return 1.0 if same else 0.0


def _warn_overlap(train_path, test_path, train: Sequence[Problem], test: Sequence[Problem]) -> None:
    # The same file on purpose (a memorisation check) is the user's call; a partial overlap is probably a mistake.
    if Path(train_path).resolve() == Path(test_path).resolve():
        return
    shared = {p.question for p in test} & {p.question for p in train}
    if shared:
        warnings.warn(f"{len(shared)} of the {len(test)} test questions in {test_path} also occur in {train_path}",
                      stacklevel=3)
