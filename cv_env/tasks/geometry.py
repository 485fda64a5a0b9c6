"""Orientation transforms on images, their composition, and the frames they induce.

The five orientation transforms and the identity are six of the eight symmetries of a
rectangle (the dihedral group D4). Composing two of them (a wrapped task that was already
rotated) is again a symmetry; `compose_orientation` returns it as the shortest list of named
transforms, so `transforms` stays a faithful record of what was done to the original.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from cv_env.frames import Frame
from cv_env.task import ORIENT_OPS

ORIENT_ORDER: tuple[str, ...] = ("rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical")

_TRANSPOSE = {
    "rotate_90": Image.Transpose.ROTATE_90,  # same pixels as rotate(90, expand=True)
    "rotate_180": Image.Transpose.ROTATE_180,
    "rotate_270": Image.Transpose.ROTATE_270,
    "flip_horizontal": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip_vertical": Image.Transpose.FLIP_TOP_BOTTOM,
}

# Each transform as a 2x2 integer matrix acting on direction vectors (x right, y down).
_MATRIX = {
    "rotate_90": ((0, 1), (-1, 0)),  # counter-clockwise on screen: right -> up
    "rotate_180": ((-1, 0), (0, -1)),
    "rotate_270": ((0, -1), (1, 0)),
    "flip_horizontal": ((-1, 0), (0, 1)),
    "flip_vertical": ((1, 0), (0, -1)),
}
_IDENTITY = ((1, 0), (0, 1))


def _matmul(a, b):
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(2)) for j in range(2)) for i in range(2))


def orientation_matrix(transforms: Sequence[str]):
    """The direction matrix of applying `transforms` in order (non-orientation names ignored)."""
    m = _IDENTITY
    for name in transforms:
        if name in _MATRIX:
            m = _matmul(_MATRIX[name], m)
    return m


def _canonical() -> dict:
    table = {_IDENTITY: ()}
    for name in ORIENT_ORDER:
        table.setdefault(_MATRIX[name], (name,))
    for first in ("flip_horizontal",):  # the two diagonal mirrors need two ops
        for second in ("rotate_90", "rotate_270"):
            table.setdefault(orientation_matrix([first, second]), (first, second))
    assert len(table) == 8
    return table


_CANONICAL = _canonical()


def compose_orientation(transforms: Sequence[str]) -> list[str]:
    """The shortest list of named transforms equal to applying `transforms` in order.

    `["rotate_90", "rotate_90"]` -> `["rotate_180"]`; `["flip_horizontal", "flip_horizontal"]`
    -> `[]`. Names that are not orientation transforms (`crop`) are dropped.
    """
    return list(_CANONICAL[orientation_matrix(transforms)])


def apply_transform(image: Image.Image, name: str) -> Image.Image:
    """Apply one orientation transform (`rotate_90` = `image.rotate(90, expand=True)`)."""
    if name not in _TRANSPOSE:
        raise ValueError(f"unknown orientation transform {name!r}; expected one of {ORIENT_ORDER}")
    return image.transpose(_TRANSPOSE[name])


def apply_transforms(image: Image.Image, transforms: Sequence[str]) -> Image.Image:
    """Apply the orientation transforms in order; `crop` (a task marker, not a pixel op) is skipped."""
    for name in transforms:
        if name in ORIENT_OPS:
            image = apply_transform(image, name)
    return image


def frame_of(transforms: Sequence[str], original_size: Sequence[int]) -> Frame:
    """Frame of the shown image relative to the original, for the orientation part of `transforms`.

    `frame.box_from_source(box)` maps a box drawn on the original into the shown pixels.
    """
    frame = Frame.identity(original_size)
    for name in transforms:
        if name in ORIENT_OPS:
            frame = frame.apply_op(name)
    return frame


def int_box(box: Sequence[float]) -> list[int]:
    """A box with integer corners (rotations and flips of an integer box stay integer)."""
    return [int(round(v)) for v in box]
