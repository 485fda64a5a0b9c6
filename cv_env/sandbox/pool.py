"""`Sandbox`: a pool of locked-down worker processes that run model-written snippets.

    with Sandbox(workers=2, timeout_s=10.0, memory_mb=1024) as sandbox:
        result = sandbox.run(code, images, image_index=0)

`run` may be called from many threads at once; each call borrows one worker. Images travel
through a shared-memory file per worker (raw pixels, never pickles), renewed for every new
worker. The host believes nothing a worker says: a reply must arrive whole before one deadline
(the wall-clock kill), is parsed with bounds (`reply.py`), and every rotation, flip or crop it
claims is checked against the pixels on this side (`verify.py`) before it reaches the result.
A worker that misbehaves is killed and replaced; a call that finds its worker dead before it
started is retried once on a fresh one. Every failure is an `ok=False` `SandboxResult` with a
readable message, and the pool keeps serving.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import secrets
import select
import socket
import subprocess
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cv_env.frames import Frame
from cv_env.sandbox import isolation
from cv_env.sandbox.reply import OUTPUT_LAYOUTS, ReplyError, parse_reply
from cv_env.sandbox.verify import ClaimError, verify_claims
from cv_env.sandbox.wire import WireError, recv_msg, send_msg
from cv_env.task import CORE_OPS

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # .../cv_env
_OUTPUT_BYTES_PER_PIXEL = max(OUTPUT_LAYOUTS.values())
_MARKER_BYTES = 64  # after the pixels: where a worker writes the number of the call it began


@dataclass
class SandboxResult:
    """What one snippet did. `ops`/`frame`/`source_index` describe `image`; empty on failure.

    A successful call may have no `image` (the snippet assigned no `result`): its output is
    then `stdout`. `ops` and `frame` are what the host verified against the pixels.
    """

    ok: bool
    image: Image.Image | None = None
    stdout: str = ""
    error: str | None = None
    ops: list[dict] = field(default_factory=list)
    frame: Frame | None = None  # maps `image`'s pixels to images[source_index]'s pixels
    source_index: int | None = None
    elapsed_s: float = 0.0


class _Slot:
    """One worker position: its socket, its worker's pid, and its shared-memory file."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.memfd: int | None = None
        self.shared: mmap.mmap | None = None
        self.sock: socket.socket | None = None
        self.pid: int | None = None  # in the zygote's PID namespace
        self.host_pid: int | None = None
        self.written: list = []  # (weakref to image, (offset, mode, size)) of the pixels held
        self.calls = 0  # numbers the calls; a worker writes the one it begins at `marker`

    @property
    def marker(self) -> int:
        return self.capacity - _MARKER_BYTES

    def began(self, call: int) -> bool:
        """Did the worker begin call number `call` (before it died or went silent)?"""
        return self.shared is not None and int.from_bytes(self.shared[self.marker: self.marker + 8], "little") == call

    def renew_memory(self) -> None:
        """A new, zero-filled shared-memory file (a new worker sees nothing of an earlier one)."""
        self.release_memory()
        self.memfd = os.memfd_create("cv-sandbox", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.capacity)  # pages are only allocated when touched
        self.shared = mmap.mmap(self.memfd, self.capacity)
        self.written = []

    def release_memory(self) -> None:
        if self.shared is not None:
            self.shared.close()
            os.close(self.memfd)
        self.shared, self.memfd, self.written = None, None, []

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.release_memory()


class _HostPixels:
    """The host's own copy of each input image's pixels, as written to shared memory.

    Claims are checked against these, never against shared memory, which a worker can write.
    Entries go when their image is garbage-collected, or when the cache passes `max_bytes`.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[int, tuple[weakref.ref, str, np.ndarray]] = OrderedDict()
        self._bytes = 0

    def get(self, image: Image.Image) -> tuple[str, np.ndarray]:
        key = id(image)
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry[0]() is image:
                self._items.move_to_end(key)
                return entry[1], entry[2]
        mode = image.mode if image.mode in ("RGB", "L") else "RGB"
        pixels = np.asarray(image if image.mode == mode else image.convert(mode))
        with self._lock:
            self._drop(key)
            self._items[key] = (weakref.ref(image, lambda _, key=key: self.forget(key)), mode, pixels)
            self._bytes += pixels.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._drop(next(iter(self._items)))
        return mode, pixels

    def forget(self, key: int) -> None:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry[0]() is None:
                self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2].nbytes


class _Buffers:
    """The host's own buffers for output pixels, reused from call to call: a big output costs
    one copy out of shared memory and no freshly faulted-in pages. Keeps at most `keep`
    buffers of at most `max_bytes` each."""

    def __init__(self, keep: int, max_bytes: int = 16 << 20):
        self.keep, self.max_bytes = keep, max_bytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def copy(self, shared: mmap.mmap, offset: int, nbytes: int) -> np.ndarray:
        """A private copy of `shared[offset: offset + nbytes]`, which a worker can still write:
        whatever the host checks or shows is read from the copy."""
        buffer = None
        with self._lock:
            for i, candidate in enumerate(self._free):
                if candidate.size >= nbytes:
                    buffer = self._free.pop(i)
                    break
        if buffer is None:
            buffer = np.empty(nbytes, np.uint8)
        data = buffer[:nbytes]
        view = memoryview(shared)[offset: offset + nbytes]
        try:
            memoryview(data)[:] = view
        finally:
            view.release()
        return data

    def give_back(self, data: np.ndarray) -> None:
        buffer = data if data.base is None else data.base
        if buffer.size <= self.max_bytes:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buffer)


class _Launcher:
    """Starts zygote processes from one thread that lives as long as the host process.

    A parent-death signal (bubblewrap's --die-with-parent, the zygote's own) fires when the
    *thread* that started the process ends: started from here, a sandbox lives exactly as long
    as its host process, whichever thread made it (a short-lived thread included).
    """

    _lock = threading.Lock()
    _requests: "queue.Queue | None" = None
    _pid: int | None = None

    @classmethod
    def popen(cls, *args, **kwargs) -> subprocess.Popen:
        with cls._lock:
            if cls._requests is None or cls._pid != os.getpid():  # first use, or a forked host
                cls._requests, cls._pid = queue.Queue(), os.getpid()
                threading.Thread(target=cls._serve, args=(cls._requests,), name="cv-sandbox-launcher",
                                 daemon=True).start()
            done: queue.Queue = queue.Queue()
            cls._requests.put((done, args, kwargs))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    @staticmethod
    def _serve(requests: queue.Queue) -> None:
        while True:
            done, args, kwargs = requests.get()
            try:
                done.put((True, subprocess.Popen(*args, **kwargs)))
            except BaseException as exc:  # handed to the caller's thread
                done.put((False, exc))


class Sandbox:
    """A pool of sandboxed workers (see module docstring). Use as a context manager or `close()`.

    Args:
        workers: worker processes (concurrent `run` calls); scale with the machine's cores.
        timeout_s: wall-clock limit per snippet; the worker is killed past it.
        memory_mb: address space a snippet may add to a worker.
        max_stdout: characters of printed output kept (the rest is cut with a note).
        max_output_pixels / max_aspect: bounds on the `result` image.
        max_calls_per_worker: a worker is replaced after this many snippets. 1 gives every call
            a fresh worker, so no call can find another's data even in a worker's own memory.
        isolate: apply the OS layer (empty root, namespaces, uid/capability drop, rlimits,
            seccomp allow-list) where the machine allows; `layers` says what took effect.
        restricted: the Python layer (restricted compilation, guarded attributes, calls and
            values, module proxies). `False` runs snippets as plain Python with every builtin,
            each on a fresh worker: only for testing what the OS layer holds on its own.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024, *,
                 max_stdout: int = 8192, max_output_pixels: int = 4096 * 4096,
                 max_aspect: float = 200.0, max_calls_per_worker: int = 200,
                 max_input_bytes: int = 64 * 1024 * 1024, max_code_chars: int = 100_000,
                 isolate: bool = True, restricted: bool = True, start_timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64 (numpy and PIL need room), got {memory_mb}")
        if max_calls_per_worker < 1:
            raise ValueError(f"max_calls_per_worker must be at least 1, got {max_calls_per_worker}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_stdout = int(max_stdout)
        self.max_output_pixels = int(max_output_pixels)
        self.max_aspect = float(max_aspect)
        self.max_calls_per_worker = int(max_calls_per_worker) if restricted else 1
        self.max_input_bytes = int(max_input_bytes)
        self.max_code_chars = int(max_code_chars)
        self.isolate = bool(isolate)
        self.restricted = bool(restricted)
        self._closed = False
        self._ctl_lock = threading.Lock()
        self._idle: queue.Queue[_Slot] = queue.Queue()
        self._slots: list[_Slot] = []
        self._start_timeout_s = float(start_timeout_s)
        self._procs: dict = {}  # "zygote": Popen, "ctl": its control socket (replaced on restart)
        self._zygote_layers: dict = {}
        self._worker_layers: dict = {}
        self._pixels = _HostPixels(max_bytes=4 * self.max_input_bytes)
        self._buffers = _Buffers(keep=2 * workers)
        self._rngs = threading.local()
        self._capacity = self.max_input_bytes + self.max_output_pixels * _OUTPUT_BYTES_PER_PIXEL + _MARKER_BYTES
        self._start_zygote()
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
        if self.isolate:
            _warn_if_incomplete(self.layers)

    # -- lifecycle --------------------------------------------------------------------------

    def _start_zygote(self) -> None:
        """Start the zygote under bubblewrap (an empty root), or without it where it cannot run."""
        bwrap = isolation.bwrap_path() if self.isolate else None
        if bwrap is not None:
            try:
                self._launch_zygote(bwrap)
                return
            except RuntimeError as exc:
                warnings.warn(f"sandbox: bubblewrap could not start the zygote ({exc}); workers run without "
                              "an empty root (see Sandbox.layers)", RuntimeWarning, stacklevel=3)
        self._launch_zygote(None)

    def _launch_zygote(self, bwrap: str | None) -> None:
        """A fresh interpreter that imports the libraries once, then forks workers on request."""
        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sites = isolation.site_dirs()
        if bwrap is not None:
            root, launcher = isolation.PACKAGE_ROOT, [bwrap, *isolation.bwrap_arguments(_PACKAGE_DIR, sites), "--"]
        else:
            root, launcher = os.path.dirname(_PACKAGE_DIR), []
        # `cv_env` is made a bare package: the zygote needs cv_env.sandbox and cv_env.frames,
        # not gymnasium and the task suite that `cv_env/__init__.py` brings.
        bootstrap = (f"import sys, types; sys.path[:0] = {sites!r}; pkg = types.ModuleType('cv_env'); "
                     f"pkg.__path__ = [{root + '/cv_env'!r}]; sys.modules['cv_env'] = pkg; "
                     "from cv_env.sandbox.worker import zygote_main; zygote_main()")
        # A scrubbed environment: no secrets or tokens of the host reach the snippets.
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "OPENCV_LOG_LEVEL": "SILENT",
               # Image-sized buffers come from the heap and are reused, not mapped afresh (and
               # page-faulted in) for every array.
               "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"}
        zygote = _Launcher.popen(
            # -I: ignore PYTHON* variables and the user's site; -B: never write bytecode.
            [*launcher, isolation.interpreter(), "-I", "-B", "-c", bootstrap, str(zygote_end.fileno())],
            pass_fds=[zygote_end.fileno()], env=env, cwd="/", stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        zygote_end.close()
        host_end.settimeout(self._start_timeout_s)
        try:
            ready = json.loads(host_end.recv(65536) or b"null")
        except (socket.timeout, ValueError) as exc:
            ready, problem = None, f"it did not answer ({exc})"
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
        self._zygote_layers = {"empty_root": bwrap is not None}
        self._procs.update(zygote=zygote, ctl=host_end, bwrap=bwrap is not None)

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
        slot.renew_memory()
        host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply = self._control(
                {"cmd": "spawn", "capacity": slot.capacity, "memory_mb": self.memory_mb,
                 "max_calls": self.max_calls_per_worker, "isolate": self.isolate, "restricted": self.restricted},
                [worker_end.fileno(), slot.memfd],
            )
        finally:
            worker_end.close()
        if "pid" not in reply:
            host_end.close()
            raise RuntimeError(f"the sandbox zygote could not start a worker: {reply.get('error')}")
        slot.pid, slot.host_pid = int(reply["pid"]), None
        try:
            hello = recv_msg(host_end, limit=65536, deadline=time.monotonic() + 60.0)
        except (OSError, TimeoutError, WireError):
            hello = None
        if not isinstance(hello, dict) or not hello.get("ready"):
            host_end.close()
            self._kill_pid(slot.pid)
            slot.pid = None
            raise RuntimeError("a sandbox worker failed to start")
        self._worker_layers = hello.get("layers", {})
        slot.sock = host_end

    def _kill_pid(self, pid: int) -> None:
        try:
            self._control({"cmd": "kill", "pid": pid})
        except (OSError, RuntimeError):
            pass

    def _kill(self, slot: _Slot) -> None:
        if slot.pid is not None:
            self._kill_pid(slot.pid)
        if slot.sock is not None:
            slot.sock.close()
        slot.sock, slot.pid, slot.host_pid = None, None, None

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
        """Which layers are active: the Python layer, the OS layer's pieces, the host's checks."""
        return {"restricted_compile": self.restricted, "module_proxies": self.restricted,
                "wall_clock_kill": True, "env_scrubbed": True, "fresh_state_checked": True,
                "host_verifies_claims": True, **self._zygote_layers, **self._worker_layers}

    @property
    def workers(self) -> int:
        """How many worker processes serve calls (how many `run` calls proceed at once)."""
        return len(self._slots)

    @property
    def zygote_pid(self) -> int:
        """Process id (on the host) of the zygote that forks the workers."""
        zygote = self._procs["zygote"]
        if not self._procs.get("bwrap"):
            return zygote.pid
        inner = [pid for pid, ns in _descendants(zygote.pid).items() if ns[1:] == [1]]
        return inner[0] if inner else zygote.pid

    @property
    def worker_pids(self) -> list[int]:
        """Process ids (on the host) of the live workers (for monitoring and tests)."""
        slots = [s for s in self._slots if s.pid is not None]
        if self._procs.get("bwrap") and any(s.host_pid is None for s in slots):
            by_ns_pid = {ns[1]: pid for pid, ns in _descendants(self._procs["zygote"].pid).items() if len(ns) > 2}
            for slot in slots:
                slot.host_pid = by_ns_pid.get(slot.pid, slot.host_pid)
        return [(s.host_pid if self._procs.get("bwrap") else s.pid) for s in slots
                if not self._procs.get("bwrap") or s.host_pid is not None]

    # -- running snippets ---------------------------------------------------------------------

    def run(self, code: str, images: list[Image.Image], image_index: int = 0) -> SandboxResult:
        """Run `code` with `images` (the snippet sees `images[image_index]` as `image`/`img`).

        Model mistakes (bad code, a wrong `image_index`, a timeout, a crash) come back as
        `ok=False` results; only misuse by the caller (wrong types, a closed Sandbox) raises,
        and a RuntimeError when the sandbox itself is gone (its processes cannot be started).
        The images are treated as read-only: the host keeps their pixels between calls, so
        copy an image before drawing on it in place.
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
            result, output = self._run_on(slot, code, images, image_index, start)
        finally:
            self._idle.put(slot)
        if output is not None:  # decoded once the worker is free: it can take the next call meanwhile
            layout, size, data = output
            result.image = Image.frombytes("L" if layout == "L" else "RGB", size, data, "raw", layout)
            self._buffers.give_back(data)
        result.elapsed_s = time.perf_counter() - start
        return result

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

    def _run_on(self, slot: _Slot, code: str, images, image_index: int,
                start: float) -> tuple[SandboxResult, tuple | None]:
        """Run the call on `slot`'s worker: the checked result, and its output image's pixels
        (layout, size, the host's private copy) for the caller to decode."""
        for attempt in range(2):
            if slot.sock is not None and select.select([slot.sock], [], [], 0)[0]:
                self._kill(slot)  # gone while idle (end of stream): not this snippet's doing
            if slot.sock is None:
                self._spawn(slot)
            inputs = self._write_inputs(slot, images)
            if inputs is None:
                return self._fail(f"the images hold more than {self.max_input_bytes} bytes of pixels; "
                                  f"raise max_input_bytes", start), None
            metas, pixels = inputs
            slot.calls += 1
            request = {"code": code, "images": metas, "image_index": image_index, "call": slot.calls,
                       "marker": slot.marker, "timeout_s": self.timeout_s, "stdout_limit": self.max_stdout,
                       "output_offset": self.max_input_bytes, "max_output_pixels": self.max_output_pixels,
                       "max_aspect": self.max_aspect}
            problem = None
            try:
                send_msg(slot.sock, request)
                message = recv_msg(slot.sock, limit=4 * self.max_stdout + 1024 * 1024,
                                   deadline=time.monotonic() + self.timeout_s)
            except TimeoutError:
                message, problem = None, "timeout"
            except (OSError, WireError) as exc:
                message, problem = None, exc
            if isinstance(message, dict) and message.get("retired") is True and not slot.began(slot.calls):
                message = None  # it retired (left unclean) before it read this call: a fresh one runs it
            if message is not None:
                break
            began = slot.began(slot.calls)
            self._kill(slot)
            if not began and attempt == 0:
                continue  # the worker was dead or stuck before it began: not this call's doing
            if problem == "timeout":
                return self._fail(f"TimeoutError: the code ran longer than {self.timeout_s:g} s and was "
                                  f"stopped; avoid long loops and work on whole arrays", start), None
            if problem is not None:
                return self._fail(f"the sandbox worker sent an invalid reply ({problem}); it was replaced",
                                  start), None
            return self._fail("the code crashed the sandbox worker (a resource limit or a fatal error in "
                              "a library call); it was replaced", start), None
        try:
            result, output, retire = self._to_result(slot, message, pixels)
        except (ReplyError, ClaimError) as exc:
            self._kill(slot)
            return self._fail(f"the sandbox rejected the worker's report ({exc}); the worker was replaced",
                              start), None
        if retire:
            self._kill(slot)  # it asked to go (call budget spent, or a snippet left it unclean)
            self._spawn(slot)
        return result, output

    def _write_inputs(self, slot: _Slot, images) -> tuple[list[dict], list[np.ndarray]] | None:
        """Put the images' pixels in the slot's shared memory; None if they do not fit.

        An image this slot already holds at the same place (the same object, as in every turn
        of an episode) is not copied again: images passed to `run` are treated as read-only.
        Returns the worker's image descriptions and the host's own copy of each one's pixels.
        """
        metas, arrays, offset, written = [], [], 0, []
        for i, image in enumerate(images):
            mode = image.mode if image.mode in ("RGB", "L") else "RGB"
            nbytes = image.width * image.height * (3 if mode == "RGB" else 1)
            if offset + nbytes > self.max_input_bytes:
                slot.written = []
                return None
            mode, pixels = self._pixels.get(image)
            key = (offset, mode, image.size)
            cached = slot.written[i] if i < len(slot.written) else None
            fresh = not (cached and cached[0]() is image and cached[1] == key)
            if fresh:
                slot.shared[offset: offset + nbytes] = pixels.reshape(-1).data
            written.append((weakref.ref(image), key))
            arrays.append(pixels)
            metas.append({"mode": mode, "width": image.width, "height": image.height,
                          "offset": offset, "nbytes": nbytes, "fresh": fresh})
            offset += (nbytes + 63) // 64 * 64
        slot.written = written
        return metas, arrays

    def _rng(self) -> np.random.Generator:
        """This thread's generator of the positions where claims are checked (unpredictable)."""
        rng = getattr(self._rngs, "rng", None)
        if rng is None:
            rng = self._rngs.rng = np.random.default_rng(secrets.randbits(128))
        return rng

    def _to_result(self, slot: _Slot, message, pixels: list[np.ndarray]) -> tuple[SandboxResult, tuple | None, bool]:
        """Parse and verify the worker's reply (ReplyError / ClaimError when it is forged).

        Returns the result, its output's pixels (layout, size, the host's private copy: checked
        there, so the worker cannot change them afterwards) and whether the worker asked to retire.
        """
        reply = parse_reply(message, n_images=len(pixels), max_stdout=self.max_stdout,
                            max_output_pixels=self.max_output_pixels, max_aspect=self.max_aspect,
                            output_offset=self.max_input_bytes, capacity=slot.marker)
        result = SandboxResult(ok=reply.ok, stdout=reply.stdout, error=reply.error)
        if reply.image is None:
            return result, None, reply.retire
        layout, w, h = reply.image
        data = self._buffers.copy(slot.shared, self.max_input_bytes, w * h * OUTPUT_LAYOUTS[layout])
        try:
            if reply.source_index is None:
                result.ops = [op for op in reply.ops if op["name"] not in CORE_OPS]
            else:
                seen = data.reshape(h, w) if layout == "L" else data.reshape(h, w, -1)[:, :, :3]
                verified = verify_claims(pixels[reply.source_index], seen, reply.frame, reply.ops, self._rng())
                result.ops, result.frame, result.source_index = verified.ops, verified.frame, reply.source_index
        except ClaimError:
            self._buffers.give_back(data)
            raise
        return result, (layout, (w, h), data), reply.retire


_OS_PIECES = (("empty root (bubblewrap)", "empty_root"), ("PID namespace per worker", "pid_namespace"),
              ("seccomp allow-list (libseccomp)", "seccomp"), ("uid or capability drop", "identity"))
_warned: set[tuple[str, ...]] = set()


def _warn_if_incomplete(layers: dict) -> None:
    """Say once per process which pieces of the OS layer this machine did not allow."""
    missing = tuple(what for what, key in _OS_PIECES if not layers.get(key))
    if missing and missing not in _warned:
        _warned.add(missing)
        warnings.warn("sandbox: this machine does not allow every piece of the OS layer; missing: "
                      + ", ".join(missing) + " (see Sandbox.layers and the README's sandbox section)",
                      RuntimeWarning, stacklevel=3)


def _descendants(root: int) -> dict[int, list[int]]:
    """Host pids of `root`'s descendants, each with its pids in every nested PID namespace."""
    found: dict[int, list[int]] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
            with open(f"/proc/{pid}/status") as f:
                line = next((ln for ln in f if ln.startswith("NSpid:")), "NSpid:")
            if pid != root:
                found[pid] = [int(v) for v in line.split()[1:]]
        except (OSError, ValueError):
            continue
    return found
