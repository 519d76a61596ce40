"""Checking answers: math-verify equality, run in a helper process under a wall-clock limit.

`math_equal(reference, candidate)` reads both as LaTeX math (`$...$`) first: the plain-text reading math-verify falls
back to otherwise keeps only a trailing number of '2\\sqrt{3}' or '5, 7', which would accept wrong answers.
math-verify's own time limits use signals and so fail outside the main thread; with them off, some answers
(9^{9^{9}}) make sympy run for ever. So checks run in a helper process (`CheckWorker`) that is killed and replaced
when a check overruns; `run_check(target, args, timeout=None)` checks in-process with no limit. `FileTask` and
`GymTask` both check through the process-wide worker (`shared_worker`). A worker that cannot start raises
`CheckWorkerError` rather than passing for a run of wrong answers.
"""
from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from functools import lru_cache
from typing import Any

from opdlab.tasks.base import extract_answer

MAX_ANSWER_CHARS = 2000  # a longer candidate is not an answer (and can make sympy run for minutes)



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
    from math_verify import parse  # lazy: math-verify imports sympy (about a second); only checks need it

    delimited = "$" in text or "\\(" in text or "\\[" in text
    parsed = [] if delimited else parse(f"${text}$", parsing_timeout=None)
    return parsed or parse(text, parsing_timeout=None)


# References repeat across samples of one prompt and across steps; parsing them is most of a check's cost.
_parse_reference = lru_cache(maxsize=8192)(_parse_math)


def math_equal(reference: str, candidate: str) -> bool:
    """Whether `candidate` is mathematically the reference answer (1/2 = 0.5 = \\frac{1}{2}; x=3 matches 3)."""
    from math_verify import verify  # lazy, as above

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
            [sys.executable, "-c", "from opdlab.tasks.verify import _serve; _serve()"],
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


MATH_EQUAL = "opdlab.tasks.verify:math_equal"
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
