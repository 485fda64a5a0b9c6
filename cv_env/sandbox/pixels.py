"""What the op rules and the lineage tracker both read: pixels, sizes, and one call's `Step`.

A leaf module (it imports nothing of the sandbox): `op_rules` names ops with these, and `ops`
follows images through an execution with them and with `op_rules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from cv_env.frames import Frame

KEEP = "keep"  # the op moved no pixel: the frame is unchanged


def is_image(obj: Any) -> bool:
    return isinstance(obj, Image.Image)


def is_pixels(obj: Any) -> bool:
    """An image, or an array laid out like one (H x W or H x W x C)."""
    return is_image(obj) or (isinstance(obj, np.ndarray) and obj.ndim in (2, 3) and obj.size > 0)


def size_of(obj: Any) -> tuple[int, int]:
    """(width, height) of an image or image-like array."""
    if is_image(obj):
        return obj.size
    return int(obj.shape[1]), int(obj.shape[0])


def _pixel_getter(obj: Any) -> Callable[[int, int], tuple]:
    if is_image(obj):
        obj.load()  # once: then the core's own getpixel (Image.getpixel loads again on every call)
        core = obj.im

        def get(x, y, _g=core.getpixel):
            v = _g((x, y))
            return v if isinstance(v, tuple) else (v,)
        return get
    def get_arr(x, y, _a=obj):
        v = _a[y, x]
        return tuple(np.atleast_1d(v).tolist())
    return get_arr


def _sample_points(w: int, h: int, n: int = 7) -> list[tuple[int, int]]:
    xs = sorted({min(w - 1, int(w * (i + 0.5) / n)) for i in range(n)} | {0, w - 1})
    ys = sorted({min(h - 1, int(h * (i + 0.5) / n)) for i in range(n)} | {0, h - 1})
    return [(x, y) for x in xs for y in ys]


def same_pixels(a: Any, b: Any) -> bool:
    """True if `a` and `b` show the same pixels (cheap samples first, full check only if needed)."""
    if size_of(a) != size_of(b):
        return False
    try:
        ga, gb = _pixel_getter(a), _pixel_getter(b)
        for x, y in _sample_points(*size_of(a)):
            if ga(x, y) != gb(x, y):
                return False
    except Exception:
        return False
    aa, bb = np.asarray(a), np.asarray(b)
    return aa.shape == bb.shape and bool(np.array_equal(aa, bb))


def verify_geometry(inp: Any, out: Any, step: Frame, tolerance: float = 0.05) -> bool:
    """Check that `out` shows `inp` through `step` (output pixel -> input pixel), by sampling.

    Samples that map outside the input (padding of a crop past the border) are skipped.
    """
    if tuple(step.size) != tuple(size_of(out)):
        return False
    w, h = size_of(inp)
    try:
        gi, go = _pixel_getter(inp), _pixel_getter(out)
    except Exception:
        return False
    compared = mismatched = 0
    for x, y in _sample_points(*size_of(out), n=3):
        u, v = step.point_to_source(x + 0.5, y + 0.5)
        iu, iv = math.floor(u), math.floor(v)
        if not (0 <= iu < w and 0 <= iv < h):
            continue
        compared += 1
        try:
            a, b = gi(iu, iv), go(x, y)
        except Exception:
            return False
        if len(a) != len(b):
            return True  # a mode change came with it (e.g. grayscale); geometry cannot be sampled
        mismatched += a != b
    return compared == 0 or mismatched <= tolerance * compared


@dataclass
class Step:
    """What one call did: named ops, and the geometry (`KEEP`, a Frame out->in, or None = lost)."""

    ops: list[dict]
    geometry: Any = KEEP
    verify: bool = False  # sample-check the geometry against the pixels
    pixel_op: bool = False  # drop the ops if no pixel changed
    classify: bool = False  # name the op from the pixel change (calls no rule knows)
