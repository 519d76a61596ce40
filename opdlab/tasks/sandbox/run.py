"""Run untrusted programs (a model's generated code) in a confined, short-lived process.

    from opdlab.tasks.sandbox.run import Limits, Sandbox
    box = Sandbox(Limits(wall_s=5))
    result = box.run_python("print(input()[::-1])", stdin=b"abc\\n")
    result.status, result.stdout          # 'ok', b'cba\\n'
    print(box.isolation().describe())     # what is enforced on this machine

Every run gets a fresh private directory (removed afterwards) as its working directory, HOME and TMPDIR, a clean
environment (PATH, locale, HOME, TMPDIR and single-threaded maths libraries; nothing from the caller's environment),
and these limits (`Limits`): wall-clock time (the whole process group is killed), CPU time (RLIMIT_CPU), address
space (RLIMIT_AS), processes (RLIMIT_NPROC), size of a written file (RLIMIT_FSIZE), open files, and bytes kept
of stdout and stderr (a program that writes more is killed).

Confinement is built from kernel features through the launcher `opdlab/tasks/sandbox/child.py`, no external tools;
`Isolation` records which layers this machine allowed. The first run probes them: a layer that cannot be set up
is left out and the run says so in `isolation().missing` (and a warning), never silently.

* `namespaces`: new network namespace (no interface but a down loopback, so no connection anywhere, 127.0.0.1
  included), PID namespace (host processes invisible; when the program ends every process it started dies,
  daemons included), mount, IPC and UTS namespaces. Needs root or unprivileged user namespaces.
* `readonly`: in the new mount namespace every file system is remounted read-only except the working directory.
* `landlock` (Linux >= 5.13): writing, creating and deleting files only beneath the working directory; reading
  only beneath the system and Python directories (`read_paths`), so the user's home and the project are neither
  writable nor readable; TCP bind/connect denied (kernel >= 6.7); signals to processes outside the sandbox denied
  (kernel >= 6.12).
* `drop_uid` + `hide` (when run as root): the program runs as a uid and gid of its own, owned by no account and
  used by no other run at the same time (`SANDBOX_UIDS`), because the kernel exempts uid 0 from RLIMIT_NPROC and
  file permissions; with a uid of its own, neither the processes of concurrent runs count towards its
  RLIMIT_NPROC nor can it signal theirs, even without `userns` or a PID namespace. Directories holding the
  interpreter under a home it cannot enter are bind-mounted read-only into a tmpfs laid over that home (the rest
  of the home is hidden).
* `userns`: the program gets its own user namespace, so RLIMIT_NPROC counts its processes alone.

Without namespaces (no user namespaces, not root) there is no network or PID isolation from the kernel: TCP is still
blocked by Landlock where available, and a Python audit hook refuses internet sockets, signals to other processes
and starting other programs (and, without Landlock, writing or deleting files outside the working directory); a
program can get past an audit hook (ctypes), so that is a speed bump, not a wall. Background processes are still
killed when the program ends (the launcher is a subreaper) unless the program kills the launcher first. Without
Landlock, a non-root program can write wherever its user can. As root, the sandbox refuses to run at all unless the
program can run as another uid (uid 0 is exempt from RLIMIT_NPROC and from file permissions, and could signal every
process on the machine).

Under load (many runs at once on few cores) the wall clock does not count time the program spent waiting for a CPU
(`Limits.wall_s`), so a starved honest program is not cut short; busy programs are held by the CPU time of the
whole run (every process it started, `Limits.cpu_s`) and every run ends by `Limits.max_wall_s`.
`Isolation.describe()` prints the state on a machine.

Not covered by any layer: CPU and memory shares between concurrent runs (no cgroups), named unix sockets the user
may open, and side channels. A verdict from a program is only as honest as the program: the sandbox protects the
machine, not the reward from a program written to fool its own test harness.
"""
from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER = str(Path(__file__).with_name("child.py"))
LAYERS = ("namespaces", "readonly", "hide", "drop_uid", "userns", "landlock")
SETUP_FAILED = 125
_MARK = b"opdlab-sandbox: "
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc", "/dev", "/sys/devices/system/cpu",
                "/opt")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# (first, count): the uids (and gids) programs run as under `drop_uid`, one per run, drawn at random so that
# sandboxes of other processes on the machine are unlikely to share one; above systemd's container range.
SANDBOX_UIDS = (0x70000000, 1 << 24)
_uids_lock = threading.Lock()
_uids_in_use: set[int] = set()
_uid_draw = random.SystemRandom()
# Refuses internet sockets (and, with `files`, writes outside the working directory) where the kernel could not.
_AUDIT_HOOK = """
import os, sys, socket
_wd = os.getcwd()
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT
def outside(path):
    return not os.path.abspath(os.fsdecode(path)).startswith(_wd + os.sep)
def _hook(event, args, _fam=(socket.AF_INET, socket.AF_INET6), _wd=_wd):
    if event == 'socket.__new__' and args[1] in _fam:
        raise PermissionError('opdlab sandbox: network access is not allowed')
    if FILES and event == 'open' and isinstance(args[0], (str, bytes)) and outside(args[0]) \\
            and ((args[1] and any(c in str(args[1]) for c in 'wax+')) or (args[1] is None and args[2] & _W)):
        raise PermissionError('opdlab sandbox: writing outside the working directory is not allowed')
    if FILES and event in ('os.remove', 'os.rename', 'os.rmdir', 'shutil.rmtree') \\
            and isinstance(args[0], (str, bytes)) and outside(args[0]):
        raise PermissionError('opdlab sandbox: changing files outside the working directory is not allowed')
    if event in ('os.kill', 'os.killpg') and args[0] != os.getpid():
        raise PermissionError('opdlab sandbox: signalling other processes is not allowed')
    if event in ('subprocess.Popen', 'os.system', 'os.exec', 'os.posix_spawn', 'os.spawn'):
        raise PermissionError('opdlab sandbox: starting other programs is not allowed')
sys.addaudithook(_hook)
del _hook
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@dataclass(frozen=True)
class Limits:
    """Per-run limits. Sizes in bytes unless named otherwise."""

    wall_s: float = 10.0  # wall-clock time not counting waits for a CPU, then the process group is killed
    cpu_s: float = 10.0  # CPU time (RLIMIT_CPU, whole seconds, at least 1): SIGXCPU, then SIGKILL a second later
    memory_mb: int = 2048  # address space of each process (RLIMIT_AS); Python alone maps ~30 MB
    processes: int = 64  # processes/threads of the program (RLIMIT_NPROC)
    file_mb: int = 64  # largest file it may write (RLIMIT_FSIZE): SIGXFSZ beyond
    open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout kept; more and the program is killed ('output_limit')
    stderr_bytes: int = 64 << 10  # stderr kept; more is dropped (not fatal)
    max_wall_s: float | None = None  # wall-clock time, waits for a CPU included (None: 3 x wall_s)
    run_cpu_s: float | None = None  # CPU time of all its processes together (None: 2 x cpu_s)

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "processes", "file_mb", "open_files", "output_bytes",
                     "max_wall_s", "run_cpu_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")

    def hard_wall_s(self) -> float:
        """The wall clock by which every run ends, however long it waited for a CPU."""
        return max(self.max_wall_s or 3 * self.wall_s, self.wall_s)

    def total_cpu_s(self) -> float:
        """CPU seconds of the whole run (every process it started, reaped ones included)."""
        return self.run_cpu_s or 2 * self.cpu_s


@dataclass
class RunResult:
    """How a run ended. status: 'ok' (exit 0), 'exit' (non-zero exit), 'signal' (killed by a signal it caused,
    e.g. SIGSEGV, SIGXFSZ), 'cpu_limit', 'timeout' (wall clock), 'output_limit', 'sandbox_error' (could not run)."""

    status: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Isolation:
    """The confinement layers in force on this machine, and those that could not be set up (with why)."""

    layers: tuple[str, ...]
    missing: dict[str, str] = field(default_factory=dict)
    audit_hook: bool = False

    def describe(self) -> str:
        lines = [f"in force: {', '.join(self.layers) or 'none'}"]
        lines += [f"missing {k}: {v}" for k, v in self.missing.items()]
        if self.audit_hook:
            lines.append("network (and, without landlock, file writes) guarded by a Python audit hook only")
        return "\n".join(lines)


def _clean_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _python_dirs() -> list[str]:
    dirs = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    dirs |= {p for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_path(key))}
    return sorted(os.path.realpath(d) for d in dirs if os.path.isdir(d))


def _hide_plan(dirs: list[str]) -> list[list]:
    """For root: [covered ancestor, [dirs beneath it to keep]] where a sandbox uid cannot pass an ancestor."""
    plan: dict[str, list[str]] = {}
    for d in dirs:
        parts = Path(d).parts
        for i in range(2, len(parts) + 1):
            anc = str(Path(*parts[:i]))
            st = os.stat(anc)
            if not st.st_mode & 0o001:  # a sandbox uid owns nothing outside its working directory
                plan.setdefault(anc, []).append(d)
                break
    out = []
    for anc, keep in plan.items():
        keep = sorted(set(keep))
        out.append([anc, [d for d in keep if not any(d.startswith(k + os.sep) for k in keep)]])
    return out


class Sandbox:
    """Runs programs under `limits` (see the module docstring); thread-safe, one process tree per run."""

    _probe_lock = threading.Lock()
    _probed: dict[tuple, Isolation] = {}

    def __init__(self, limits: Limits = Limits(), *, python: str = sys.executable, work_root: str | None = None,
                 extra_read_paths: tuple[str, ...] = (), disable: tuple[str, ...] = (), site_packages: bool = True):
        """`disable`: layers not to use even where available (to see, or test, how a weaker machine behaves).
        `site_packages=False` runs Python with -S: the standard library only, and about 0.1 s less per run."""
        unknown = set(disable) - set(LAYERS)
        if unknown:
            raise ValueError(f"Sandbox(disable=...): unknown layers {sorted(unknown)}; layers: {', '.join(LAYERS)}")
        self.limits, self.python, self.work_root, self.disable = limits, python, work_root, tuple(disable)
        self.flags = ["-I"] if site_packages else ["-I", "-S"]
        self.read_paths = sorted(set(_SYSTEM_READ) | set(_python_dirs()) | set(extra_read_paths))

    # -- what this machine allows ---------------------------------------------------------------------------
    def isolation(self) -> Isolation:
        """The layers in force (probed on first use, once per process and set of read paths)."""
        key = (self.python, tuple(self.read_paths), self.work_root, self.disable)
        with Sandbox._probe_lock:
            if key not in Sandbox._probed:
                Sandbox._probed[key] = self._probe()
            return Sandbox._probed[key]

    def _probe(self) -> Isolation:
        root = os.geteuid() == 0
        wanted = [n for n in LAYERS if (root or n not in ("hide", "drop_uid"))]
        missing: dict[str, str] = {n: "disabled by the caller" for n in self.disable if n in wanted}
        while True:
            for needs_mounts in ("hide", "readonly"):
                if "namespaces" in missing and needs_mounts in wanted and needs_mounts not in missing:
                    missing[needs_mounts] = "needs a mount namespace"
            if root and "hide" in missing and "drop_uid" not in missing and self._hidden_python():
                missing["drop_uid"] = f"a sandbox uid cannot reach the interpreter under {self._hidden_python()}"
            layers = tuple(n for n in wanted if n not in missing)
            res = self._run([self.python, "-I", "-c", "print('ok')"], b"", layers)
            if res.status == "ok" and res.stdout.strip() == b"ok":
                break
            failed = _failed_layer(res)
            if failed is None or failed not in layers:
                raise RuntimeError(f"the sandbox cannot run a program on this machine: {res.reason}; "
                                   f"stderr: {res.stderr[-500:].decode(errors='replace')}")
            missing[failed] = _failure_text(res)
        if root and "drop_uid" not in layers:
            raise RuntimeError(
                "opdlab sandbox: refusing to run programs as root: they could not be moved off uid 0, and as uid 0 "
                "they would escape the process limit and might signal or write anything on the machine; missing "
                "layers: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
        iso = Isolation(layers, missing, audit_hook="namespaces" not in layers)
        if set(missing) - set(self.disable):
            warnings.warn("opdlab sandbox: weaker confinement on this machine:\n" + iso.describe(), stacklevel=3)
        return iso

    def _hidden_python(self) -> str:
        """The directory a sandbox uid cannot enter on the way to the interpreter ('' when there is none)."""
        plan = _hide_plan(_python_dirs() + [os.path.dirname(self.python)])
        return ", ".join(anc for anc, _ in plan)

    # -- running --------------------------------------------------------------------------------------------
    def run_python(self, source: str, *, stdin: bytes = b"", files: dict[str, str] | None = None,
                   args: tuple[str, ...] = ()) -> RunResult:
        """Run `source` as main.py with `python -I`; `files` are written beside it first; `args` go to sys.argv."""
        iso = self.isolation()
        files = {"main.py": source, **(files or {})}
        argv = [self.python, *self.flags, "main.py", *args]
        if iso.audit_hook:
            hook = _AUDIT_HOOK.replace("FILES", str("landlock" not in iso.layers))
            argv = [self.python, *self.flags, "-c", hook, "main.py", *args]
        return self._run(argv, stdin, iso.layers, files=files)

    def _run(self, argv, stdin: bytes, layers, files=None) -> RunResult:
        lim = self.limits
        workdir = tempfile.mkdtemp(prefix="opdlab-box-", dir=self.work_root)
        start = time.monotonic()
        uid = _take_uid() if "drop_uid" in layers else None
        try:
            for name, text in (files or {}).items():
                if os.sep in name or name.startswith("."):
                    raise ValueError(f"sandbox file name must be a plain name, got {name!r}")
                Path(workdir, name).write_text(text, encoding="utf-8")
            if "drop_uid" in layers:
                for p in [workdir] + [os.path.join(workdir, n) for n in os.listdir(workdir)]:
                    os.chown(p, uid, uid)
            spec = {"argv": argv, "env": _clean_env(workdir), "workdir": workdir, "uid": uid,
                    "layers": {n: True for n in layers}, "read_paths": self.read_paths, "write_files": list(_DEVICES),
                    "hide_plan": _hide_plan(_python_dirs() + [os.path.dirname(self.python)]) if "hide" in layers
                    else [],
                    "limits": {"cpu_s": max(1, round(lim.cpu_s)), "as_bytes": lim.memory_mb << 20,
                               "fsize_bytes": lim.file_mb << 20, "nofile": lim.open_files, "nproc": lim.processes}}
            ready_read, spec["ready_fd"] = os.pipe()
            try:
                return _supervise([sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec)], stdin, lim, start,
                                  (ready_read, spec["ready_fd"]))
            finally:
                os.close(spec["ready_fd"])
                os.close(ready_read)
        except OSError as e:
            return RunResult("sandbox_error", None, b"", str(e).encode(), time.monotonic() - start,
                             f"could not start: {e}")
        finally:
            if uid is not None:
                with _uids_lock:
                    _uids_in_use.discard(uid)
            shutil.rmtree(workdir, ignore_errors=True)
            if os.path.exists(workdir):  # e.g. a read-only directory the program made: make it removable
                subprocess.run(["chmod", "-R", "u+rwx", workdir], capture_output=True)
                shutil.rmtree(workdir, ignore_errors=True)


def _take_uid() -> int:
    """A sandbox uid no other run of this process is using (see `SANDBOX_UIDS`)."""
    first, count = SANDBOX_UIDS
    with _uids_lock:
        while (uid := first + _uid_draw.randrange(count)) in _uids_in_use:
            pass
        _uids_in_use.add(uid)
        return uid


_CLOCK_TICK = os.sysconf("SC_CLK_TCK")
_LOOK_EVERY_S = 0.25  # how often the supervisor reads the run's CPU time and waits from /proc


def _tree_usage(root: int) -> tuple[float, float]:
    """(CPU seconds of the process tree under `root`, reaped descendants included; the longest time any one of its
    threads has spent waiting for a CPU, in seconds), from /proc; what cannot be read (a process just gone) is 0."""
    cpu, waited, todo, seen = 0.0, 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            cpu += sum(int(x) for x in fields[11:15]) / _CLOCK_TICK  # utime, stime, cutime, cstime
            tids = os.listdir(f"/proc/{pid}/task")
        except (OSError, ValueError, IndexError):
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    waited = max(waited, int(f.read().split()[1]) / 1e9)  # run_delay: runnable, not running
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo += [int(c) for c in f.read().split()]
            except (OSError, ValueError, IndexError):
                continue
    return cpu, waited


class _Clock:
    """A run's time limits: `wall_s` from the program's start plus the time it waited for a CPU, at most
    `hard_wall_s()` from the run's start (set-up included); `total_cpu_s()`."""

    def __init__(self, lim: Limits, start: float, pid: int):
        self.lim, self.start, self.pid = lim, start, pid
        self.waited = 0.0
        self.program_start: float | None = None
        self.hard = start + lim.hard_wall_s()
        self.deadline = self.hard  # until the program starts
        self.next_look = start + _LOOK_EVERY_S

    def started(self, now: float) -> None:
        """The program starts at `now` (the launcher's set-up is done)."""
        self.program_start = now
        self.deadline = min(now + self.lim.wall_s + self.waited, self.hard)

    def over(self, now: float) -> str | None:
        """'timeout' or 'run_cpu' once the run is over a limit at `now`, else None."""
        if now >= self.next_look or now >= self.deadline:
            cpu, waited = _tree_usage(self.pid)
            self.waited = max(self.waited, waited)
            if self.program_start is not None:
                self.deadline = min(self.program_start + self.lim.wall_s + self.waited, self.hard)
            self.next_look = now + _LOOK_EVERY_S
            if cpu > self.lim.total_cpu_s():
                return "run_cpu"
        return "timeout" if now >= self.deadline else None

    def pause_s(self, now: float) -> float:
        """How long the supervisor may wait before the next look."""
        return max(0.0, min(self.deadline, self.next_look) - now)


def _supervise(cmd: list[str], stdin: bytes, lim: Limits, start: float, ready: tuple[int, int]) -> RunResult:
    """Run the launcher; collect capped output; kill its process group on a time or CPU limit or an output flood.

    `ready`: (read, write) ends of a pipe on which the launcher writes a byte as the program starts; the program's
    wall clock counts from then."""
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write(stdin)
        stdin_file.seek(0)
        proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
                                close_fds=True, pass_fds=(ready[1],))
    out, err = bytearray(), bytearray()
    killed_for = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    sel.register(ready[0], selectors.EVENT_READ, None)
    clock, exited_at = _Clock(lim, start, proc.pid), None
    try:
        while sel.get_map() and not killed_for:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is None and (killed_for := clock.over(now)):
                break
            if exited_at is not None and now - exited_at > 0.5:
                break  # the launcher is gone; something that escaped it holds a pipe open: stop listening
            for key, _ in sel.select(min(clock.pause_s(now), 0.1) if exited_at else clock.pause_s(now)):
                chunk = os.read(key.fd, 65536)
                if key.data is None:  # the ready pipe: the program starts now (or its launcher ended)
                    sel.unregister(key.fileobj)
                    clock.started(time.monotonic())
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                cap = lim.output_bytes if buf is out else lim.stderr_bytes
                buf += chunk[: max(0, cap + 1 - len(buf))]
                if buf is out and len(out) > lim.output_bytes:
                    killed_for = "output_limit"
        while not killed_for and proc.poll() is None:  # output closed, program still running
            if not (killed_for := clock.over(time.monotonic())):
                time.sleep(min(clock.pause_s(time.monotonic()), 0.05) or 0.01)
    finally:
        if killed_for or proc.poll() is None:
            _kill_group(proc.pid)
        proc.wait()
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    wall = time.monotonic() - start
    return _classify(proc.returncode, bytes(out[: lim.output_bytes]), bytes(err[: lim.stderr_bytes]), wall,
                     killed_for, lim, clock.waited)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(rc: int | None, out: bytes, err: bytes, wall: float, killed_for: str | None, lim: Limits,
              waited: float = 0.0) -> RunResult:
    if killed_for == "timeout":
        why = f"wall-clock limit of {lim.wall_s:g} s"
        why += f" (+{waited:.1f} s waiting for a CPU)" if waited >= 0.05 else ""
        if wall >= lim.hard_wall_s():
            why = f"wall-clock limit of {lim.hard_wall_s():g} s, waits for a CPU included"
        return RunResult("timeout", rc, out, err, wall, why)
    if killed_for == "run_cpu":
        return RunResult("cpu_limit", rc, out, err, wall, f"CPU-time limit of {lim.total_cpu_s():g} s for all its "
                         "processes together")
    if killed_for == "output_limit":
        return RunResult("output_limit", rc, out, err, wall, f"wrote more than {lim.output_bytes} bytes to stdout")
    if rc == 0:
        return RunResult("ok", rc, out, err, wall)
    if rc is not None and rc < 0:
        sig = -rc
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return RunResult("cpu_limit", rc, out, err, wall, f"CPU-time limit of {max(1, round(lim.cpu_s))} s")
        return RunResult("signal", rc, out, err, wall, f"killed by {signal.Signals(sig).name}")
    if rc == SETUP_FAILED and _MARK in err:
        return RunResult("sandbox_error", rc, out, err, wall, _failure_line(err))
    last = err.decode(errors="replace").strip().splitlines()
    return RunResult("exit", rc, out, err, wall, f"exit status {rc}" + (f": {last[-1][:200]}" if last else ""))


def _failure_line(err: bytes) -> str:
    line = err[err.rfind(_MARK):].split(b"\n", 1)[0]
    return line.decode(errors="replace")


def _failed_layer(res: RunResult) -> str | None:
    if res.status != "sandbox_error" or _MARK not in res.stderr:
        return None
    name = _failure_line(res.stderr)[len(_MARK):].split(":", 1)[0]
    return {"proc": "namespaces", "no_new_privs": None}.get(name, name)


def _failure_text(res: RunResult) -> str:
    return _failure_line(res.stderr)[len(_MARK):] if _MARK in res.stderr else res.reason
