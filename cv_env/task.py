"""`Task`: one episode's image(s), question and hidden ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

AnswerType = Literal["text", "number", "choice", "math"]
ANSWER_TYPES: tuple[str, ...] = ("text", "number", "choice", "math")

# Transform / op names shared by task sources (what the dataset did) and the sandbox
# (what the model's code did). Rotations are counter-clockwise degrees, as
# `PIL.Image.rotate(d, expand=True)`.
ROTATIONS: tuple[str, ...] = ("rotate_90", "rotate_180", "rotate_270")
FLIPS: tuple[str, ...] = ("flip_horizontal", "flip_vertical")
ORIENT_OPS: frozenset[str] = frozenset(ROTATIONS + FLIPS)
CORE_OPS: frozenset[str] = ORIENT_OPS | {"crop"}


def inverse_op(name: str) -> str:
    """The op that undoes transform `name` (`rotate_d` -> `rotate_{360-d}`; others self-inverse)."""
    if name in ROTATIONS:
        return f"rotate_{360 - int(name.split('_')[1])}"
    return name


@dataclass
class Task:
    """One episode: image(s) + question, with the ground truth the environment hides.

    `bbox` is `[x1, y1, x2, y2]` in the pixels of `images[0]` as shown (after `transforms`),
    or None. `transforms` lists what was applied to the original image to make the shown one,
    in order, using the op vocabulary above.
    """

    id: str
    images: list[Image.Image]
    question: str
    answer: str
    answer_type: AnswerType = "text"
    category: str = "general"
    transforms: list[str] = field(default_factory=list)
    bbox: list[float] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(f"task {self.id!r} has no images: a task needs at least one")
        for i, image in enumerate(self.images):
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"task {self.id!r}: images[{i}] is {type(image).__name__}, expected a PIL image"
                )
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"task {self.id!r}: answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}"
            )
        if self.bbox is not None:
            if len(self.bbox) != 4:
                raise ValueError(f"task {self.id!r}: bbox must be [x1, y1, x2, y2], got {self.bbox}")
            self.bbox = [float(v) for v in self.bbox]
        self.answer = str(self.answer)
        self.transforms = list(self.transforms)

    @property
    def required_ops(self) -> list[str]:
        """E in the paper: the ops that undo this task's transforms (crop maps to itself)."""
        ops = [inverse_op(t) for t in self.transforms]
        return list(dict.fromkeys(ops))
