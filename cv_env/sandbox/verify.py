"""The host's check of a worker's claims against the pixels: the worker is not believed.

With its output image a worker reports the input it derives from, a frame (output pixel ->
that input's pixel) and the ops that made it. The reward pays for orientation ops and crop
boxes, so those are checked here, on the trusted side, before anything is recorded:

* the claimed orientation ops must compose to the rotation/flip the frame itself encodes;
* the output must show the source through the frame, tested at positions the host picks at
  random (a forger cannot know them): a chain of exact geometric ops (rotations, flips,
  crops, padding) must reproduce the source's pixels; a chain that also changed the pixels
  (contrast, resize, ...) must correlate with the source through the frame at least as well
  as through any other rotation/flip of the same output;
* a crop's box is recomputed from the verified frame (what the output actually covers), never
  taken from the worker.

A claim the pixels contradict is a lie (`ClaimError`: the call fails and the worker is
replaced). A claim they cannot settle (no frame, or a pixel change such as edge detection that
leaves nothing to compare) is not paid: the output is still shown, but records no rotation,
flip or crop, and no frame, so later calls on it cannot be traced back either. Other op names
(contrast, blur, ...) move no geometry and are recorded as reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cv_env.frames import Frame
from cv_env.task import CORE_OPS, ORIENT_OPS

SAMPLES = 2048  # positions tested per output (all of them for smaller outputs)
MIN_SAMPLES = 16  # fewer inside the source: the frame cannot be tested
EXACT_MATCH = 0.9  # share of positions an exact geometric chain must reproduce
MIN_CORRELATION = 0.5  # |correlation| a pixel-changing chain needs through its frame
CONTRADICTION = 0.3  # another rotation/flip fitting this much better makes the claim a lie

# Ops that move pixels without changing them: the output equals the source through the frame.
_EXACT_OPS = ORIENT_OPS | {"crop", "pad"}
# Ops whose geometry cannot be told from their name alone (any angle, any affine map).
_FREE_GEOMETRY = {"rotate", "warp"}
# The linear part (output -> source) of each orientation op, as PIL.Image.rotate(d, expand=True).
_ORIENTATION = {
    "rotate_90": ((0, -1), (1, 0)), "rotate_180": ((-1, 0), (0, -1)), "rotate_270": ((0, 1), (-1, 0)),
    "flip_horizontal": ((-1, 0), (0, 1)), "flip_vertical": ((1, 0), (0, -1)),
}


class ClaimError(ValueError):
    """The worker's report contradicts the pixels (or itself): a forged result."""


@dataclass(frozen=True)
class Verified:
    """What the host records for one output: its ops and its frame (None: untraceable)."""

    ops: list[dict]
    frame: Frame | None


def luminance(pixels: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of uint8 RGB pixels (..., 3), or the values themselves for one band."""
    if pixels.ndim >= 2 and pixels.shape[-1] == 3:
        return pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return pixels.astype(np.float32)


def _sign(v: float) -> int:
    return 1 if v > 0 else -1


def _signed_permutation(matrix) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The rotation/flip of a frame's linear part (a scaled signed permutation), or None."""
    (a, b, _), (c, d, _) = matrix
    scale = max(abs(a), abs(b), abs(c), abs(d))
    if scale == 0:
        return None
    tol = 1e-6 * scale
    if abs(b) <= tol and abs(c) <= tol and abs(a) > tol and abs(d) > tol:
        return (_sign(a), 0), (0, _sign(d))
    if abs(a) <= tol and abs(d) <= tol and abs(b) > tol and abs(c) > tol:
        return (0, _sign(b)), (_sign(c), 0)
    return None


def _compose(ops: list[dict]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The net orientation of a chain of ops (each one's output -> input map, in order)."""
    (a, b), (c, d) = (1, 0), (0, 1)
    for op in ops:
        if op["name"] in _ORIENTATION:
            (e, f), (g, h) = _ORIENTATION[op["name"]]
            (a, b), (c, d) = (a * e + b * g, a * f + b * h), (c * e + d * g, c * f + d * h)
    return (a, b), (c, d)


def _output_symmetries(size: tuple[int, int]) -> list[Frame]:
    """Frames of every rotation/flip of an output that keeps its size (identity first)."""
    identity = Frame.identity(size)
    frames = [identity, identity.rotate(180), identity.flip_horizontal(), identity.flip_vertical()]
    if size[0] == size[1]:
        frames += [identity.rotate(90), identity.rotate(270), identity.rotate(90).flip_vertical(),
                   identity.rotate(90).flip_horizontal()]
    return frames


def _sample(frame: Frame, output: np.ndarray, source: np.ndarray, xs: np.ndarray, ys: np.ndarray):
    """Luminance of the output and of the source at the sampled output positions that map
    inside the source (only those pixels are read: the images stay as they are)."""
    (a, b, c), (d, e, f) = frame.matrix
    cx, cy = xs + 0.5, ys + 0.5
    u = np.floor(a * cx + b * cy + c)
    v = np.floor(d * cx + e * cy + f)
    h, w = source.shape[:2]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    seen = (ys * output.shape[1] + xs)[inside]
    expected = (v[inside] * w + u[inside]).astype(np.intp)
    return luminance(_gather(output, seen)), luminance(_gather(source, expected))


def _gather(pixels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The pixels at flat positions `index`, one row each, read without copying the image
    (a view such as the RGB bands of 4-byte pixels included)."""
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h * w, -1) if pixels.ndim == 3 else pixels.reshape(h * w)
    return np.take(rows, index, axis=0) if rows.flags.c_contiguous else rows[index]


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """|Pearson correlation|, 0 when either side is flat (nothing to compare)."""
    if len(x) < MIN_SAMPLES:
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return 0.0 if denominator < 1e-6 * len(x) else abs(float((x * y).sum()) / denominator)


def verify_claims(source: np.ndarray, output: np.ndarray, frame: Frame | None, ops: list[dict],
                  rng: np.random.Generator) -> Verified:
    """Check a worker's `frame` and `ops` for `output` (H x W [x 3] uint8) against `source`.

    Returns what to record; raises `ClaimError` when the claims are contradicted.
    """
    core = [op for op in ops if op["name"] in CORE_OPS]
    others = [op for op in ops if op["name"] not in CORE_OPS]
    if frame is None:
        return Verified(others, None)
    h, w = output.shape[:2]
    if tuple(frame.size) != (w, h):
        raise ClaimError(f"the frame is for a {frame.size[0]}x{frame.size[1]} image, the output is {w}x{h}")
    if tuple(frame.source_size) != (source.shape[1], source.shape[0]):
        raise ClaimError("the frame's source size is not the source image's size")
    (a, b, _), (c, d, _) = frame.matrix
    if abs(a * d - b * c) < 1e-9:
        raise ClaimError("the frame is not invertible")
    orientation = _signed_permutation(frame.matrix)
    free = any(op["name"] in _FREE_GEOMETRY for op in ops)
    if orientation is not None and not free and _compose(core) != orientation:
        raise ClaimError("the claimed rotations/flips do not compose to the frame's orientation")
    if not core and frame == Frame.identity((w, h)):
        return Verified(others, frame)  # claims no geometry at all: nothing the reward pays for

    n = w * h
    ys, xs = np.divmod(np.arange(n) if n <= SAMPLES else rng.integers(0, n, SAMPLES), w)  # output positions
    seen, expected = _sample(frame, output, source, xs, ys)
    if len(seen) < MIN_SAMPLES:
        return Verified(others, None)  # the output shows too little of the source to test
    exact = all(op["name"] in _EXACT_OPS for op in ops)
    if exact:
        if np.count_nonzero(np.abs(seen - expected) <= 1.0) < EXACT_MATCH * len(seen):
            raise ClaimError("the output does not show the source through the claimed rotations/flips/crops")
    else:
        claimed = _correlation(seen, expected)
        best_other = max((_correlation(*_sample(frame.then(g), output, source, xs, ys))
                          for g in _output_symmetries((w, h))[1:]), default=0.0)
        if best_other - claimed > CONTRADICTION and best_other >= MIN_CORRELATION:
            raise ClaimError("the output fits another rotation/flip of the source better than the claimed one")
        if claimed < MIN_CORRELATION or claimed < best_other - 0.05:
            return Verified(others, None)  # inconclusive: shown, never paid
    if free and orientation is None:  # turned by an odd angle in the end: no 90-degree credit
        ops = [op for op in ops if op["name"] not in ORIENT_OPS]
    return Verified(_with_crop_boxes(ops, frame, source.shape), frame)


def _with_crop_boxes(ops: list[dict], frame: Frame, source_shape) -> list[dict]:
    """Each crop's `source_box` recomputed from the verified frame (clipped to the source);
    a "crop" whose output still covers the whole source is no crop."""
    h, w = source_shape[:2]
    x1, y1, x2, y2 = frame.box_to_source([0, 0, frame.size[0], frame.size[1]])
    box = [round(max(0.0, x1), 3), round(max(0.0, y1), 3), round(min(float(w), x2), 3), round(min(float(h), y2), 3)]
    whole = box[0] <= 0.5 and box[1] <= 0.5 and box[2] >= w - 0.5 and box[3] >= h - 0.5
    recorded = []
    for op in ops:
        if op["name"] == "crop":
            if whole:
                continue
            op = {**op, "source_box": box}
        recorded.append(op)
    return recorded
