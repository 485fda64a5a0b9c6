"""A worker's reply, read as hostile input: exact fields, types and bounds, or `ReplyError`.

The worker's own code builds these replies, but a snippet that broke out of the Python layer
can write anything on the socket. Nothing here is believed because it parsed: `parse_reply`
only makes sure it is well-formed and in range; what it claims about pixels is checked next
(`verify.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cv_env.frames import Frame

# Every op name the worker's rules can produce (`op_rules.py`); anything else is forged.
OP_NAMES = frozenset("""
rotate_90 rotate_180 rotate_270 flip_horizontal flip_vertical crop pad resize rotate warp
grayscale threshold draw blend point invert equalize autocontrast posterize solarize colorize
blur denoise edges morphology sharpen filter emboss quantize brightness contrast color sharpness
""".split())
# How an output's pixels lie in shared memory, and their bytes per pixel: packed RGB (arrays),
# Pillow's own 4-byte RGB (images: copied as they are, no packing) and one band.
OUTPUT_LAYOUTS = {"RGB": 3, "RGBX": 4, "L": 1}
_FIELDS = {"ok", "error", "stdout", "ops", "image", "frame", "source_index", "retire", "worker_s"}
_OP_FIELDS = {"name", "box", "source_box", "size", "angle"}
_MAX_OPS = 64
_MAX_COORDINATE = 1e7
_SURROGATES = re.compile("[\ud800-\udfff]")


class ReplyError(ValueError):
    """The worker's reply is malformed or out of bounds."""


@dataclass(frozen=True)
class Reply:
    """A well-formed reply; `image` is the output's (layout, width, height) in shared memory."""

    ok: bool
    stdout: str
    error: str | None
    image: tuple[str, int, int] | None
    frame: Frame | None
    source_index: int | None
    ops: list[dict]
    retire: bool


def clean_text(text: str, limit: int) -> str:
    """Cut to `limit` characters and replace lone surrogates (not UTF-8-encodable) by U+FFFD."""
    return _SURROGATES.sub("\ufffd", text[:limit])


def _int(value: Any, low: int, high: float, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ReplyError(f"{what} must be an integer in [{low}, {high:g}], got {value!r:.40}")
    return value


def _number(value: Any, what: str) -> int | float:
    """A finite, bounded JSON number (an int stays an int)."""
    if type(value) not in (int, float) or not abs(value) <= _MAX_COORDINATE:  # NaN fails too
        raise ReplyError(f"{what} must be a finite number of magnitude at most {_MAX_COORDINATE:g}")
    return value


def _numbers(value: Any, n: int, what: str) -> list:
    if type(value) is not list or len(value) != n:
        raise ReplyError(f"{what} must be a list of {n} numbers")
    return [_number(v, what) for v in value]


def _op(value: Any) -> dict:
    if type(value) is not dict or not set(value) <= _OP_FIELDS or value.get("name") not in OP_NAMES:
        raise ReplyError(f"an op must be a known op name with known fields, got {str(value)[:80]}")
    op: dict[str, Any] = {"name": value["name"]}
    for key, n in (("box", 4), ("source_box", 4), ("size", 2)):
        if key in value:
            op[key] = _numbers(value[key], n, f"an op's {key}")
    if "angle" in value:
        op["angle"] = _number(value["angle"], "an op's angle")
    return op


def _frame(value: Any, size: tuple[int, int]) -> Frame:
    if type(value) is not dict or set(value) != {"size", "source_size", "matrix"}:
        raise ReplyError("a frame must have exactly size, source_size and matrix")
    frame_size, source_size = (tuple(_int(v, 1, _MAX_COORDINATE, f"a frame's {key}")
                                     for v in _numbers(value[key], 2, f"a frame's {key}"))
                               for key in ("size", "source_size"))
    matrix = value["matrix"]
    if type(matrix) is not list or len(matrix) != 2:
        raise ReplyError("a frame's matrix must have two rows")
    rows = tuple(tuple(float(v) for v in _numbers(row, 3, "a frame's matrix row")) for row in matrix)
    if frame_size != size:
        raise ReplyError(f"the frame is for a {frame_size[0]}x{frame_size[1]} image, the output is {size[0]}x{size[1]}")
    return Frame(frame_size, source_size, rows)


def parse_reply(message: Any, *, n_images: int, max_stdout: int, max_output_pixels: int,
                max_aspect: float, output_offset: int, capacity: int) -> Reply:
    """Check a worker's reply field by field; raise `ReplyError` for anything out of bounds."""
    if type(message) is not dict or not set(message) <= _FIELDS or type(message.get("ok")) is not bool:
        raise ReplyError("a reply must be an object with a boolean 'ok' and known fields only")
    stdout, error = message.get("stdout", ""), message.get("error")
    if type(stdout) is not str or (error is not None and type(error) is not str):
        raise ReplyError("'stdout' must be a string and 'error' a string or null")
    retire = message.get("retire", False)
    if type(retire) is not bool:
        raise ReplyError("'retire' must be a boolean")
    stdout = clean_text(stdout, max_stdout + 200)
    if not message["ok"]:
        return Reply(False, stdout, clean_text(error or "the code failed", 2000), None, None, None, [], retire)
    image = frame = source_index = None
    ops: list[dict] = []
    meta = message.get("image")
    if meta is not None:
        if type(meta) is not dict or meta.get("mode") not in OUTPUT_LAYOUTS:
            raise ReplyError(f"an output image's layout must be one of {sorted(OUTPUT_LAYOUTS)}")
        w = _int(meta.get("width"), 1, max_output_pixels, "the output width")
        h = _int(meta.get("height"), 1, max_output_pixels, "the output height")
        bands = OUTPUT_LAYOUTS[meta["mode"]]
        if w * h > max_output_pixels or max(w, h) > max_aspect * min(w, h):
            raise ReplyError(f"an output of {w}x{h} pixels is out of bounds")
        if meta.get("offset") != output_offset or meta.get("nbytes") != w * h * bands \
                or output_offset + w * h * bands > capacity:
            raise ReplyError("the output's place in shared memory is not where the host put it")
        image = (meta["mode"], w, h)
        if message.get("frame") is not None:
            frame = _frame(message["frame"], (w, h))
        if message.get("source_index") is not None:
            source_index = _int(message["source_index"], 0, n_images - 1, "source_index")
        raw_ops = message.get("ops", [])
        if type(raw_ops) is not list or len(raw_ops) > _MAX_OPS:
            raise ReplyError(f"'ops' must be a list of at most {_MAX_OPS} ops")
        ops = [_op(op) for op in raw_ops]
        if source_index is None:
            frame = None
    return Reply(True, stdout, None, image, frame, source_index, ops, retire)
