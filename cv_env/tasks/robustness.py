"""`RobustnessWrapper`: any task source, seen under each orientation transform (and optionally
natural corruptions) — the paper's robustness table (original + 5 transforms, and the average)
for any VQA set.

Item `i` of the wrapper is variant `i % V` of base task `i // V`, so a task's variants sit
next to each other. Each variant records what was done: the orientation is composed with the
base task's own transforms (a base shown `rotate_90` and wrapped `rotate_90` becomes
`rotate_180`), the bbox is mapped into the new frame exactly, and
`extra["robustness"] = {"variant", "base_id"}` lets an evaluator build the table.
"""

from __future__ import annotations

import zlib
from typing import Sequence

from cv_env.frames import Frame
from cv_env.task import Task
from cv_env.tasks.base import TaskSource
from cv_env.tasks.corruption import CORRUPTIONS, corrupt
from cv_env.tasks.geometry import ORIENT_ORDER, apply_transform, compose_orientation, int_box
from cv_env.tasks.orientation import render_orientation_diagnostic

ORIGINAL = "original"
ROBUSTNESS_VARIANTS: tuple[str, ...] = (ORIGINAL,) + ORIENT_ORDER  # the table's six columns


class RobustnessWrapper(TaskSource):
    """Yield every base task as the original plus each of `transforms` and `corruptions`.

    Args:
        source: any `TaskSource` (synthetic, parquet, a list source, ...).
        transforms: orientation transforms to apply (default: all five).
        corruptions: natural corruptions to add as further variants (`dark`, `low_contrast`,
            `noise`, `blur`); none by default.
        severity: corruption strength, 0..2.
        include_original: keep the untouched task as the first variant.

    The transform applies to the task's transformed image (`extra["transform_image"]`, else
    image 0). Tasks whose answer *is* the orientation (`extra["orientation_is_answer"]`, the
    orientation diagnostic) are relabelled: their answer becomes the letter of the composed
    transform, and when the composition is not one of the five (it cancels out, or is a
    diagonal mirror) a generated task is re-rendered from its parameters with the variant's
    transform applied to the upright original.
    """

    def __init__(self, source: TaskSource, transforms: Sequence[str] = ORIENT_ORDER,
                 corruptions: Sequence[str] = (), severity: int = 1, include_original: bool = True):
        for t in transforms:
            if t not in ORIENT_ORDER:
                raise ValueError(f"unknown transform {t!r}; expected some of {ORIENT_ORDER}")
        for c in corruptions:
            if c not in CORRUPTIONS:
                raise ValueError(f"unknown corruption {c!r}; expected some of {CORRUPTIONS}")
        if severity not in (0, 1, 2):
            raise ValueError(f"severity must be 0, 1 or 2, got {severity!r}")
        self.source = source
        self.variants: tuple[str, ...] = ((ORIGINAL,) if include_original else ()) + tuple(transforms) + tuple(corruptions)
        if not self.variants:
            raise ValueError("no variants: give at least one transform or corruption, or include_original=True")
        self.severity = severity

    def __len__(self) -> int:
        return len(self.source) * len(self.variants)

    def __repr__(self) -> str:
        return f"RobustnessWrapper({self.source!r}, variants={self.variants})"

    def variant_of(self, index: int) -> str:
        """The variant name of item `index`."""
        return self.variants[index % len(self.variants)]

    def _get(self, index: int) -> Task:
        base_index, v = divmod(index, len(self.variants))
        return make_variant(self.source[base_index], self.variants[v], self.severity)


def make_variant(base: Task, variant: str, severity: int = 1) -> Task:
    """`base` under one robustness variant: "original", a transform name, or a corruption name."""
    extra = dict(base.extra)
    extra["robustness"] = {"variant": variant, "base_id": base.id}
    k = int(base.extra.get("transform_image", 0))
    images = list(base.images)
    transforms, bbox, answer = list(base.transforms), base.bbox, base.answer
    if variant in ORIENT_ORDER:
        if base.extra.get("orientation_is_answer"):
            relabelled = _orientation_answer_variant(base, variant, extra)
            if relabelled is not None:
                return relabelled
        images[k] = apply_transform(images[k], variant)
        orient = compose_orientation([t for t in base.transforms if t != "crop"] + [variant])
        transforms = orient + (["crop"] if "crop" in base.transforms else [])
        if bbox is not None and k == 0:
            bbox = int_box(Frame.identity(base.images[0].size).apply_op(variant).box_from_source(bbox))
        if base.extra.get("orientation_is_answer"):
            answer = _letter_for(base, orient)
    elif variant in CORRUPTIONS:
        images[k] = corrupt(images[k], variant, severity, seed=zlib.crc32(base.id.encode()))
        extra["corruption"], extra["severity"] = variant, severity
    elif variant != ORIGINAL:
        raise ValueError(f"unknown robustness variant {variant!r}")
    return Task(id=f"{base.id}@{variant}", images=images, question=base.question, answer=answer,
                answer_type=base.answer_type, category=base.category, transforms=transforms, bbox=bbox,
                source=base.source, extra=extra)


def _letter_for(base: Task, orient: list[str]) -> str:
    choices = base.extra.get("choices", {})
    for letter, t in choices.items():
        if [t] == orient:
            return letter
    raise ValueError(f"task {base.id!r}: no choice matches the composed transform {orient}")


def _orientation_answer_variant(base: Task, variant: str, extra: dict) -> Task | None:
    """Re-render an orientation-diagnostic task when composing would leave its choices.

    Returns None when composing stays within the choices (the caller then relabels).
    """
    orient = compose_orientation([t for t in base.transforms if t != "crop"] + [variant])
    if [t for t in base.extra.get("choices", {}).values() if [t] == orient]:
        return None
    gen = base.extra.get("generator")
    if not gen or gen.get("category") != "orientation_diagnostic":
        raise ValueError(
            f"task {base.id!r} asks which transform was applied; {variant} on top of {base.transforms} "
            f"gives {orient or 'no transform'}, which is not one of its choices, and the task is not a "
            "generated orientation_diagnostic that could be re-rendered. Leave such tasks out of robustness sets."
        )
    rendered = render_orientation_diagnostic(gen["params"], transform=variant)
    extra.update(rendered.extra)
    extra["robustness"]["rerendered"] = True
    return Task(id=f"{base.id}@{variant}", images=rendered.images, question=rendered.question,
                answer=rendered.answer, answer_type=rendered.answer_type, category=base.category,
                transforms=rendered.transforms, bbox=None, source=base.source, extra=extra)
