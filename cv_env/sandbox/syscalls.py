"""The seccomp allow-list: the only system calls a locked-down worker can make.

A worker, once locked down, needs little of the kernel: read requests from and write replies to
the socket it already holds, map and unmap memory, take locks, read clocks and random bytes,
and exit. Every other call (opening any file, sockets, pipes, new processes, signals to other
processes, shared memory, ptrace, mounts, namespace and credential changes, ...) fails with
EPERM, so even arbitrary native code in the worker can do nothing else. `prlimit64` and the
signal calls are allowed only on the worker itself. The filter is built with libseccomp (the
`pyseccomp` binding, which needs the system's libseccomp); without it this layer is absent and
`Sandbox.layers` says so.
"""

from __future__ import annotations

import errno

# Grouped by what they are for; names the running kernel or architecture lacks are skipped.
ALLOWED: dict[str, tuple[str, ...]] = {
    "the host socket and the shared-memory file": (
        "read", "write", "readv", "writev", "pread64", "pwrite64", "recvfrom", "recvmsg",
        "sendto", "sendmsg", "lseek", "close", "fstat", "newfstatat", "poll", "ppoll"),
    "memory": ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise"),
    "threads' locks and the C runtime": (
        "futex", "set_robust_list", "rseq", "membarrier", "arch_prctl", "sched_yield",
        "sched_getaffinity", "restart_syscall"),
    "signals delivered to the worker itself": ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack"),
    "clocks, identity, limits and randomness": (
        "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
        "getrusage", "times", "getrandom", "uname", "getpid", "gettid", "getppid", "getuid",
        "geteuid", "getgid", "getegid", "getrlimit", "setrlimit"),
    "leaving": ("exit", "exit_group"),
}


def allowed_syscalls() -> list[str]:
    """Every allowed name, flat (the calls restricted to the worker itself come on top)."""
    return [name for group in ALLOWED.values() for name in group]


def install(own_pid: int) -> bool:
    """Load the allow-list into this process (irreversible; inherited by nothing: no forks).

    `own_pid` is this process's pid as it sees it (1 in its own PID namespace): `kill`,
    `tgkill` and `prlimit64` are allowed only on it. Returns False when libseccomp is missing
    or the kernel refused the filter.
    """
    try:
        import pyseccomp as seccomp
    except Exception:  # pragma: no cover - depends on the system's libseccomp
        return False
    try:
        refuse = seccomp.ERRNO(errno.EPERM)
        filt = seccomp.SyscallFilter(defaction=refuse)
        for name in allowed_syscalls():
            try:
                filt.add_rule(seccomp.ALLOW, name)
            except Exception:
                continue  # not a system call of this kernel/architecture
        filt.add_rule(seccomp.ALLOW, "prlimit64", seccomp.Arg(0, seccomp.EQ, 0))
        filt.add_rule(seccomp.ALLOW, "prlimit64", seccomp.Arg(0, seccomp.EQ, own_pid))
        filt.add_rule(seccomp.ALLOW, "kill", seccomp.Arg(0, seccomp.EQ, own_pid))
        filt.add_rule(seccomp.ALLOW, "tgkill", seccomp.Arg(0, seccomp.EQ, own_pid))
        filt.load()
        return True
    except Exception:
        return False
