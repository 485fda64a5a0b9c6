"""The code that runs inside sandbox processes: the zygote, and the workers it forks.

The zygote is started once per `Sandbox` as a fresh, small Python process (never a fork of the
trainer), under bubblewrap where available (`isolation.py`): it imports the allowed modules,
warms them up (so no worker ever needs to open a file) and then, whenever the host asks,
forks a worker alone in its own namespaces, handing it a socket and the shared-memory file the
host passed over SCM_RIGHTS. A worker locks itself down and serves snippets: input pixels come
from shared memory, the output's pixels go back into it, and only small JSON messages
(`wire.py`) cross the socket. Nothing is pickled.

Per call a worker first marks the call as begun in shared memory (the host retries, on a fresh
worker, a call that never got this far), runs the snippet, replies, and then checks itself: a
worker that a snippet left with changed library state or a global lock held says so and exits,
and the host gives the next call a fresh worker, so an innocent call never pays for the last.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import socket
import sys
import time

import numpy as np
from PIL import Image

from cv_env.sandbox.wire import recv_msg, send_msg


def _warm_up(modules: dict) -> None:
    """Run representative snippets once so lazy initialisation happens before forking:
    a locked-down worker cannot open a file, so nothing may be imported or read lazily later."""
    from cv_env.sandbox.executor import execute_snippet

    image = Image.new("RGB", (64, 48), (10, 20, 30))
    code = (
        "import numpy as np\nfrom PIL import Image, ImageOps, ImageEnhance, ImageFilter\nimport cv2\n"
        "a = np.array(image)[4:40, 2:50]\nb = cv2.GaussianBlur(cv2.rotate(a, cv2.ROTATE_180), (3, 3), 0)\n"
        "c = ImageEnhance.Contrast(Image.fromarray(b)).enhance(1.3).filter(ImageFilter.SHARPEN)\n"
        "résultat = ImageOps.grayscale(c.rotate(90, expand=True).crop((1, 1, 20, 20)))\n"  # unicodedata
        "result = résultat\nprint(result.size, 'é'.encode('latin-1'), 'x'.encode('utf-16'))\n"
    )
    for restricted in (True, False):
        execute_snippet(modules, code, [image], 0, stdout_limit=100, restricted=restricted)
    from cv_env.sandbox.op_rules import classify_pixel_change
    from PIL import ImageDraw, ImageFont

    a = np.asarray(image)
    classify_pixel_change(a, 255 - a)
    ImageDraw.Draw(image.copy()).text((1, 1), "x", font=ImageFont.load_default())
    image.getexif()
    image.convert("P").quantize(4)
    for name in ("numpy.ma", "numpy.polynomial", "numpy.lib.recfunctions", "PIL.ImageMath", "PIL.ImageDraw2",
                 "unicodedata",
                 "encodings.ascii", "encodings.latin_1", "encodings.utf_16", "encodings.utf_32",
                 "encodings.cp1252", "encodings.unicode_escape", "encodings.raw_unicode_escape"):
        __import__(name)


def zygote_main() -> None:
    """Entry point of the zygote process (`python -c` from the host, control socket on fd argv[1])."""
    from cv_env.sandbox import isolation
    from cv_env.sandbox.proxies import import_allowed_modules

    # Not PR_SET_PDEATHSIG alone: it fires when the host *thread* that started us ends. The
    # zygote also notices the host's end of the control socket closing, or being re-parented
    # (under bubblewrap the host is outside our PID namespace: parent 0, and bubblewrap's
    # --die-with-parent does the rest).
    host_pid = os.getppid()
    isolation.die_with_parent()  # the parent (bubblewrap, or the host's launcher thread) lives as long as the host
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=int(sys.argv[1]))
    import cv2

    cv2.setNumThreads(1)  # a worker may not start threads; cv2's pool must stay empty
    cv2.ocl.setUseOpenCL(False)  # OpenCL would look for devices and files at first use
    modules = import_allowed_modules()
    try:
        import pyseccomp  # noqa: F401  (loads libseccomp while files can still be opened)
    except Exception:
        pass  # no seccomp layer on this machine: `Sandbox.layers` will say so
    _warm_up(modules)
    isolation.become_subreaper()
    devnull = os.open(os.devnull, os.O_RDWR)
    keepers: dict[int, tuple[int, int]] = {}  # worker pid -> (its keeper's pid, a pidfd of the worker)
    ctl.sendall(b'{"ready": true}')
    for fd in (1, 2):  # nobody reads the start-up pipe any more
        os.dup2(devnull, fd)
    ctl.settimeout(1.0)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 65536, 4)
        except socket.timeout:
            _reap(keepers)
            if host_pid > 1 and os.getppid() != host_pid:
                break  # the host died (a child of its may still hold the socket open)
            continue
        except (ConnectionError, OSError):
            msg, fds = b"", []
        _reap(keepers)
        if not msg:
            break  # host closed or died: take every worker with us
        request = json.loads(msg)
        if request["cmd"] == "spawn":
            def worker(namespaces: dict, fds=fds, request=request) -> None:
                _worker_main(fds, devnull, request, modules, namespaces)

            try:
                keeper, pid = isolation.spawn_alone(worker, close_in_keeper=[*fds, ctl.fileno()])
                reply = {"pid": pid}
                keepers[pid] = (keeper, os.pidfd_open(pid))  # kill by pidfd: never a reused pid
            except OSError as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            for fd in fds:
                os.close(fd)
            ctl.sendall(json.dumps(reply).encode())
        elif request["cmd"] == "kill":
            entry = keepers.get(int(request["pid"]))
            if entry is not None:
                _kill(*entry)
            ctl.sendall(b'{"killed": true}')
        elif request["cmd"] == "shutdown":
            break
    for entry in keepers.values():
        _kill(*entry)
    while True:  # keepers, and workers reparented to us once their keeper died
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    os._exit(0)


def _kill(keeper: int, worker: int) -> None:
    """End a worker and its keeper: the worker through its pidfd (never a reused pid), the
    keeper (our child, so its pid is ours until we reap it) by pid."""
    try:
        signal.pidfd_send_signal(worker, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.kill(keeper, signal.SIGKILL)


def _reap(keepers: dict[int, tuple[int, int]]) -> None:
    """Collect exited children (keepers, and orphaned workers) without blocking."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for worker_pid, (keeper, pidfd) in list(keepers.items()):
            if keeper == pid:
                os.close(pidfd)
                del keepers[worker_pid]


# -- worker ----------------------------------------------------------------------------------------


def _module_fingerprint(modules: dict) -> int:
    """Identity of every module-level binding: changes if a snippet rebinds library state."""
    return hash(tuple(hash(tuple(map(id, vars(m).values()))) for m in modules.values()))


def _global_locks_free() -> bool:
    """numpy's global bit generator lock is not held (a snippet that kept it would leave the
    next call's np.random waiting, wherever a second thread ever takes it)."""
    lock = np.random.get_bit_generator().lock  # a threading.RLock: held by this thread or another?
    if getattr(lock, "_is_owned", lambda: False)():
        return False
    if not lock.acquire(blocking=False):
        return False
    lock.release()
    return True


def _worker_main(fds: list[int], devnull: int, config: dict, modules: dict, namespaces: dict) -> None:
    from cv_env.sandbox import isolation
    from cv_env.sandbox.executor import execute_snippet

    isolation.die_with_parent()  # its keeper: a killed keeper takes the worker with it, isolated or not
    sock_fd, mem_fd = isolation.prepare_fds(list(fds), devnull)
    capacity = int(config["capacity"])
    shared = mmap.mmap(mem_fd, capacity)
    sock = socket.socket(fileno=sock_fd)
    restricted = bool(config.get("restricted", True))
    layers = (isolation.lock_down(int(config["memory_mb"]), nofile=5, namespaces=namespaces, mapped=0)
              if config.get("isolate", True) else {})
    fingerprint = _module_fingerprint(modules)
    np_err, np_print = np.geterr(), np.get_printoptions()

    def fresh_state() -> None:
        """Library state a snippet may legitimately change, reset for the next one."""
        seed = int.from_bytes(os.urandom(8), "little")
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
        np.seterr(**np_err)
        np.set_printoptions(**np_print)

    fresh_state()
    send_msg(sock, {"ready": True, "layers": layers})
    decoded: dict[int, tuple] = {}  # offset -> (meta key, pristine image): never shown to snippets
    calls = 0
    while True:
        request = recv_msg(sock)
        if request is None:
            return
        marker = int(request["marker"])  # the host retries a call that never got this far
        shared[marker: marker + 8] = int(request["call"]).to_bytes(8, "little")
        isolation.set_cpu_budget(float(request["timeout_s"]) + 1.0)
        started = time.perf_counter()
        try:
            images = [_input_image(shared, m, decoded) for m in request["images"]]
            response = execute_snippet(
                modules, request["code"], images, int(request["image_index"]),
                stdout_limit=int(request["stdout_limit"]), output=shared,
                output_offset=int(request["output_offset"]),
                max_output_pixels=int(request["max_output_pixels"]),
                max_aspect=float(request["max_aspect"]), memory_mb=int(config["memory_mb"]),
                restricted=restricted,
            )
        except BaseException as exc:  # the worker itself must answer, whatever happened
            response = {"ok": False, "error": f"sandbox worker error: {type(exc).__name__}: {exc}"[:2000],
                        "stdout": "", "ops": []}
        calls += 1
        response["worker_s"] = time.perf_counter() - started
        response["retire"] = calls >= int(config["max_calls"])
        send_msg(sock, response)
        if response["retire"]:
            return
        # Off the critical path, before the next request: a worker that a snippet left unclean
        # (library bindings changed, a global lock kept) says so and exits; the host sees that
        # before it sends the next call and gives that call a fresh worker. Were a check ever to
        # hang, the next call would find its start unmarked and be retried on a fresh worker.
        if not (_global_locks_free() and _module_fingerprint(modules) == fingerprint):
            send_msg(sock, {"retired": True})
            return
        fresh_state()


def _input_image(shared: mmap.mmap, meta: dict, decoded: dict) -> Image.Image:
    """The snippet's own copy of an input image (decoded from shared memory only when new)."""
    key = (meta["mode"], meta["width"], meta["height"], meta["nbytes"])
    cached = decoded.get(meta["offset"])
    if meta.get("fresh", True) or cached is None or cached[0] != key:
        view = memoryview(shared)[meta["offset"]: meta["offset"] + meta["nbytes"]]
        pristine = Image.frombytes(meta["mode"], (meta["width"], meta["height"]), view)
        view.release()
        decoded[meta["offset"]] = (key, pristine)
    else:
        pristine = cached[1]
    return pristine.copy()
