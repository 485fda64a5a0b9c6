"""OS isolation layers for sandbox processes, each applied when this machine allows it.

The zygote (the small pre-imported parent every worker is forked from) enters new network,
IPC and mount namespaces and makes its mounts read-only; workers inherit that. Each worker then
drops to an unprivileged user, caps its resources (address space, CPU time, file size, open
files, processes), asks to die with its parent, and installs a seccomp filter when `pyseccomp`
is installed. Every function returns which layers took effect, so `Sandbox.layers` can tell a
user without root exactly what they get.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import signal

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
NOBODY = 65534


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source, target: str, flags: int) -> bool:
    src = source.encode() if source else None
    return _libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) == 0


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (no orphans)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _mount_points() -> list[tuple[str, set[str]]]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")  # \040 for spaces
            points.append((target, set(fields[5].split(","))))
    return points


def _readonly_mounts() -> str:
    """Remount everything read-only inside this (already private) mount namespace."""
    failed = 0
    points = _mount_points()
    for target, options in points:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        flags |= (MS_NOSUID if "nosuid" in options else 0) | (MS_NODEV if "nodev" in options else 0)
        flags |= MS_NOEXEC if "noexec" in options else 0
        if not _mount(None, target, flags):
            failed += 1
    return "yes" if failed == 0 else f"partial ({len(points) - failed}/{len(points)} mounts)"


def zygote_isolation() -> dict[str, object]:
    """Enter fresh namespaces (no network, no shared IPC, read-only mounts) for all workers."""
    layers: dict[str, object] = {"net_namespace": False, "ipc_namespace": False, "readonly_fs": "no"}
    if os.geteuid() == 0:
        if _unshare(CLONE_NEWNET):
            layers["net_namespace"] = True
        if _unshare(CLONE_NEWIPC):
            layers["ipc_namespace"] = True
        # The mount namespace must be private before anything is remounted, or the change
        # would propagate to the host.
        if _unshare(CLONE_NEWNS) and _mount(None, "/", MS_REC | MS_PRIVATE):
            layers["readonly_fs"] = _readonly_mounts()
    else:
        # Without root, a user namespace may still grant a private network namespace.
        if _unshare(CLONE_NEWUSER | CLONE_NEWNET):
            layers["net_namespace"] = True
    return layers


def prepare_fds(keep: list[int], devnull: int) -> list[int]:
    """Leave exactly stdin/stdout/stderr (on /dev/null) and `keep` at fds 3, 4, ...

    Returns the new fd numbers of `keep`. With every fd below the RLIMIT_NOFILE cap in use,
    no file, socket or pipe can be opened afterwards.
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


def virtual_memory_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def worker_isolation(memory_mb: int, nofile: int) -> dict[str, object]:
    """Lock this (freshly forked) worker down. Call after `prepare_fds`, before any snippet."""
    layers: dict[str, object] = {}
    preload_seccomp()  # while files can still be opened (the zygote has usually done it)
    if os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            layers["uid_drop"] = True
        except OSError:
            layers["uid_drop"] = False
    else:
        layers["uid_drop"] = False
    die_with_parent()  # after setuid: a credential change clears the parent-death signal
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    # The address-space cap counts what is already mapped (libraries, shared pixels).
    budget = virtual_memory_bytes() + memory_mb * 1024 * 1024
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
    layers["seccomp"] = _install_seccomp()
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


# System calls a worker never needs: new processes, sockets, privilege and kernel changes,
# other processes' memory, filesystem changes.
_DENIED_SYSCALLS = """
socket socketpair connect bind listen accept accept4 execve execveat fork vfork clone clone3
ptrace kill tkill mount umount2 unshare setns chroot pivot_root reboot swapon swapoff
init_module finit_module delete_module kexec_load open_by_handle_at name_to_handle_at
process_vm_readv process_vm_writev keyctl add_key request_key bpf perf_event_open userfaultfd
personality io_uring_setup mknod mknodat chmod fchmod fchmodat chown fchown lchown fchownat
link linkat symlink symlinkat unlink unlinkat rename renameat renameat2 mkdir mkdirat rmdir
truncate acct quotactl settimeofday clock_settime sethostname setdomainname
""".split()


def preload_seccomp():
    """Import the optional `pyseccomp` (needs libseccomp) in the zygote, while files can be opened."""
    try:
        import pyseccomp

        return pyseccomp
    except Exception:
        return None


def _install_seccomp() -> bool:
    seccomp = preload_seccomp()
    if seccomp is None:
        return False
    try:
        filt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in _DENIED_SYSCALLS:
            try:
                filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
            except Exception:
                continue  # a syscall this kernel/arch does not have
        filt.load()
        return True
    except Exception:
        return False
