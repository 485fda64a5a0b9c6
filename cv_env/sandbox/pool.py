"""`Sandbox`: a pool of locked-down worker processes that run model-written snippets.

    with Sandbox(workers=2, timeout_s=10.0, memory_mb=1024) as sandbox:
        result = sandbox.run(code, images, image_index=0)

`run` may be called from many threads at once; each call borrows one worker. Images travel
through a shared-memory file per worker (raw pixels, never pickles); the wall-clock timeout is
enforced from outside (the worker is killed and replaced). Every failure is an `ok=False`
`SandboxResult` with a readable message, and the pool keeps serving.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cv_env.frames import Frame
from cv_env.sandbox.worker import recv_msg, send_msg

_ROOT = str(Path(__file__).resolve().parents[2])
_OUTPUT_BYTES_PER_PIXEL = 3


@dataclass
class SandboxResult:
    """What one snippet did. `ops`/`frame`/`source_index` describe `image`; empty on failure."""

    ok: bool
    image: Image.Image | None = None
    stdout: str = ""
    error: str | None = None
    ops: list[dict] = field(default_factory=list)
    frame: Frame | None = None  # maps `image`'s pixels to images[source_index]'s pixels
    source_index: int | None = None
    elapsed_s: float = 0.0


class _Slot:
    """One worker position: its shared-memory file, and the live worker process (if any)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.memfd = os.memfd_create("cv-sandbox", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, capacity)  # pages are only allocated when touched
        self.shared = mmap.mmap(self.memfd, capacity)
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.written: list = []  # (weakref to image, (offset, mode, size)) of the pixels held

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.shared.close()
        os.close(self.memfd)


class Sandbox:
    """A pool of sandboxed workers (see module docstring). Use as a context manager or `close()`.

    Args:
        workers: worker processes (concurrent `run` calls); scale with the machine's cores.
        timeout_s: wall-clock limit per snippet; the worker is killed past it.
        memory_mb: address space a snippet may add to a worker.
        max_stdout: characters of printed output kept (the rest is cut with a note).
        max_output_pixels / max_aspect: bounds on the `result` image.
        max_calls_per_worker: a worker is replaced after this many snippets.
        isolate: apply the OS layers (namespaces, uid drop, rlimits, seccomp) where allowed.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024, *,
                 max_stdout: int = 8192, max_output_pixels: int = 4096 * 4096,
                 max_aspect: float = 200.0, max_calls_per_worker: int = 200,
                 max_input_bytes: int = 64 * 1024 * 1024, max_code_chars: int = 100_000,
                 isolate: bool = True, start_timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64 (numpy and PIL need room), got {memory_mb}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_stdout = int(max_stdout)
        self.max_output_pixels = int(max_output_pixels)
        self.max_aspect = float(max_aspect)
        self.max_calls_per_worker = int(max_calls_per_worker)
        self.max_input_bytes = int(max_input_bytes)
        self.max_code_chars = int(max_code_chars)
        self.isolate = bool(isolate)
        self._closed = False
        self._ctl_lock = threading.Lock()
        self._idle: queue.Queue[_Slot] = queue.Queue()
        self._slots: list[_Slot] = []
        self._start_timeout_s = float(start_timeout_s)
        self._procs: dict = {}  # "zygote": Popen, "ctl": its control socket (replaced on restart)
        self._start_zygote()
        self._worker_layers: dict = {}
        self._capacity = self.max_input_bytes + self.max_output_pixels * _OUTPUT_BYTES_PER_PIXEL
        # Registered first, so a failure below still ends the zygote and its workers.
        self._finalizer = weakref.finalize(self, Sandbox._shutdown, self._procs, self._slots)
        try:
            for _ in range(workers):
                slot = _Slot(self._capacity)
                self._slots.append(slot)
                self._spawn(slot)
                self._idle.put(slot)
        except BaseException:
            self._finalizer()
            raise

    # -- lifecycle --------------------------------------------------------------------------

    def _start_zygote(self) -> None:
        """Start the zygote: a fresh interpreter that imports the libraries once, then forks workers."""
        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A scrubbed environment: no secrets or tokens of the host reach the snippets.
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "OPENCV_LOG_LEVEL": "SILENT"}
        config = json.dumps({"isolate": self.isolate})
        zygote = subprocess.Popen(
            # -I: ignore PYTHON* variables and the user's site; -B: never write bytecode.
            [sys.executable, "-I", "-B", "-c",
             f"import sys; sys.path.insert(0, {_ROOT!r}); "
             "from cv_env.sandbox.worker import zygote_main; zygote_main()",
             str(zygote_end.fileno()), config],
            pass_fds=[zygote_end.fileno()], env=env, cwd="/", stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        zygote_end.close()
        host_end.settimeout(self._start_timeout_s)
        try:
            ready = json.loads(host_end.recv(65536) or b"null")
        except (socket.timeout, ValueError) as exc:
            ready = None
            problem = f"it did not answer ({exc})"
        else:
            problem = "it exited"
        if not ready or not ready.get("ready"):
            zygote.kill()
            _, err = zygote.communicate()
            host_end.close()
            tail = err.decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the sandbox zygote failed to start: {problem}. " + " | ".join(tail))
        zygote.stderr.close()  # the zygote points its stderr at /dev/null once ready
        host_end.settimeout(30.0)
        self._zygote_layers = ready["layers"]
        self._procs.update(zygote=zygote, ctl=host_end)

    def _control(self, request: dict, fds: list[int] = ()) -> dict:
        """One request to the zygote; a dead zygote is replaced once and the request retried."""
        with self._ctl_lock:
            for attempt in range(2):
                try:
                    ctl = self._procs["ctl"]
                    if fds:
                        socket.send_fds(ctl, [json.dumps(request).encode()], list(fds))
                    else:
                        ctl.sendall(json.dumps(request).encode())
                    reply = ctl.recv(65536)
                    if reply:
                        return json.loads(reply)
                except OSError:
                    pass
                if attempt or self._closed or request["cmd"] == "kill":
                    break
                Sandbox._stop_zygote(self._procs)
                self._start_zygote()
        raise RuntimeError("the sandbox zygote is not answering; create a new Sandbox")

    def _spawn(self, slot: _Slot) -> None:
        """Fork a fresh worker for `slot` from the zygote and wait until it is locked down."""
        slot.written = []  # never trust pixels a previous worker could have touched
        host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply = self._control(
                {"cmd": "spawn", "capacity": slot.capacity, "memory_mb": self.memory_mb,
                 "max_calls": self.max_calls_per_worker, "isolate": self.isolate},
                [worker_end.fileno(), slot.memfd],
            )
        finally:
            worker_end.close()
        slot.pid = int(reply["pid"])
        host_end.settimeout(60.0)
        hello = recv_msg(host_end, limit=65536)
        if not hello or not hello.get("ready"):
            host_end.close()
            raise RuntimeError("a sandbox worker failed to start")
        self._worker_layers = hello.get("layers", {})
        slot.sock = host_end

    def _kill(self, slot: _Slot) -> None:
        if slot.pid is not None:
            try:
                self._control({"cmd": "kill", "pid": slot.pid})
            except (OSError, RuntimeError):
                pass
        if slot.sock is not None:
            slot.sock.close()
        slot.sock, slot.pid = None, None

    @staticmethod
    def _stop_zygote(procs: dict) -> None:
        zygote, ctl = procs.get("zygote"), procs.get("ctl")
        if zygote is None:
            return
        try:
            ctl.sendall(b'{"cmd": "shutdown"}')
        except OSError:
            pass
        try:
            zygote.wait(timeout=10)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait()
        ctl.close()

    @staticmethod
    def _shutdown(procs: dict, slots: list[_Slot]) -> None:
        Sandbox._stop_zygote(procs)
        for slot in slots:
            slot.close()

    def close(self) -> None:
        """End every worker and the zygote, after runs in progress finish. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for _ in self._slots:  # wait for in-flight runs (each is bounded by the timeout)
            try:
                self._idle.get(timeout=self.timeout_s + 5.0)
            except queue.Empty:
                break
        self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __copy__(self) -> "Sandbox":
        return self

    def __deepcopy__(self, memo) -> "Sandbox":
        # A Sandbox is a handle on processes: copies (e.g. gymnasium deep-copying an env
        # spec's kwargs) share the one pool instead of failing on its locks.
        return self

    def __reduce__(self):
        raise TypeError("a Sandbox cannot be pickled: it owns processes; create one per process")

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def layers(self) -> dict:
        """Which isolation layers are active (restricted compile, namespaces, uid drop, ...)."""
        return {"restricted_compile": True, "module_proxies": True, "wall_clock_kill": True,
                "env_scrubbed": True, "fresh_state_checked": True,
                **self._zygote_layers, **self._worker_layers}

    @property
    def zygote_pid(self) -> int:
        """Process id of the zygote that forks the workers."""
        return self._procs["zygote"].pid

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [s.pid for s in self._slots if s.pid is not None]

    # -- running snippets ---------------------------------------------------------------------

    def run(self, code: str, images: list[Image.Image], image_index: int = 0) -> SandboxResult:
        """Run `code` with `images` (the snippet sees `images[image_index]` as `image`/`img`).

        Model mistakes (bad code, a wrong `image_index`, a timeout, a crash) come back as
        `ok=False` results; only misuse by the caller (wrong types, a closed Sandbox) raises.
        The images are treated as read-only: a worker keeps the pixels of the same image
        objects between calls, so copy an image before drawing on it in place.
        """
        if self._closed:
            raise RuntimeError("this Sandbox is closed; create a new one")
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if not isinstance(images, (list, tuple)) or not all(isinstance(i, Image.Image) for i in images):
            raise TypeError("images must be a list of PIL images")
        start = time.perf_counter()
        if not images:
            return self._fail("there are no images to work on", start)
        if not isinstance(image_index, int) or not 0 <= image_index < len(images):
            return self._fail(f"image_index {image_index!r} is out of range: there are images "
                              f"0..{len(images) - 1}", start)
        if len(code) > self.max_code_chars:
            return self._fail(f"the code is {len(code)} characters long; the limit is {self.max_code_chars}", start)
        slot = self._acquire()
        try:
            return self._run_on(slot, code, images, image_index, start)
        finally:
            self._idle.put(slot)

    def _acquire(self) -> _Slot:
        """Wait for a free worker; a Sandbox closed meanwhile raises instead of hanging."""
        while True:
            try:
                slot = self._idle.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    raise RuntimeError("this Sandbox was closed while waiting for a worker") from None
                continue
            if self._closed:
                self._idle.put(slot)
                raise RuntimeError("this Sandbox is closed; create a new one")
            return slot

    def _fail(self, message: str, start: float) -> SandboxResult:
        return SandboxResult(ok=False, error=message, elapsed_s=time.perf_counter() - start)

    def _run_on(self, slot: _Slot, code: str, images, image_index: int, start: float) -> SandboxResult:
        for attempt in range(2):
            if slot.sock is not None and select.select([slot.sock], [], [], 0)[0]:
                self._kill(slot)  # gone while idle (EOF or a retirement notice): not this snippet's doing
            if slot.sock is None:
                self._spawn(slot)
            metas = self._write_inputs(slot, images)
            if metas is None:
                return self._fail(f"the images hold more than {self.max_input_bytes} bytes of pixels; "
                                  f"raise max_input_bytes", start)
            request = {"code": code, "images": metas, "image_index": image_index,
                       "timeout_s": self.timeout_s, "stdout_limit": self.max_stdout,
                       "output_offset": self.max_input_bytes, "max_output_pixels": self.max_output_pixels,
                       "max_aspect": self.max_aspect}
            try:
                send_msg(slot.sock, request)
                slot.sock.settimeout(self.timeout_s)
                response = recv_msg(slot.sock, limit=4 * self.max_stdout + 1024 * 1024)
            except socket.timeout:
                self._kill(slot)
                return self._fail(f"TimeoutError: the code ran longer than {self.timeout_s:g} s and was "
                                  f"stopped; avoid long loops and work on whole arrays", start)
            except (OSError, ValueError) as exc:
                self._kill(slot)
                return self._fail(f"the sandbox worker crashed or was killed ({type(exc).__name__}); it "
                                  f"was replaced, run the code again", start)
            if isinstance(response, dict) and response.get("retired"):
                # The previous snippet left the worker unclean; it quit without reading this
                # request, which goes to a fresh worker.
                self._kill(slot)
                continue
            break
        if response is None:
            self._kill(slot)
            return self._fail("the code crashed the sandbox worker (a resource limit or a fatal error in "
                              "a library call); it was replaced", start)
        try:
            result = self._to_result(slot, response, len(images), start)
        except (KeyError, TypeError, ValueError) as exc:
            self._kill(slot)
            return self._fail(f"the sandbox worker sent an invalid answer ({exc}); it was replaced", start)
        if response.get("retire"):
            slot.sock.close()
            slot.sock, slot.pid = None, None
            self._spawn(slot)
        return result

    def _write_inputs(self, slot: _Slot, images) -> list[dict] | None:
        """Put the images' pixels in the slot's shared memory; None if they do not fit.

        An image this slot already holds at the same place (the same object, as in every turn
        of an episode) is not copied again: images passed to `run` are treated as read-only.
        """
        metas, offset, written = [], 0, []
        for i, image in enumerate(images):
            mode = image.mode if image.mode in ("RGB", "L") else "RGB"
            nbytes = image.width * image.height * (3 if mode == "RGB" else 1)
            if offset + nbytes > self.max_input_bytes:
                slot.written = []
                return None
            key = (offset, mode, image.size)
            cached = slot.written[i] if i < len(slot.written) else None
            fresh = not (cached and cached[0]() is image and cached[1] == key)
            if fresh:
                data = (image if image.mode == mode else image.convert(mode)).tobytes()
                slot.shared[offset: offset + nbytes] = data
            written.append((weakref.ref(image), key))
            metas.append({"mode": mode, "width": image.width, "height": image.height,
                          "offset": offset, "nbytes": nbytes, "fresh": fresh})
            offset += (nbytes + 63) // 64 * 64
        slot.written = written
        return metas

    def _to_result(self, slot: _Slot, response: dict, n_images: int, start: float) -> SandboxResult:
        """Check the worker's answer like untrusted input and build the result."""
        ok = response["ok"] is True
        stdout = str(response.get("stdout") or "")[: self.max_stdout + 100]
        error = response.get("error")
        error = None if ok else str(error or "the code failed")[:2000]
        image = frame = source_index = None
        ops: list[dict] = []
        meta = response.get("image")
        if ok and meta is not None:
            mode, w, h = meta["mode"], int(meta["width"]), int(meta["height"])
            bands = {"RGB": 3, "L": 1}[mode]
            nbytes = w * h * bands
            offset = self.max_input_bytes
            if not (0 < w and 0 < h and w * h <= self.max_output_pixels and offset + nbytes <= slot.capacity):
                raise ValueError(f"output size {w}x{h} out of bounds")
            view = memoryview(slot.shared)[offset: offset + nbytes]
            try:
                image = Image.frombytes(mode, (w, h), view)
            finally:
                view.release()
            if response.get("frame"):
                frame = Frame.from_dict(response["frame"])
            si = response.get("source_index")
            source_index = int(si) if si is not None and 0 <= int(si) < n_images else None
            if source_index is None:
                frame = None
            ops = [dict(op) for op in response.get("ops", [])[:64] if isinstance(op, dict) and isinstance(op.get("name"), str)]
        return SandboxResult(ok=ok, image=image, stdout=stdout, error=error, ops=ops, frame=frame,
                             source_index=source_index, elapsed_s=time.perf_counter() - start)
