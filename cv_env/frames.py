"""Frames: how an image's pixel coordinates map to the coordinates of the image it came from.

Every image in an episode carries a `Frame`. Inputs have the identity frame; an image derived
by crops, rotations, flips and resizes has the composition of those steps, so a box drawn on a
rotated crop of a resized copy maps back to the original with `frame.box_to_source(box)`.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i+1) x [j, j+1), the
top-left corner of the image is (0, 0) and the bottom-right corner is (width, height).
Rotations are counter-clockwise degrees, as `PIL.Image.rotate(d, expand=True)`.

A frame is an affine map `source = M @ (x, y, 1)`, with M a 2x3 matrix. It is small, immutable
and serialisable (`to_dict` / `from_dict`), so it crosses process boundaries as plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

Matrix = tuple[tuple[float, float, float], tuple[float, float, float]]
_IDENTITY: Matrix = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def _compose(outer: Matrix, inner: Matrix) -> Matrix:
    """outer ∘ inner for 2x3 affine matrices (apply `inner` first)."""
    (a, b, c), (d, e, f) = outer
    (g, h, i), (j, k, l) = inner
    return (
        (a * g + b * j, a * h + b * k, a * i + b * l + c),
        (d * g + e * j, d * h + e * k, d * i + e * l + f),
    )


def _apply(m: Matrix, x: float, y: float) -> tuple[float, float]:
    return m[0][0] * x + m[0][1] * y + m[0][2], m[1][0] * x + m[1][1] * y + m[1][2]


def _invert(m: Matrix) -> Matrix:
    (a, b, c), (d, e, f) = m
    det = a * e - b * d
    if abs(det) < 1e-12:
        raise ValueError("frame is not invertible (a zero-size resize?)")
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return ((ia, ib, -(ia * c + ib * f)), (id_, ie, -(id_ * c + ie * f)))


def _bounding_box(points: Iterable[tuple[float, float]]) -> list[float]:
    xs, ys = zip(*points)
    return [min(xs), min(ys), max(xs), max(ys)]


@dataclass(frozen=True)
class Frame:
    """An image's size and the affine map from its pixels to its source image's pixels."""

    size: tuple[int, int]  # (width, height) of this image
    source_size: tuple[int, int]  # (width, height) of the source image
    matrix: Matrix = _IDENTITY  # source = matrix @ (x, y, 1)

    @classmethod
    def identity(cls, size: Sequence[int]) -> "Frame":
        """The frame of an input image: its pixels are the source's pixels."""
        w, h = int(size[0]), int(size[1])
        return cls((w, h), (w, h), _IDENTITY)

    # -- deriving the frame of a new image from this one ------------------------------------

    def _derive(self, new_size: tuple[int, int], new_to_self: Matrix) -> "Frame":
        return Frame(new_size, self.source_size, _compose(self.matrix, new_to_self))

    def crop(self, box: Sequence[float]) -> "Frame":
        """Frame of `image.crop(box)` (box = [x1, y1, x2, y2] in this image's pixels)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        size = (int(round(x2 - x1)), int(round(y2 - y1)))
        return self._derive(size, ((1.0, 0.0, x1), (0.0, 1.0, y1)))

    def rotate(self, degrees: int) -> "Frame":
        """Frame of `image.rotate(degrees, expand=True)` for a multiple of 90 (counter-clockwise)."""
        d = int(degrees) % 360
        w, h = self.size
        if d == 0:
            return self
        if d == 90:  # new (x, y) shows old (w - y, x)
            return self._derive((h, w), ((0.0, -1.0, float(w)), (1.0, 0.0, 0.0)))
        if d == 180:  # new (x, y) shows old (w - x, h - y)
            return self._derive((w, h), ((-1.0, 0.0, float(w)), (0.0, -1.0, float(h))))
        if d == 270:  # new (x, y) shows old (y, h - x)
            return self._derive((h, w), ((0.0, 1.0, 0.0), (-1.0, 0.0, float(h))))
        raise ValueError(f"only multiples of 90 degrees have an exact frame, got {degrees}")

    def flip_horizontal(self) -> "Frame":
        """Frame of a left-right mirror."""
        w, h = self.size
        return self._derive((w, h), ((-1.0, 0.0, float(w)), (0.0, 1.0, 0.0)))

    def flip_vertical(self) -> "Frame":
        """Frame of a top-bottom mirror."""
        w, h = self.size
        return self._derive((w, h), ((1.0, 0.0, 0.0), (0.0, -1.0, float(h))))

    def resize(self, new_size: Sequence[int]) -> "Frame":
        """Frame of `image.resize(new_size)`: corners map to corners."""
        nw, nh = int(new_size[0]), int(new_size[1])
        if nw <= 0 or nh <= 0:
            raise ValueError(f"resize to a non-positive size {new_size}")
        w, h = self.size
        return self._derive((nw, nh), ((w / nw, 0.0, 0.0), (0.0, h / nh, 0.0)))

    def apply_op(self, name: str, **params) -> "Frame":
        """Frame after the op `name` from the shared vocabulary (`rotate_90`, `crop`, ...).

        Ops that do not move pixels (`contrast`, `blur`, ...) keep the frame.
        """
        if name.startswith("rotate_"):
            return self.rotate(int(name.split("_")[1]))
        if name == "flip_horizontal":
            return self.flip_horizontal()
        if name == "flip_vertical":
            return self.flip_vertical()
        if name == "crop":
            return self.crop(params["box"])
        if name == "resize":
            return self.resize(params["size"])
        return self

    def then(self, child: "Frame") -> "Frame":
        """Chain: `child` maps an image derived from this one into this one's pixels.

        The result maps the derived image's pixels into this frame's source.
        """
        if tuple(child.source_size) != tuple(self.size):
            raise ValueError(
                f"cannot chain frames: child's source is {child.source_size}, "
                f"this image is {self.size}"
            )
        return Frame(child.size, self.source_size, _compose(self.matrix, child.matrix))

    # -- mapping coordinates ------------------------------------------------------------------

    def point_to_source(self, x: float, y: float) -> tuple[float, float]:
        """Map a point of this image to the source image."""
        return _apply(self.matrix, x, y)

    def point_from_source(self, x: float, y: float) -> tuple[float, float]:
        """Map a point of the source image into this image."""
        return _apply(_invert(self.matrix), x, y)

    def box_to_source(self, box: Sequence[float]) -> list[float]:
        """Map [x1, y1, x2, y2] of this image to the (axis-aligned) box it covers in the source."""
        x1, y1, x2, y2 = (float(v) for v in box)
        return _bounding_box(_apply(self.matrix, x, y) for x, y in ((x1, y1), (x2, y1), (x1, y2), (x2, y2)))

    def box_from_source(self, box: Sequence[float]) -> list[float]:
        """Map [x1, y1, x2, y2] of the source image into this image's pixels."""
        inv = _invert(self.matrix)
        x1, y1, x2, y2 = (float(v) for v in box)
        return _bounding_box(_apply(inv, x, y) for x, y in ((x1, y1), (x2, y1), (x1, y2), (x2, y2)))

    # -- plain-data form ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"size": list(self.size), "source_size": list(self.source_size),
                "matrix": [list(row) for row in self.matrix]}

    @classmethod
    def from_dict(cls, data: dict) -> "Frame":
        m = data["matrix"]
        return cls(tuple(data["size"]), tuple(data["source_size"]),
                   (tuple(float(v) for v in m[0]), tuple(float(v) for v in m[1])))
