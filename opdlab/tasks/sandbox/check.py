"""Hostile programs run through `opdlab.tasks.sandbox.run`, each with a check that it was contained, and the table of
results.

    python -m opdlab.tasks.sandbox.check      # this machine's confinement layers, then the table
    python -m opdlab.tasks.sandbox.check --load 200 --concurrency 8   # hostile and honest programs, 8 at once

Every program gets what it needs to attack (a victim directory with a file, a TCP and a UDP server on 127.0.0.1
in this process, a secret in this process's environment, a unique marker in its argv so that survivors can be
found in /proc), and its check looks at the world afterwards, not at what the program says about itself: the
victim file is still there, nothing reached the servers, no process carrying the marker is alive, the secret is
not in the output. `tests/test_sandbox.py` asserts each check.

Under load (`--load N`): N programs, half hostile and half honest (`HONEST`: programs with a known right result,
some printing a lot, using CPU, reading stdin, forking, starting threads, or graded by `opdlab.tasks.code_grade`),
in a seeded shuffle, `--concurrency` at once through one `Sandbox`. Every hostile program must be contained and
every honest result exactly right (stdout, exit status, verdict); the table per program kind says how many were,
why the others were not ("timed out" apart from "wrong output"), and how long they took.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from opdlab.tasks.code_grade import FunctionTests, StdioTests, grade
from opdlab.tasks.sandbox.run import Limits, RunResult, Sandbox

PROJECT_DIR = Path(__file__).resolve().parent.parent
SECRET_VAR = "OPDLAB_SANDBOX_CHECK_SECRET"
LIMITS = Limits(wall_s=2.0, cpu_s=1.0, memory_mb=512, processes=32, file_mb=16, output_bytes=64 << 10)


@dataclass
class World:
    """What the hostile programs attack, set up in this process."""

    victim_dir: Path
    victim_file: Path
    tcp_port: int
    udp_port: int
    secret: str
    marker: str
    tcp_hits: list
    udp_hits: list


@dataclass(frozen=True)
class Hostile:
    name: str
    source: str  # formatted with the World's fields
    contained: Callable[[RunResult, World], tuple[bool, str]]  # (contained?, what happened)


def _status(*allowed: str):
    def check(r: RunResult, w: World) -> tuple[bool, str]:
        return r.status in allowed and not survivors(w.marker), f"{r.status} ({r.reason})" if r.reason else r.status
    return check


def _blocked_network(r: RunResult, w: World) -> tuple[bool, str]:
    said = r.stdout.decode(errors="replace").strip()
    return (r.status == "ok" and said.startswith("blocked") and not w.tcp_hits and not w.udp_hits,
            said[:80] or r.status)


def _files_intact(r: RunResult, w: World) -> tuple[bool, str]:
    planted = [PROJECT_DIR / "SANDBOX_WAS_HERE", Path.home() / ".opdlab_sandbox_was_here",
               Path(f"/tmp/SANDBOX_WAS_HERE_{w.marker}")]
    intact = w.victim_file.read_text() == "precious" and sorted(os.listdir(w.victim_dir)) == ["f.txt"] \
        and not any(p.exists() for p in planted)
    for p in planted:  # clear up after a sandbox that failed, so the next check starts clean
        p.unlink(missing_ok=True)
    return r.status == "ok" and intact, r.stdout.decode(errors="replace").strip()[:80] or r.status


def _no_secret(r: RunResult, w: World) -> tuple[bool, str]:
    leaked = w.secret.encode() in r.stdout or w.secret.encode() in r.stderr
    return r.status == "ok" and not leaked, "secret leaked" if leaked else "secret not visible"


def _no_survivors(r: RunResult, w: World) -> tuple[bool, str]:
    left = survivors(w.marker)  # the program may also have been stopped before it could start any (audit hook)
    return not left, f"{len(left)} processes survived" if left else f"{r.status}; none of its processes survived"


HOSTILE: list[Hostile] = [
    Hostile("infinite loop", "while True:\n    pass\n", _status("cpu_limit", "timeout")),
    Hostile("sleep forever", "import time\ntime.sleep(1000)\n", _status("timeout")),
    Hostile("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            _status("cpu_limit", "timeout")),
    Hostile("allocate 50 GB", "x = bytearray(50 * 1024 ** 3)\n", _status("exit")),
    Hostile("10 GB to stdout", "import sys\nb = 'x' * (1 << 20)\nfor _ in range(10240):\n    sys.stdout.write(b)\n",
            _status("output_limit")),
    Hostile("10 GB to a file in its dir",
            "b = bytes(1 << 20)\nwith open('big', 'wb') as f:\n    for _ in range(10240):\n        f.write(b)\n",
            _status("exit", "signal")),
    Hostile("TCP to 127.0.0.1", """
import socket
try:
    socket.create_connection(('127.0.0.1', {tcp_port}), timeout=1).sendall(b'hello')
    print('connected')
except OSError as e:
    print('blocked:', type(e).__name__, e)
""", _blocked_network),
    Hostile("UDP to 127.0.0.1", """
import socket
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b'hello', ('127.0.0.1', {udp_port}))
    print('sent')
except OSError as e:
    print('blocked:', type(e).__name__, e)
""", _blocked_network),
    Hostile("TCP to an outside address", """
import socket
try:
    socket.create_connection(('1.1.1.1', 80), timeout=1)
    print('connected')
except OSError as e:
    print('blocked:', type(e).__name__, e)
""", _blocked_network),
    Hostile("write and delete outside its dir", """
import os, shutil
done = []
for path in [{victim_dir!r} + '/new.txt', {project!r} + '/SANDBOX_WAS_HERE', {home!r} + '/.opdlab_sandbox_was_here',
             '/tmp/SANDBOX_WAS_HERE_{marker}']:
    try:
        open(path, 'w').write('x'); done.append('wrote ' + path)
    except OSError:
        pass
for act in (lambda: open({victim_file!r}, 'w').write('gone'), lambda: os.remove({victim_file!r}),
            lambda: shutil.rmtree({victim_dir!r}), lambda: os.rename({victim_file!r}, 'stolen')):
    try:
        act(); done.append('changed victim')
    except OSError:
        pass
print('; '.join(done) or 'all refused')
""", _files_intact),
    Hostile("read environment secrets", """
import os, glob
seen = [repr(dict(os.environ))]
for path in glob.glob('/proc/*/environ'):
    try:
        seen.append(open(path, 'rb').read().decode(errors='replace'))
    except OSError:
        pass
print('\\n'.join(seen))
""", _no_secret),
    Hostile("background process outlives it", """
import os, subprocess, time
subprocess.Popen(['/bin/sh', '-c', 'sleep 1000; : {marker}'], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1000)
    os._exit(0)
time.sleep(0.2)
print('left children behind')
""", _no_survivors),
    Hostile("signal everything (kill -1)", "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
            _status("exit", "signal")),
    Hostile("os._exit(3)", "import os\nos._exit(3)\n", _status("exit")),
    Hostile("segfault via ctypes", "import ctypes\nctypes.string_at(0)\n", _status("signal")),
]


def survivors(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes() and \
                    "State:\tZ" not in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _tcp_server(hits: list) -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)

    def serve():
        while srv.fileno() >= 0:
            try:
                conn, _ = srv.accept()
                hits.append(conn.recv(100))
                conn.close()
            except OSError:
                if srv.fileno() < 0:
                    return
    threading.Thread(target=serve, daemon=True).start()
    return srv


def _udp_server(hits: list) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(0.2)

    def serve():
        while srv.fileno() >= 0:
            try:
                hits.append(srv.recv(100))
            except OSError:
                if srv.fileno() < 0:
                    return
    threading.Thread(target=serve, daemon=True).start()
    return srv


@dataclass
class Outcome:
    """One program's run: `contained` is "contained" for a hostile program and "right" for an honest one."""

    name: str
    contained: bool
    what: str
    status: str
    wall_s: float
    kind: str = "hostile"


def run_hostile(box: Sandbox, hostile: Hostile, secret: str | None = None) -> Outcome:
    """Run one hostile program against a fresh World and check the world afterwards.

    `secret`: already in this process's environment (concurrent runs share one; os.environ is process-wide);
    without it a fresh one is set for this run and removed afterwards."""
    tcp_hits, udp_hits = [], []
    tcp, udp = _tcp_server(tcp_hits), _udp_server(udp_hits)
    own_secret = secret is None
    if own_secret:
        secret = f"s3cr3t-{uuid.uuid4().hex}"
        os.environ[SECRET_VAR] = secret
    try:
        with tempfile.TemporaryDirectory(prefix="opdlab-victim-") as victim:
            victim_dir = Path(victim)
            (victim_dir / "f.txt").write_text("precious")
            world = World(victim_dir, victim_dir / "f.txt", tcp.getsockname()[1], udp.getsockname()[1], secret,
                          f"opdlab-mark-{uuid.uuid4().hex}", tcp_hits, udp_hits)
            fields = {k: str(v) if isinstance(v, Path) else v for k, v in vars(world).items()}
            source = hostile.source.format(**fields, project=str(PROJECT_DIR), home=str(Path.home()))
            result = box.run_python(source, args=(world.marker,))
            deadline = time.monotonic() + 2.0  # processes of a killed sandbox may take a moment to be reaped
            while survivors(world.marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)  # let the servers see anything that did get through
            contained, what = hostile.contained(result, world)
            return Outcome(hostile.name, contained, what, result.status, result.wall_s)
    finally:
        if own_secret:
            os.environ.pop(SECRET_VAR, None)
        tcp.close()
        udp.close()


@dataclass(frozen=True)
class Honest:
    """A program with a known right result: `run(box)` -> (right?, what happened, sandbox status, wall seconds)."""

    name: str
    run: Callable[[Sandbox], tuple[bool, str, str, float]]


def _expect(source: str, stdout: str, *, stdin: str = "", returncode: int = 0):
    """An honest program whose stdout and exit status must be exactly `stdout` and `returncode`."""
    def run(box: Sandbox) -> tuple[bool, str, str, float]:
        r = box.run_python(source, stdin=stdin.encode())
        want = "ok" if returncode == 0 else "exit"
        if r.status == "timeout":
            what = f"timed out ({r.reason})"
        elif r.status != want or r.returncode != returncode:
            what = f"{r.status}: {r.reason or r.returncode}"[:120]
        elif r.stdout != stdout.encode():
            what = f"wrong output: {len(r.stdout)} bytes, {r.stdout[:40]!r}"
        else:
            return True, f"{r.status}, {len(r.stdout)} bytes right", r.status, r.wall_s
        return False, what, r.status, r.wall_s
    return run


def _verdict(program: str, tests: FunctionTests | StdioTests, passed: int):
    """An honest program graded by `code_grade.grade`, which must pass exactly `passed` of the tests."""
    def run(box: Sandbox) -> tuple[bool, str, str, float]:
        t0 = time.monotonic()
        v = grade(program, tests, box)
        wall, status = time.monotonic() - t0, ",".join(sorted(set(v.runs)))
        what = f"passed {v.passed}/{v.total}" + (f" ({v.reason[:80]})" if v.reason else "")
        if "timeout" in v.runs:
            what = f"timed out: {what}"
        return v.passed == passed and v.total == tests.total, what, status, wall
    return run


_NUMBERS = [(i * 7919) % 1000 - 500 for i in range(200)]
_ADD_TESTS = FunctionTests((("assert add(1, 1) == 2", True), ("assert add(2, 0) == 2", True),
                            ("assert add(-3, 3) == 0", True)))
_REVERSE_TESTS = StdioTests((("abc\n", "cba\n"), ("racecar\n", "racecar\n"), ("ab\n", "ba\n")))
HONEST: list[Honest] = [
    Honest("sum of squares", _expect("print(sum(i * i for i in range(1000)))\n", "332833500\n")),
    Honest("read stdin, sort", _expect("import sys\nxs = [int(t) for t in sys.stdin.read().split()]\n"
                                       "print(sum(xs)); print(*sorted(xs))\n",
                                       f"{sum(_NUMBERS)}\n{' '.join(map(str, sorted(_NUMBERS)))}\n",
                                       stdin="\n".join(map(str, _NUMBERS)) + "\n")),
    Honest("print 48 KB", _expect("for i in range(10000):\n    print(i)\n",
                                  "".join(f"{i}\n" for i in range(10000)))),
    Honest("0.2 s of CPU", _expect("s = 0\nfor i in range(2_100_000):\n    s += i % 7\nprint(s)\n", "6300000\n")),
    Honest("exit status 3", _expect("import sys\nprint('partial')\nsys.exit(3)\n", "partial\n", returncode=3)),
    Honest("fork 4 children", _expect("""
import os
r, w = os.pipe()
pids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        os.write(w, f"{i * i}\\n".encode()); os._exit(0)
    pids.append(pid)
os.close(w)
codes = [os.waitpid(p, 0)[1] for p in pids]
print(sorted(int(x) for x in os.read(r, 100).split()), codes)
""", "[0, 1, 4, 9] [0, 0, 0, 0]\n")),
    Honest("8 threads", _expect("""
import threading
out = [0] * 8
def work(i):
    out[i] = sum(range(i * 1000))
ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in ts: t.start()
for t in ts: t.join()
print(sum(out))
""", f"{sum(sum(range(i * 1000)) for i in range(8))}\n")),
    Honest("stderr beside stdout", _expect("import sys\nfor i in range(300):\n    print('warn', i, file=sys.stderr)\n"
                                           "print('answer 42')\n", "answer 42\n")),
    Honest("graded: right function", _verdict("def add(a, b):\n    return a + b\n", _ADD_TESTS, 3)),
    Honest("graded: wrong function", _verdict("def add(a, b):\n    return a - b\n", _ADD_TESTS, 1)),
    Honest("graded: right stdio", _verdict("print(input()[::-1])\n", _REVERSE_TESTS, 3)),
    Honest("graded: wrong stdio", _verdict("print(input())\n", _REVERSE_TESTS, 1)),
]


def run_honest(box: Sandbox, honest: Honest) -> Outcome:
    """Run one honest program and check its result is exactly the known right one."""
    right, what, status, wall = honest.run(box)
    return Outcome(honest.name, right, what, status, wall, kind="honest")


def run_load(box: Sandbox, total: int, concurrency: int, seed: int = 0) -> tuple[list[Outcome], float]:
    """`total` programs, alternately hostile and honest (each list cycled), shuffled by `seed`, `concurrency` at
    once; returns the outcomes (in the shuffled order) and the wall time of the whole run."""
    jobs: list[Hostile | Honest] = [HOSTILE[i // 2 % len(HOSTILE)] if i % 2 == 0 else HONEST[i // 2 % len(HONEST)]
                                    for i in range(total)]
    random.Random(seed).shuffle(jobs)
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    os.environ[SECRET_VAR] = secret
    box.isolation()  # probe once, before the threads start
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            outcomes = list(pool.map(lambda j: run_hostile(box, j, secret) if isinstance(j, Hostile)
                                     else run_honest(box, j), jobs))
    finally:
        os.environ.pop(SECRET_VAR, None)
    return outcomes, time.monotonic() - t0


def load_table(outcomes: list[Outcome]) -> str:
    """Per program kind: runs, how many were contained (hostile) or right (honest), wall times, failure reasons."""
    names = list(dict.fromkeys(o.name for o in outcomes))
    kinds = {o.name: o.kind for o in outcomes}
    names.sort(key=lambda n: kinds[n] != "hostile")
    width = max(len(n) for n in names)
    lines = [f"{'kind':<7}  {'program':<{width}}  {'runs':>4}  {'good':>4}  {'mean':>6}  {'max':>6}  failures",
             f"{'-' * 7}  {'-' * width}  {'-' * 4}  {'-' * 4}  {'-' * 6}  {'-' * 6}  {'-' * 30}"]
    for name in names:
        mine = [o for o in outcomes if o.name == name]
        walls = [o.wall_s for o in mine]
        fails = Counter(o.what for o in mine if not o.contained)
        why = "; ".join(f"{n}x {w}" for w, n in fails.most_common(3)) + (" ..." if len(fails) > 3 else "")
        lines.append(f"{kinds[name]:<7}  {name:<{width}}  {len(mine):>4}  {sum(o.contained for o in mine):>4}  "
                     f"{sum(walls) / len(walls):5.2f}s  {max(walls):5.2f}s  {why or '-'}")
    return "\n".join(lines)


def load_summary(outcomes: list[Outcome], wall_s: float) -> str:
    """One line: hostile contained x/n, honest right y/m, and the wall time."""
    def count(kind: str) -> str:
        mine = [o for o in outcomes if o.kind == kind]
        return f"{sum(o.contained for o in mine)}/{len(mine)}"
    return f"hostile contained {count('hostile')}, honest right {count('honest')}, wall {wall_s:.1f} s"


def table(outcomes: list[Outcome]) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [f"{'program':<{width}}  {'contained':<9}  {'time':>6}  outcome",
             f"{'-' * width}  {'-' * 9}  {'-' * 6}  {'-' * 40}"]
    lines += [f"{o.name:<{width}}  {'yes' if o.contained else 'NO':<9}  {o.wall_s:5.2f}s  {o.what}" for o in outcomes]
    return "\n".join(lines)


def main(argv: list[str] | None = None, limits: Limits = LIMITS) -> int:
    """The CLI: the hostile programs one at a time, or with `--load N` the mix under load; 1 if any failed."""
    ap = argparse.ArgumentParser(prog="python -m opdlab.tasks.sandbox.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, default=0, metavar="N", help="run N programs, half hostile, half honest")
    ap.add_argument("--concurrency", type=int, default=8, help="programs at once under --load (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffle under --load")
    ap.add_argument("--disable", default="", metavar="LAYERS", help="comma-separated layers not to use, to see how a "
                    "machine without them fares (e.g. userns)")
    args = ap.parse_args(argv)
    box = Sandbox(limits, disable=tuple(n for n in args.disable.split(",") if n))
    print(box.isolation().describe())
    print(f"limits: wall {limits.wall_s:g} s, CPU {limits.cpu_s:g} s, address space {limits.memory_mb} MB, "
          f"{limits.processes} processes, files {limits.file_mb} MB, stdout {limits.output_bytes} bytes\n")
    if args.load:
        outcomes, wall = run_load(box, args.load, args.concurrency, args.seed)
        print(load_table(outcomes))
        print(f"\n{args.load} programs, {args.concurrency} at once, seed {args.seed}: {load_summary(outcomes, wall)}")
    else:
        outcomes = [run_hostile(box, h) for h in HOSTILE]
        print(table(outcomes))
    return 0 if all(o.contained for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
