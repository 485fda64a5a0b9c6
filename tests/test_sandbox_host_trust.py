"""Red team, the host: a worker that lies, stalls or breaks must not be believed or waited for.

A snippet that escaped the Python layer can write anything on the worker's socket (fd 3) and
into its shared memory (fd 4). These tests forge such replies (with the restricted layer off,
so the forging code runs; with it on, the same code is refused at once) and check that nothing
forged is believed: every lie is an `ok=False` result that pays nothing, the worker is replaced,
and the pool serves the next call correctly.
"""

from __future__ import annotations

import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest

import cv_env  # noqa: F401
from cv_env import Task
from cv_env.sandbox.wire import WireError, parse_json
from redteam import INPUT_BYTES, image, layered_sandbox  # noqa: F401  (fixtures)

OFFSET = INPUT_BYTES  # where a worker's output pixels go
FORGE = f"""
import json, os, struct, time
def send(data):
    if not isinstance(data, bytes):
        data = json.dumps(data).encode()
    os.write(3, struct.pack("!I", len(data)) + data)
def put_pixels(data):  # straight into the worker's shared memory (fd 4), with libc's mmap
    import ctypes
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    address = libc.mmap(None, os.fstat(4).st_size, 3, 1, 4, 0)  # PROT_READ|PROT_WRITE, MAP_SHARED
    ctypes.memmove(address + {OFFSET}, data, len(data))
def reply(mode, width, height, frame, ops, source_index=0):
    send({{"ok": True, "error": None, "stdout": "", "ops": ops, "source_index": source_index, "retire": False,
          "image": {{"mode": mode, "width": width, "height": height, "offset": {OFFSET},
                    "nbytes": width * height * {{"RGB": 3, "RGBX": 4, "L": 1}}[mode]}}, "frame": frame}})
def crop_frame(box, source_size):
    x1, y1, x2, y2 = box
    return {{"size": [x2 - x1, y2 - y1], "source_size": list(source_size), "matrix": [[1, 0, x1], [0, 1, y1]]}}
"""


@pytest.fixture(scope="module")
def sandbox(layered_sandbox):
    return layered_sandbox


def assert_pool_healthy(sandbox, image):
    for _ in range(3):
        r = sandbox.run("result = image.crop((10, 10, 30, 20))", [image])
        assert r.ok, r.error
        assert np.array_equal(np.asarray(r.image), np.asarray(image)[10:20, 10:30])
        if sandbox.restricted:  # plain Python (the OS-layer test mode) has no op tracking
            assert r.ops == [{"name": "crop", "box": [10, 10, 30, 20], "source_box": [10.0, 10.0, 30.0, 20.0]}]


def forge(sandbox, image, code):
    r = sandbox.run(FORGE + code + "\ntime.sleep(60)\n", [image])
    if sandbox.restricted:
        assert not r.ok and "import" in r.error  # the Python layer refuses it before anything is forged
    return r


LIES = {
    # The original finding: a 1x1 output claiming a crop with a 640x480 frame was paid in full.
    "crop of a 1x1 image with a 640x480 frame": (
        "put_pixels(bytes(3))\n"
        "reply('RGB', 1, 1, {'size': [640, 480], 'source_size': [64, 48], 'matrix': [[1, 0, 0], [0, 1, 0]]},"
        " [{'name': 'crop', 'box': [10, 10, 30, 30], 'source_box': [10, 10, 30, 30]}])", "rejected"),
    "a crop whose pixels are not the source's": (
        "put_pixels(bytes(20 * 20 * 3))\n"
        "reply('RGB', 20, 20, crop_frame([10, 10, 30, 30], (64, 48)), [{'name': 'crop', 'box': [10, 10, 30, 30]}])",
        "rejected"),
    "a rotation that did not happen": (
        "import numpy\nput_pixels(numpy.asarray(image.resize((48, 64))).tobytes())\n"
        "reply('RGB', 48, 64, {'size': [48, 64], 'source_size': [64, 48], 'matrix': [[0, -1, 64], [1, 0, 0]]},"
        " [{'name': 'rotate_90'}])", "rejected"),
    "ops that do not compose to the frame": (
        "import numpy\nput_pixels(numpy.asarray(image).tobytes())\n"
        "reply('RGB', 64, 48, {'size': [64, 48], 'source_size': [64, 48], 'matrix': [[1, 0, 0], [0, 1, 0]]},"
        " [{'name': 'rotate_180'}, {'name': 'flip_vertical'}])", "rejected"),
    "a frame for another source size": (
        "import numpy\nput_pixels(numpy.asarray(image).tobytes())\n"
        "reply('RGB', 64, 48, {'size': [64, 48], 'source_size': [640, 480], 'matrix': [[1, 0, 0], [0, 1, 0]]},"
        " [{'name': 'crop', 'box': [0, 0, 64, 48]}])", "rejected"),
    "a rotation that did not happen, in Pillow's 4-byte layout": (
        "put_pixels(image.resize((48, 64)).tobytes('raw', 'RGBX'))\n"
        "reply('RGBX', 48, 64, {'size': [48, 64], 'source_size': [64, 48], 'matrix': [[0, -1, 64], [1, 0, 0]]},"
        " [{'name': 'rotate_90'}])", "rejected"),
    "a 4-byte layout whose size does not add up": (
        "send({'ok': True, 'image': {'mode': 'RGBX', 'width': 4, 'height': 4, 'offset': %d, 'nbytes': 48}})" % OFFSET,
        "rejected"),
    "an op name no rule makes": (
        "put_pixels(bytes(3))\nreply('RGB', 1, 1, None, [{'name': 'free_reward'}], None)", "rejected"),
    "output outside shared memory": (
        "send({'ok': True, 'image': {'mode': 'RGB', 'width': 4, 'height': 4, 'offset': 0, 'nbytes': 48}})",
        "rejected"),
    "a non-finite number": ("send(b'{\"ok\": true, \"worker_s\": 1e999}')", "invalid reply"),
    "NaN": ("send(b'{\"ok\": true, \"worker_s\": NaN}')", "invalid reply"),
    "deep nesting": ("send(b'[' * 200000)", "invalid reply"),
    "a 4 GB length": ("os.write(3, struct.pack('!I', 0xFFFFFFFF))", "invalid reply"),
    "not JSON": ("send(b'\\xff\\xfe garbage')", "invalid reply"),
    "wrong types": ("send({'ok': 'yes', 'stdout': 7})", "rejected"),
}


@pytest.mark.parametrize("code,needle", list(LIES.values()), ids=list(LIES))
def test_a_forged_reply_is_rejected_and_the_worker_replaced(sandbox, image, code, needle):
    r = forge(sandbox, image, code)
    if not sandbox.restricted:
        assert not r.ok and needle in r.error, r.error
        assert r.image is None and r.ops == [] and r.frame is None
    assert_pool_healthy(sandbox, image)


def test_a_true_report_is_believed_even_from_forging_code(sandbox, image):
    """The check rejects lies, not unusual code: a hand-written reply that tells the truth passes,
    and its crop box is the one the host computes."""
    code = ("import numpy\nput_pixels(numpy.ascontiguousarray(numpy.asarray(image)[8:40, 16:48]).tobytes())\n"
            "reply('RGB', 32, 32, crop_frame([16, 8, 48, 40], (64, 48)), [{'name': 'crop', 'box': [16, 8, 48, 40], "
            "'source_box': [0, 0, 64, 48]}])")
    r = forge(sandbox, image, code)
    if not sandbox.restricted:
        assert r.ok, r.error
        assert r.ops == [{"name": "crop", "box": [16, 8, 48, 40], "source_box": [16.0, 8.0, 48.0, 40.0]}]
    assert_pool_healthy(sandbox, image)


def test_a_true_report_in_pillows_layout_is_believed(sandbox, image):
    """Images come back in Pillow's own 4-byte layout (no repacking): a true report in it passes,
    and the host reads the RGB bands, not the padding byte."""
    code = ("import numpy\npixels = numpy.zeros((64, 48, 4), numpy.uint8)\n"
            "pixels[:, :, :3] = numpy.rot90(numpy.asarray(image))\npixels[:, :, 3] = 77\n"
            "put_pixels(pixels.tobytes())\n"
            "reply('RGBX', 48, 64, {'size': [48, 64], 'source_size': [64, 48], 'matrix': [[0, -1, 64], [1, 0, 0]]},"
            " [{'name': 'rotate_90'}])")
    r = forge(sandbox, image, code)
    if not sandbox.restricted:
        assert r.ok, r.error
        assert r.image.mode == "RGB" and np.array_equal(np.asarray(r.image), np.rot90(np.asarray(image)))
        assert r.ops == [{"name": "rotate_90"}] and r.frame is not None
    assert_pool_healthy(sandbox, image)


def test_a_dripping_worker_cannot_hold_the_host_past_the_deadline(sandbox, image):
    code = "os.write(3, struct.pack('!I', 1000))\nfor _ in range(100):\n    os.write(3, b' ')\n    time.sleep(0.4)"
    start = time.monotonic()
    r = forge(sandbox, image, code)
    elapsed = time.monotonic() - start
    assert elapsed < sandbox.timeout_s + 1.0
    if not sandbox.restricted:
        assert not r.ok and "TimeoutError" in r.error
    assert_pool_healthy(sandbox, image)


def test_a_forged_crop_is_not_paid_by_the_env(sandbox, image):
    task = Task(id="forged", images=[image], question="What is in the box?", answer="cat", answer_type="text",
                category="crop", transforms=["crop"], bbox=[10, 10, 30, 30])
    assert "crop" in task.required_ops
    env = gym.make("CodeVision-v0", tasks=[task], sandbox=sandbox, disable_env_checker=True)
    env.reset(seed=0)
    code = ("put_pixels(bytes(3))\nreply('RGB', 1, 1, {'size': [640, 480], 'source_size': [64, 48], "
            "'matrix': [[1, 0, 0], [0, 1, 0]]}, [{'name': 'crop', 'box': [10, 10, 30, 30], "
            "'source_box': [10, 10, 30, 30]}])\ntime.sleep(60)")
    _, reward_call, *_, info = env.step({"code": FORGE + code})
    assert info["tool_ok"] is False
    _, reward_answer, terminated, _, info = env.step("<think>a cat</think><answer>cat</answer>")
    assert terminated and info["correct"]
    components = info["reward_components"]
    assert components["mandatory"] == 0.0
    assert reward_call + reward_answer < 0.5  # the forged crop paid 2.2 before the host checked it
    env.close()


@pytest.mark.parametrize("poison", [
    "np.random.get_bit_generator().lock.acquire()",
    "np.random.default_rng().bit_generator.lock.acquire()",
    "import numpy\nnumpy.random.get_bit_generator().lock.acquire()",
])
def test_a_held_global_lock_never_times_out_the_next_call(sandbox, image, poison):
    for _ in range(2):  # every worker
        sandbox.run(poison, [image])
    for _ in range(4):
        start = time.monotonic()
        r = sandbox.run("print(np.random.rand(2).shape)", [image])
        assert r.ok, r.error
        assert time.monotonic() - start < sandbox.timeout_s


def test_a_call_that_finds_its_worker_dead_is_retried_on_a_fresh_one(sandbox, image):
    for _ in range(6):
        for pid in sandbox.worker_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # killed in an earlier round, and not yet noticed by its slot
        r = sandbox.run("result = image.crop((10, 10, 30, 20))", [image])  # no pause: the worker may be dying
        assert r.ok, r.error
    assert_pool_healthy(sandbox, image)


def test_parse_json_bounds():
    assert parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for bad in (b"1e999", b"-1e999", b"NaN", b"Infinity", b"[" * 100000, b"\xff", b"1" * 5000):
        with pytest.raises(WireError):
            parse_json(bad)
