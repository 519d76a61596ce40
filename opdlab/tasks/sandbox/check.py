"""Hostile programs run through `opdlab.tasks.sandbox.run`, each with a check that it was contained, and the table of
results.

    python -m opdlab.tasks.sandbox.check      # this machine's confinement layers, then the table

Every program gets what it needs to attack (a victim directory with a file, a TCP and a UDP server on 127.0.0.1
in this process, a secret in this process's environment, a unique marker in its argv so that survivors can be
found in /proc), and its check looks at the world afterwards, not at what the program says about itself: the
victim file is still there, nothing reached the servers, no process carrying the marker is alive, the secret is
not in the output. `tests/test_sandbox.py` asserts each check.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    name: str
    contained: bool
    what: str
    status: str
    wall_s: float


def run_hostile(box: Sandbox, hostile: Hostile) -> Outcome:
    """Run one hostile program against a fresh World and check the world afterwards."""
    tcp_hits, udp_hits = [], []
    tcp, udp = _tcp_server(tcp_hits), _udp_server(udp_hits)
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
        os.environ.pop(SECRET_VAR, None)
        tcp.close()
        udp.close()


def table(outcomes: list[Outcome]) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [f"{'program':<{width}}  {'contained':<9}  {'time':>6}  outcome",
             f"{'-' * width}  {'-' * 9}  {'-' * 6}  {'-' * 40}"]
    lines += [f"{o.name:<{width}}  {'yes' if o.contained else 'NO':<9}  {o.wall_s:5.2f}s  {o.what}" for o in outcomes]
    return "\n".join(lines)


def main(limits: Limits = LIMITS) -> int:
    box = Sandbox(limits)
    print(box.isolation().describe())
    print(f"limits: wall {limits.wall_s:g} s, CPU {limits.cpu_s:g} s, address space {limits.memory_mb} MB, "
          f"{limits.processes} processes, files {limits.file_mb} MB, stdout {limits.output_bytes} bytes\n")
    outcomes = [run_hostile(box, h) for h in HOSTILE]
    print(table(outcomes))
    return 0 if all(o.contained for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
