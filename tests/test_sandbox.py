"""The sandbox: every hostile program of `opdlab.tasks.sandbox.check` is contained, and ordinary programs run normally.

Each hostile program is judged by looking at the world afterwards (files, servers, /proc), not at what it printed.
Runs in about 30 s on one core (three of the programs use the 2 s wall clock in full); the 200-program load run
is marked slow.

    python -m pytest -q tests/test_sandbox.py
    python -m opdlab.tasks.sandbox.check        # the same programs as a table
    python -m opdlab.tasks.sandbox.check --load 200 --concurrency 8   # with honest programs, 8 at once
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from opdlab.tasks.code import _kind
from opdlab.tasks.sandbox import run as sandbox_run
from opdlab.tasks.sandbox.run import Limits, RunResult, Sandbox
from opdlab.tasks.sandbox.check import (HONEST, HOSTILE, LIMITS, load_summary, load_table, run_hostile, run_honest,
                                        run_load, survivors, table)

BOX = Sandbox(LIMITS)


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_program_is_contained(hostile):
    outcome = run_hostile(BOX, hostile)
    assert outcome.contained, table([outcome])
    # nothing outlives the run, however it ended, and the wall clock held: wall_s not counting waits for a CPU,
    # never more than hard_wall_s() (1 s of slack for a loaded machine)
    assert outcome.wall_s < LIMITS.hard_wall_s() + 1.0, table([outcome])


def test_expected_outcomes_of_hostile_programs():
    outcomes = {h.name: run_hostile(BOX, h) for h in HOSTILE
                if h.name in ("allocate 50 GB", "10 GB to stdout", "os._exit(3)", "segfault via ctypes")}
    assert outcomes["allocate 50 GB"].what.endswith("MemoryError)")
    assert outcomes["10 GB to stdout"].status == "output_limit"
    assert outcomes["os._exit(3)"].what == "exit (exit status 3)"
    assert outcomes["segfault via ctypes"].what == "signal (killed by SIGSEGV)"


def test_ordinary_program_round_trip():
    r = BOX.run_python("import sys\nn = int(input())\nprint(sum(range(n)))\nprint('warn', file=sys.stderr)",
                       stdin=b"1000\n")
    assert (r.status, r.stdout, r.stderr) == ("ok", b"499500\n", b"warn\n")
    assert r.wall_s < LIMITS.wall_s


def test_clean_environment_and_private_directory():
    os.environ["OPDLAB_TEST_TOKEN"] = "visible-only-outside"
    try:
        r = BOX.run_python("import os, json\nprint(json.dumps([dict(os.environ), os.getcwd(), os.listdir('.')]))",
                           files={"data.txt": "x"})
    finally:
        del os.environ["OPDLAB_TEST_TOKEN"]
    import json
    env, cwd, listing = json.loads(r.stdout)
    assert "OPDLAB_TEST_TOKEN" not in env and env["HOME"] == cwd == env["TMPDIR"]
    assert sorted(listing) == ["data.txt", "main.py"]
    assert not os.path.exists(cwd), "the working directory is removed after the run"


def test_process_limit_counts_only_the_program():
    # With processes=8 a program can start a few children but not 20; a fork bomb elsewhere does not count here.
    src = """
import os
made = 0
for _ in range(20):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        import time; time.sleep(5); os._exit(0)
    made += 1
print(made)
"""
    r = Sandbox(Limits(wall_s=4, processes=8)).run_python(src)
    assert r.status == "ok"
    assert 1 <= int(r.stdout) < 8


def test_cpu_limit_ends_a_busy_program_before_the_wall_clock():
    t0 = time.process_time()
    r = Sandbox(Limits(wall_s=30, cpu_s=1)).run_python("while True:\n    pass\n")
    assert r.status == "cpu_limit", r
    assert r.wall_s < 30
    assert time.process_time() - t0 < 1.0  # the time was spent in the child, not here


def test_output_under_the_cap_is_kept_whole():
    r = Sandbox(Limits(output_bytes=1000)).run_python("print('a' * 999, end='')")
    assert r.status == "ok" and r.stdout == b"a" * 999


def test_isolation_reports_layers_and_disabling():
    iso = BOX.isolation()
    assert set(iso.layers) <= {"namespaces", "readonly", "hide", "drop_uid", "userns", "landlock"}
    with pytest.raises(ValueError, match="unknown layers"):
        Sandbox(disable=("seccomp",))


@pytest.mark.skipif("landlock" not in BOX.isolation().layers, reason="no Landlock on this machine")
def test_landlock_keeps_the_project_unreadable_but_the_interpreter_readable():
    import sys
    from opdlab.tasks.sandbox.check import PROJECT_DIR

    probe = "for p in {paths!r}:\n    try:\n        open(p, 'rb').read(1); print('read')\n    except OSError:\n" \
            "        print('denied')\n"
    paths = [str(PROJECT_DIR / "README.md"), os.path.realpath(sys.executable)]
    r = BOX.run_python(probe.format(paths=paths))
    assert r.stdout.split() == [b"denied", b"read"], r


@pytest.mark.skipif("namespaces" not in BOX.isolation().layers, reason="no namespaces on this machine")
def test_without_landlock_the_mount_namespace_still_stops_writes():
    box = Sandbox(LIMITS, disable=("landlock",))
    assert "landlock" in box.isolation().missing and "readonly" in box.isolation().layers
    names = ("write and delete outside its dir", "TCP to 127.0.0.1", "background process outlives it")
    for h in (h for h in HOSTILE if h.name in names):
        outcome = run_hostile(box, h)
        assert outcome.contained, table([outcome])


def test_refuses_root_runs_it_cannot_move_off_uid_0():
    if os.geteuid() != 0 or not BOX._hidden_python():
        pytest.skip("only root with an interpreter under a closed home directory reaches this refusal")
    with pytest.raises(RuntimeError, match="refusing to run programs as root"):
        Sandbox(LIMITS, disable=("namespaces",)).isolation()


def test_survivors_finds_a_live_marked_process():
    # the check the background-process test relies on must itself see a live process
    import subprocess
    import uuid

    marker = f"opdlab-mark-{uuid.uuid4().hex}"
    proc = subprocess.Popen(["/bin/sh", "-c", f"sleep 30; : {marker}"])
    try:
        time.sleep(0.1)
        assert survivors(marker) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert survivors(marker) == []


def test_result_fields():
    r = BOX.run_python("raise SystemExit(4)")
    assert isinstance(r, RunResult) and r.status == "exit" and r.returncode == 4 and not r.ok


def _processes_of(uids: set[int]) -> list[int]:
    """Live processes whose real uid is one of `uids`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):
            continue
        if uid in uids:
            found.append(int(pid))
    return found


def _assert_load(monkeypatch, total: int, concurrency: int, box: Sandbox = BOX) -> None:
    """`total` programs, `concurrency` at once: all contained or right, and nothing left behind (no process of a
    uid the runs had, no working directory)."""
    uids: set[int] = set()
    take = sandbox_run._take_uid
    monkeypatch.setattr(sandbox_run, "_take_uid", lambda: uids.add(uid := take()) or uid)
    boxes_before = set(Path(tempfile.gettempdir()).glob("opdlab-box-*"))
    outcomes, wall = run_load(box, total, concurrency, seed=0)
    assert len(outcomes) == total
    assert all(o.contained for o in outcomes), load_table(outcomes) + "\n" + load_summary(outcomes, wall)
    assert uids or "drop_uid" not in box.isolation().layers
    assert not _processes_of(uids)
    assert not set(Path(tempfile.gettempdir()).glob("opdlab-box-*")) - boxes_before


def test_under_load_hostile_contained_and_honest_right(monkeypatch):
    # 12 hostile and 12 honest programs, 4 at once: fork bombs beside forking honest programs, CPU hogs beside
    # programs with a wall clock; every hostile one contained, every honest result exactly right
    _assert_load(monkeypatch, 24, 4)


@pytest.mark.slow
def test_under_load_200_programs_8_at_once(monkeypatch):
    _assert_load(monkeypatch, 200, 8)


def test_concurrent_runs_do_not_share_a_process_count():
    # Without a user namespace per program, RLIMIT_NPROC counts every process of the uid: runs get a uid each, so
    # a fork bomb holding all its 32 processes does not stop another run from forking.
    box = Sandbox(LIMITS, disable=("userns",))
    if "drop_uid" not in box.isolation().layers:
        pytest.skip("programs run as the caller's uid here (not root)")
    import threading

    bomb = next(h for h in HOSTILE if h.name == "fork bomb")
    forker = next(h for h in HONEST if h.name == "fork 4 children")
    thread = threading.Thread(target=run_hostile, args=(box, bomb))
    thread.start()
    try:
        time.sleep(0.5)
        outcomes = [run_honest(box, forker) for _ in range(3)]
    finally:
        thread.join()
    assert all(o.contained for o in outcomes), load_table(outcomes)


def test_limits_bounds_and_run_cpu():
    lim = Limits(wall_s=2, cpu_s=1)
    assert (lim.hard_wall_s(), lim.total_cpu_s()) == (6, 2)
    assert Limits(wall_s=2, max_wall_s=1).hard_wall_s() == 2  # never below wall_s
    with pytest.raises(ValueError, match="max_wall_s"):
        Limits(max_wall_s=0)
    # four processes, each under its 1 s of RLIMIT_CPU, together over the run's 1.5 s
    src = "import os\nfor _ in range(2):\n    os.fork()\nwhile True:\n    pass\n"
    r = Sandbox(Limits(wall_s=20, cpu_s=1, run_cpu_s=1.5)).run_python(src)
    assert r.status == "cpu_limit" and "all its processes" in r.reason, r
    assert _kind(r.reason) == "CPU-time"  # counted with the other CPU-time failures of code tasks
