"""The inside of `opdlab.tasks.sandbox.run`: a launcher run as `python -I -S child.py SPEC_JSON`.

Standard library only (it runs with `-S`, before any site-packages). It builds the confinement layers the spec
asks for, in this order, and exits with status 125 and a line `opdlab-sandbox: LAYER: error` on stderr when a
requested layer cannot be set up (the parent then drops that layer and says so; it never runs a program with less
confinement than it reports):

1. namespaces (`unshare`): new network, PID, mount, IPC and UTS namespaces; an unprivileged user also gets a new
   user namespace mapping its uid to itself (that is what makes the others allowed). Mounts are made private first
   so nothing done here reaches the host.
2. `hide` (root only): the directories that hold the Python interpreter are bind-mounted read-only into a fresh
   tmpfs laid over the first ancestor other users cannot enter (e.g. /root), so the program can run as its uid.
3. `readonly` (with namespaces): every mount of the new mount namespace is remounted read-only except the
   working directory, so nothing outside it can be written even without Landlock (world-writable /tmp included).
4. fork `init`, PID 1 of the new PID namespace: it mounts a /proc of that namespace (host processes and their
   environments are invisible), becomes a child subreaper, dies with the launcher (PDEATHSIG), and runs the program
   as its child. When the program exits, init exits too and the kernel kills every process left in the namespace;
   without a PID namespace, init kills each remaining descendant itself.
5. the program's process: resource limits; `drop_uid` (root: become the run's own uid/gid); `userns` (a further user
   namespace, so RLIMIT_NPROC counts this program's processes alone, not every process of the uid); RLIMIT_NPROC
   only now (set before the uid change or the namespace, it would count every process of the uid); no_new_privs;
   `landlock` (read/execute only beneath the read paths, full access only beneath the working directory, TCP bind
   and connect denied, signals and abstract unix sockets scoped to the sandbox); a byte on the spec's `ready_fd`
   (the parent starts the program's wall clock then, not counting set-up); then execve with the given
   environment.

The launcher reports the program's end as its own: the same exit status, or death by the same signal.
"""
import ctypes
import json
import os
import re
import signal
import stat
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on all arches
SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


class LayerError(Exception):
    def __init__(self, layer: str, what: str):
        super().__init__(f"{layer}: {what}")
        self.layer = layer


def _check(layer: str, what: str, result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise LayerError(layer, f"{what}: {os.strerror(err)} (errno {err})")
    return result


def _mount(layer, source, target, fstype, flags, data=None):
    enc = (lambda s: None if s is None else s.encode())
    _check(layer, f"mount {target}", _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                                                 enc(data)))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(spec) -> None:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check("namespaces", "unshare", _libc.unshare(flags))
    if uid != 0:
        _map_own_ids("namespaces", uid, gid)
    _mount("namespaces", None, "/", None, MS_REC | MS_PRIVATE)


def hide(plan) -> None:
    """plan: [[covered_dir, [dirs to keep visible beneath it]], ...] (computed by the parent)."""
    stage_root = os.path.join(os.getcwd(), ".opdlab-stage")
    for n, (covered, keep) in enumerate(plan):
        staged = []
        for i, path in enumerate(keep):
            stage = os.path.join(stage_root, f"{n}-{i}")
            os.makedirs(stage)
            _mount("hide", path, stage, None, MS_BIND | MS_REC)
            staged.append((stage, path))
        _mount("hide", "tmpfs", covered, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        for stage, path in staged:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount("hide", stage, path, None, MS_BIND | MS_REC)
            _mount("hide", None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            _check("hide", f"umount {stage}", _libc.umount2(stage.encode(), MNT_DETACH))
    if os.path.isdir(stage_root):
        for name in os.listdir(stage_root):
            os.rmdir(os.path.join(stage_root, name))
        os.rmdir(stage_root)


_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
                "relatime": 1 << 21}


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, per-mount options) of this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, fields[5]))
    return out


def read_only(workdir: str) -> None:
    """Every mount read-only except the working directory (bind-mounted onto itself first) and /proc."""
    _mount("readonly", workdir, workdir, None, MS_BIND | MS_REC)
    for point, options in _mountinfo():
        opts = options.split(",")
        if "ro" in opts or point == workdir or point.startswith(workdir + "/") or point.startswith("/proc"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name in opts:
            flags |= _MOUNT_FLAGS.get(name, 0)
        try:
            _mount("readonly", None, point, None, flags)
        except LayerError:
            if point == "/":
                raise  # the root file system must be read-only; a pseudo file system that refuses is left as is


def set_limits(limits) -> None:
    """Every limit but RLIMIT_NPROC (`limit_processes`, after the uid change and the user namespace)."""
    import resource  # lazy: this launcher imports as little as it can before confinement

    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu_s, SIGKILL a second later
    for name, key in (("RLIMIT_AS", "as_bytes"), ("RLIMIT_FSIZE", "fsize_bytes"), ("RLIMIT_NOFILE", "nofile")):
        resource.setrlimit(getattr(resource, name), (limits[key], limits[key]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # As high as allowed until then: at setuid() the kernel compares the new uid's processes, of every sandbox
    # and of anything else running as that uid, with the current RLIMIT_NPROC (over it, execve fails with EAGAIN),
    # and a new user namespace keeps the creator's RLIMIT_NPROC as the cap on that machine-wide count.
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):  # not root: the hard limit is as high as it goes
        resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))


def limit_processes(limits) -> None:
    """RLIMIT_NPROC, set last: inside the program's own user namespace it counts this program's processes alone."""
    import resource

    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))


def drop_uid(uid: int) -> None:
    """Become `uid` (and the gid of that number), with no supplementary groups."""
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as e:
        raise LayerError("drop_uid", str(e)) from None


def own_user_namespace() -> None:
    uid, gid = os.getuid(), os.getgid()
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change made /proc/self root's; the maps below need it ours
    _check("userns", "unshare", _libc.unshare(CLONE_NEWUSER))
    _map_own_ids("userns", uid, gid)


def _map_own_ids(layer: str, uid: int, gid: int) -> None:
    """In a new user namespace: map our own uid/gid to themselves (and give up setgroups, which the map needs)."""
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as e:
        raise LayerError(layer, f"uid/gid map: {e}") from None


# Landlock (linux/landlock.h). Filesystem rights by ABI version: 1 has bits 0-12, 2 adds REFER, 3 TRUNCATE.
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE


def landlock_abi() -> int:
    _libc.syscall.restype = ctypes.c_long
    return max(int(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))), 0)


def landlock(read_paths, write_paths) -> None:
    abi = landlock_abi()
    if abi < 1:
        raise LayerError("landlock", "not supported by this kernel")
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("<QQQ", fs, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check("landlock", "create_ruleset",
                     _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)))
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    for paths, rights in ((read_paths, read), (write_paths, fs)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a read path this system lacks (/lib64, ...)
            allowed = rights if stat.S_ISDIR(os.fstat(fd).st_mode) else rights & FILE_RIGHTS
            rule = ctypes.create_string_buffer(struct.pack("<Qi", allowed, fd), 12)
            _check("landlock", f"add_rule {path}", _libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, ctypes.c_int(1),
                                                                 rule, ctypes.c_uint32(0)))
            os.close(fd)
    _check("landlock", "restrict_self", _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)))
    os.close(ruleset)


def start_program(spec) -> None:
    """In the forked program process: confine, then execve (never returns)."""
    layers = spec["layers"]
    try:
        set_limits(spec["limits"])
        if layers.get("drop_uid"):
            drop_uid(spec["uid"])
        if layers.get("userns"):
            own_user_namespace()
        limit_processes(spec["limits"])
        _check("no_new_privs", "prctl", _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        if layers.get("landlock"):
            landlock(spec["read_paths"], [spec["workdir"]] + spec.get("write_files", []))
        os.chdir(spec["workdir"])
        os.write(spec["ready_fd"], b"1")  # the program's wall clock starts now (set-up is not its time)
        os.close(spec["ready_fd"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except LayerError as e:
        os.write(2, f"opdlab-sandbox: {e}\n".encode())
        os._exit(SETUP_FAILED)
    except OSError as e:
        os.write(2, f"opdlab-sandbox: exec: {e}\n".encode())
        os._exit(SETUP_FAILED)


def _descendants() -> list[int]:
    pids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def run_init(spec, launcher: int, report: int) -> None:
    """PID 1 of the sandbox (or a subreaper without a PID namespace): run the program, then clear up.

    The program's wait status goes to the launcher through `report` (a pipe): PID 1 cannot die by its own signal.
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if not spec["layers"].get("namespaces") and os.getppid() != launcher:
        os._exit(SETUP_FAILED)  # the launcher died before PDEATHSIG was set (in a PID namespace getppid() is 0)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if spec["layers"].get("namespaces"):
        try:
            _mount("proc", "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except LayerError as e:
            os.write(2, f"opdlab-sandbox: {e}\n".encode())
            os._exit(SETUP_FAILED)
    pid = os.fork()
    if pid == 0:
        start_program(spec)
    os.close(spec["ready_fd"])
    status = None
    while status is None:
        try:
            done, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if done == pid:
            status = st
    # Whatever the program left behind dies now (inside a PID namespace the kernel would do it as we exit).
    while True:
        left = _descendants()
        if not left:
            break
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            break
    if status is not None:
        os.write(report, struct.pack("<i", status))
    os._exit(0)


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal that does not kill (SIGCHLD, ...) cannot be mirrored
    os._exit(os.WEXITSTATUS(status))


def main() -> None:
    spec = json.loads(sys.argv[1])
    layers = spec["layers"]
    import resource  # lazy: this launcher imports as little as it can before confinement
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        os.chdir(spec["workdir"])
        if layers.get("namespaces"):
            enter_namespaces(spec)
        if layers.get("hide"):
            hide(spec["hide_plan"])
        if layers.get("readonly"):
            read_only(spec["workdir"])
    except LayerError as e:
        os.write(2, f"opdlab-sandbox: {e}\n".encode())
        os._exit(SETUP_FAILED)
    launcher = os.getpid()
    read_end, write_end = os.pipe()  # close-on-exec: the program never holds it
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        run_init(spec, launcher, write_end)
    os.close(write_end)
    os.close(spec["ready_fd"])
    _, status = os.waitpid(pid, 0)
    reported = os.read(read_end, 4)
    _exit_like(struct.unpack("<i", reported)[0] if len(reported) == 4 else status)


if __name__ == "__main__":
    main()
