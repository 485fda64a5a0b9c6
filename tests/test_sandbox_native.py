"""Red team, OS layer: native code that has already broken out of the Python layer.

Every attack is plain Python with ctypes, os, mmap and raw system calls. Each runs twice: with
both layers (where the Python layer refuses it at once) and with the restricted layer switched
off (`Sandbox(restricted=False)`), where only the OS layer stands between the code and the host.
Each test asserts that the harm did not happen, on the host's side where it can be seen there,
and that the pool still serves a normal call correctly afterwards.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

import numpy as np
import pytest
from PIL import Image

from redteam import image, layered_sandbox  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the sandbox needs Linux")

# Raw system calls by name (pyseccomp's table, already loaded in every worker).
PRELUDE = """
import ctypes, os, pyseccomp
libc = ctypes.CDLL(None, use_errno=True)
ARCH = pyseccomp.system_arch()
def raw(name, *args):
    number = pyseccomp.resolve_syscall(ARCH, name)
    r = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])
    return r if r >= 0 else -ctypes.get_errno()
def path(s):
    return ctypes.cast(ctypes.c_char_p(s.encode()), ctypes.c_void_p).value
"""


@pytest.fixture(scope="module")
def sandbox(layered_sandbox):
    return layered_sandbox


def assert_pool_healthy(sandbox, image):
    """Both workers (two calls at once) still run a normal snippet correctly."""
    import threading

    results = []
    threads = [threading.Thread(target=lambda: results.append(sandbox.run("result = image.rotate(90, expand=True)",
                                                                          [image]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.ok, r.error
        assert r.image.size == (48, 64)
        assert np.array_equal(np.asarray(r.image), np.asarray(image.rotate(90, expand=True)))


def attack(sandbox, image, code):
    # The probes below are chosen to be harmless even if they succeeded (signal 0, read-only
    # limits, invalid mounts), but never run them where the OS layer is missing.
    layers = sandbox.layers
    assert layers["pid_namespace"] and layers["seccomp"], f"the OS layer is not active here: {layers}"
    return sandbox.run(PRELUDE + code, [image])


def test_layers_are_reported(sandbox):
    layers = sandbox.layers
    assert layers["restricted_compile"] is sandbox.restricted and layers["wall_clock_kill"]
    assert {"RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_FSIZE"} <= set(layers["rlimits"])
    assert layers["seccomp"] == "allow-list" and layers["host_verifies_claims"]
    # This machine allows every OS piece (CI and the dev machines are Linux with user namespaces).
    assert layers["empty_root"] and layers["pid_namespace"] and layers["proc_hidden"]
    assert layers["identity"] in ("own uid", "no capabilities")


def test_host_files_cannot_be_read(sandbox, image, tmp_path):
    secret = tmp_path / "secret.txt"
    token = secrets.token_hex(16)
    secret.write_text(token)
    code = f"""
found = []
for p in ["{secret}", "/etc/passwd", "/etc/hostname", "/proc/1/environ", "/proc/{os.getpid()}/cmdline",
          "/proc/self/maps", "/root/.bashrc", "/home", "/tmp", "/"]:
    for how in (lambda: open(p).read(200), lambda: os.listdir(p),
                lambda: os.read(raw("openat", -100, path(p), 0), 200)):
        try:
            v = how()
            if v not in (None, []) and not (isinstance(v, int) and v < 0):
                found.append((p, str(v)[:200]))
        except Exception:
            pass
for fd in (0, 1, 2):  # free descriptors under the open-files limit, then try again
    os.close(fd)
try:
    found.append(("after close", open("{secret}").read()))
except Exception:
    pass
print("FOUND", found)
"""
    r = attack(sandbox, image, code)
    assert token not in (r.stdout + str(r.error))
    if r.ok:  # the OS-layer-only run gets this far: all it can list is the empty root
        listed = r.stdout.split("FOUND", 1)[1]
        assert "/etc/passwd" not in listed and "/proc" not in listed and "/home" not in listed, listed
    assert_pool_healthy(sandbox, image)


def test_no_file_can_be_written(sandbox, image, tmp_path):
    targets = [tmp_path / "canary", f"/tmp/cv_native_{secrets.token_hex(4)}", f"/dev/shm/cv_native_{secrets.token_hex(4)}"]
    code = f"""
for p in {[str(t) for t in targets]!r}:
    for how in (lambda: open(p, "w").write("x"), lambda: os.open(p, os.O_CREAT | os.O_WRONLY),
                lambda: raw("openat", -100, path(p), os.O_CREAT | os.O_WRONLY, 0o644),
                lambda: os.mkdir(p + ".d")):
        try:
            print("WROTE", p, how())
        except Exception:
            pass
"""
    attack(sandbox, image, code)
    for target in targets:
        assert not os.path.exists(target) and not os.path.exists(f"{target}.d")
    assert_pool_healthy(sandbox, image)


def test_no_network(sandbox, image):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    code = f"""
import socket
for make in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=0.5),
             lambda: socket.socket(socket.AF_UNIX).connect("\\0cv-native"),
             lambda: raw("socket", 2, 1, 0), lambda: raw("socketpair", 1, 1, 0, 0)):
    try:
        v = make()
        if not (isinstance(v, int) and v < 0):
            print("CONNECTED", v)
    except Exception:
        pass
"""
    r = attack(sandbox, image, code)
    listener.settimeout(0.3)
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()
    assert "CONNECTED" not in r.stdout
    assert_pool_healthy(sandbox, image)


def test_siblings_and_the_host_cannot_be_touched(sandbox, image):
    before = set(sandbox.worker_pids)
    code = """
import signal
hits = []
limits = ctypes.create_string_buffer(16)
for target in (0, -1):  # signal 0: "could I signal them?", without doing it
    if raw("kill", target, 0) == 0:
        hits.append(("kill", target))
for pid in range(2, 4096):
    for name, args in (("kill", (pid, 0)), ("tgkill", (pid, pid, 0)),
                       ("prlimit64", (pid, 9, 0, ctypes.addressof(limits))), ("pidfd_open", (pid, 0))):
        if raw(name, *args) >= 0:
            hits.append((name, pid))
print("HITS", hits)
"""
    r = attack(sandbox, image, code)
    assert "HITS [(" not in r.stdout, r.stdout
    siblings = before & set(sandbox.worker_pids)  # the attacked worker may have been replaced
    assert siblings, "the idle sibling worker was killed"
    for pid in siblings:
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split(")")[-1].split()[0] in "RSD", "a sibling was stopped"
    assert_pool_healthy(sandbox, image)


def test_no_new_processes_or_privileges(sandbox, image):
    code = """
done = []
for name, args in (("fork", ()), ("vfork", ()), ("clone", (17, 0, 0, 0, 0)), ("clone3", (0, 0)),
                   ("execve", (path("/usr/bin/true"), 0, 0)), ("unshare", (0x10000000,)),
                   ("setns", (0, 0)), ("mount", (path("none"), path("/nonexistent"), path("tmpfs"), 0, 0)),
                   ("umount2", (path("/nonexistent"), 2)),
                   ("chroot", (path("/"),)), ("setuid", (0,)), ("capset", (0, 0)), ("prctl", (38, 1, 0, 0, 0)),
                   ("bpf", (0, 0, 0)), ("userfaultfd", (0,)), ("io_uring_setup", (1, 0)),
                   ("perf_event_open", (0, 0, -1, -1, 0)), ("keyctl", (0, 0)), ("personality", (0,)),
                   ("memfd_create", (path("x"), 0)), ("pipe2", (path("xxxxxxxx"), 0)), ("ioctl", (0, 0x5412, 0)),
                   ("open_by_handle_at", (0, 0, 0)), ("process_vm_readv", (1, 0, 0, 0, 0, 0))):
    returned = raw(name, *args)
    if returned != -1:  # every one of them must fail with EPERM
        done.append((name, returned))
for name, how in (("fork", os.fork), ("system", lambda: os.system("true") == 0 or None),  # 127: no shell
                  ("posix_spawn", lambda: os.posix_spawn("/usr/bin/true", ["true"], {}))):
    try:
        if how() not in (-1, None):
            done.append(name)
    except Exception:
        pass
print("DONE", done)
"""
    r = attack(sandbox, image, code)
    if not sandbox.restricted:
        assert r.ok, r.error
        assert r.stdout.strip() == "DONE []", r.stdout
    else:
        assert not r.ok and "import" in r.error
    assert_pool_healthy(sandbox, image)


def _shmem_kb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def test_no_memory_outside_the_cap(sandbox, image):
    before = _shmem_kb()
    code = """
import mmap
got = []
size = 512 * 1024 * 1024
segment = raw("shmget", 0, size, 0o1600)
if segment >= 0:
    address = raw("shmat", segment, 0, 0)
    if address > 0:
        ctypes.memset(address, 1, size)
        got.append("sysv")
fd = raw("memfd_create", path("x"), 0)
if fd >= 0 and raw("ftruncate", fd, size) == 0:
    got.append("memfd")
try:
    block = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
    block.write(b"x" * size)
    got.append("shared mmap")
except Exception:
    pass
try:
    big = bytearray(3 * 1024 ** 3)
    got.append("bytearray")
except MemoryError:
    pass
print("GOT", got)
"""
    r = attack(sandbox, image, code)
    assert "GOT [" not in r.stdout or r.stdout.strip().endswith("GOT []"), r.stdout
    assert _shmem_kb() - before < 64 * 1024  # no shared memory left behind on the host
    assert_pool_healthy(sandbox, image)


def test_no_call_sees_another_calls_data(sandbox, image):
    marker = secrets.token_bytes(24)
    pixels = np.frombuffer((marker * 2000)[: 40 * 40 * 3], np.uint8).reshape(40, 40, 3)
    secret_image = Image.fromarray(pixels.copy())
    assert sandbox.run("result = image.rotate(180)", [secret_image]).ok  # another episode's call
    code = f"""
size = os.fstat(4).st_size  # the worker's whole shared-memory file, mapped with libc's mmap
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
memory = ctypes.string_at(libc.mmap(None, size, 1, 1, 4, 0), size)
print("SEEN", len(memory) == size and memory.find({marker!r}) >= 0)
"""
    r = attack(sandbox, image, code)
    assert "SEEN True" not in r.stdout
    if not sandbox.restricted:
        assert r.stdout == "SEEN False\n", (r.stdout, r.error)  # it did read all of it, and found nothing
    assert_pool_healthy(sandbox, image)


def test_no_worker_outlives_its_deadline(sandbox, image):
    code = """
import signal
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
raw("prlimit64", 0, 0, path("\\xff" * 16), 0)
while True:
    pass
"""
    pids = set(sandbox.worker_pids)
    start = time.monotonic()
    r = attack(sandbox, image, code)
    assert time.monotonic() - start < sandbox.timeout_s + 2.0
    assert not r.ok and ("TimeoutError" in r.error or "import" in r.error)
    time.sleep(0.2)
    gone = pids - set(sandbox.worker_pids)
    for pid in gone:
        assert not os.path.exists(f"/proc/{pid}/status") or "zombie" in open(f"/proc/{pid}/status").read()
    assert_pool_healthy(sandbox, image)


def test_nothing_is_left_behind(sandbox, image):
    tmp_before = set(os.listdir("/tmp"))
    for code in ("raw('shmget', 0, 4096, 0o1600)", "os.open('/tmp/left', os.O_CREAT | os.O_WRONLY)",
                 "import mmap\nkeep = mmap.mmap(-1, 1 << 20)"):
        attack(sandbox, image, code)
    assert set(os.listdir("/tmp")) - tmp_before == set()
    assert_pool_healthy(sandbox, image)
    # Exactly one keeper and one worker per slot under the zygote: nothing else survives.
    from cv_env.sandbox.pool import _descendants

    deadline = time.monotonic() + 3.0  # replaced workers are reaped within the zygote's 1 s poll
    while len(tree := _descendants(sandbox.zygote_pid)) != 2 * sandbox.workers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(tree) == 2 * sandbox.workers, tree
