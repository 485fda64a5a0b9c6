"""The code that runs inside sandbox processes: the zygote, and the workers it forks.

The zygote is started once per `Sandbox` as a fresh, small Python process (never a fork of the
trainer): it imports the allowed modules, warms them up, enters its namespaces and then forks
a worker whenever the host asks, handing it a socket and the shared-memory file the host
passed over SCM_RIGHTS. A worker locks itself down (`isolation.worker_isolation`) and serves
snippets: input pixels come from shared memory, the output's pixels go back into it, and only
small JSON headers cross the socket. Nothing is pickled. A worker retires (and is replaced)
after `max_calls`, or as soon as a snippet changed module state it should not have.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import socket
import struct
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 8 * 1024 * 1024


def send_msg(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket, limit: int = MAX_MESSAGE) -> Any:
    """One length-prefixed JSON message, or None at end of stream. Oversized is an error."""
    head = recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    (n,) = _HEADER.unpack(head)
    if n > limit:
        raise ValueError(f"message of {n} bytes exceeds the {limit}-byte limit")
    body = recv_exact(sock, n)
    if body is None:
        return None
    return json.loads(body)


# -- zygote --------------------------------------------------------------------------------------


def _warm_up(modules: dict) -> None:
    """Run representative snippets once so lazy initialisation happens before forking."""
    from cv_env.sandbox.executor import execute_snippet

    image = Image.new("RGB", (64, 48), (10, 20, 30))
    code = (
        "import numpy as np\nfrom PIL import Image, ImageOps, ImageEnhance, ImageFilter\nimport cv2\n"
        "a = np.array(image)[4:40, 2:50]\nb = cv2.GaussianBlur(cv2.rotate(a, cv2.ROTATE_180), (3, 3), 0)\n"
        "c = ImageEnhance.Contrast(Image.fromarray(b)).enhance(1.3).filter(ImageFilter.SHARPEN)\n"
        "result = ImageOps.grayscale(c.rotate(90, expand=True).crop((1, 1, 20, 20)))\nprint(result.size)\n"
    )
    execute_snippet(modules, code, [image], 0, stdout_limit=100)
    # Lazy imports inside libraries must happen here: a worker cannot open files.
    from cv_env.sandbox.op_rules import classify_pixel_change
    from PIL import ImageDraw, ImageFont

    a = np.asarray(image)
    classify_pixel_change(a, 255 - a)
    ImageDraw.Draw(image.copy()).text((1, 1), "x", font=ImageFont.load_default())
    for name in ("numpy.ma", "numpy.polynomial", "numpy.lib.recfunctions", "PIL.ImageMath"):
        __import__(name)


def zygote_main() -> None:
    """Entry point of the zygote process (`python -c` from the host, control socket on fd 3)."""
    from cv_env.sandbox import isolation
    from cv_env.sandbox.proxies import import_allowed_modules

    # Not PR_SET_PDEATHSIG: it fires when the host *thread* that started us ends. The zygote
    # instead notices the host's end of the control socket closing, or being re-parented.
    host_pid = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    import cv2

    cv2.setNumThreads(1)  # a worker may not start threads; cv2's pool must stay empty
    modules = import_allowed_modules()
    isolation.preload_seccomp()
    _warm_up(modules)
    layers = isolation.zygote_isolation() if config.get("isolate", True) else {}
    devnull = os.open(os.devnull, os.O_RDWR)
    children: set[int] = set()
    ctl.sendall(json.dumps({"ready": True, "layers": layers}).encode())
    for fd in (1, 2):  # nobody reads the start-up pipe any more
        os.dup2(devnull, fd)
    ctl.settimeout(1.0)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 65536, 4)
        except socket.timeout:
            _reap(children)
            if os.getppid() != host_pid:
                break  # the host died (a child of its may still hold the socket open)
            continue
        except (ConnectionError, OSError):
            msg, fds = b"", []
        _reap(children)
        if not msg:
            break  # host closed or died: take every worker with us
        request = json.loads(msg)
        if request["cmd"] == "spawn":
            pid = os.fork()
            if pid == 0:
                try:
                    ctl.close()
                    _worker_main(fds, devnull, request, modules)
                finally:
                    os._exit(0)
            for fd in fds:
                os.close(fd)
            children.add(pid)
            ctl.sendall(json.dumps({"pid": pid}).encode())
        elif request["cmd"] == "kill":
            pid = int(request["pid"])
            if pid in children:  # never signal a pid we already reaped (it may be reused)
                os.kill(pid, signal.SIGKILL)
            ctl.sendall(b'{"killed": true}')
        elif request["cmd"] == "shutdown":
            break
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    os._exit(0)


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


# -- worker ----------------------------------------------------------------------------------------


def _module_fingerprint(modules: dict) -> int:
    """Identity of every module-level binding: changes if a snippet rebinds library state."""
    return hash(tuple(hash(tuple(map(id, vars(m).values()))) for m in modules.values()))


def _worker_main(fds: list[int], devnull: int, config: dict, modules: dict) -> None:
    from cv_env.sandbox import isolation
    from cv_env.sandbox.executor import execute_snippet

    sock_fd, mem_fd = isolation.prepare_fds(list(fds), devnull)
    capacity = int(config["capacity"])
    shared = mmap.mmap(mem_fd, capacity)
    sock = socket.socket(fileno=sock_fd)
    layers = isolation.worker_isolation(int(config["memory_mb"]), nofile=5) if config.get("isolate", True) else {}
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
        # Off the critical path, before the next request: a worker whose library bindings the
        # snippet changed says so and exits (the host forks a clean one and resends), and
        # per-call state is reset.
        if _module_fingerprint(modules) != fingerprint:
            send_msg(sock, {"retired": True, "reason": "library state changed"})
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
