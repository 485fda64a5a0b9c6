"""The oracle: the solution a perfect agent would give for a task, as tool calls + answer.

`oracle_solution(task)` returns steps `{"code": str, "image_index": int}` followed by one
`{"answer": str}`. The code is what a model would write: it uses only the selected `image`
and standard PIL (`crop` with a literal box, `rotate(d, expand=True)`, `ImageOps.mirror` /
`ImageOps.flip`, `ImageEnhance` / `ImageFilter` for corruptions) and assigns `result`. It
performs exactly the required inverse ops (E) and nothing else geometric, so it earns the
maximum reward: crop first at the task's bbox (shown-frame integers), then undo the
orientation transforms in reverse order, then enhance if the image was corrupted — all in one
execution. A task that needs no op gets the answer alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cv_env.task import ORIENT_OPS, Task, inverse_op
from cv_env.tasks.corruption import enhancement_code
from cv_env.tasks.suite import render_original

_UNDO = {  # op name -> code applying it to the image variable {src}
    "rotate_90": "result = {src}.rotate(90, expand=True)",
    "rotate_180": "result = {src}.rotate(180, expand=True)",
    "rotate_270": "result = {src}.rotate(270, expand=True)",
    "flip_horizontal": "result = ImageOps.mirror({src})",
    "flip_vertical": "result = ImageOps.flip({src})",
}


def oracle_code(task: Task) -> str | None:
    """The single code block that makes `task` answerable, or None when no op is needed."""
    lines = []
    if "crop" in task.transforms:
        if task.bbox is None:
            raise ValueError(f"task {task.id!r} lists 'crop' in transforms but has no bbox to crop to")
        x1, y1, x2, y2 = (int(round(v)) for v in task.bbox)
        lines.append(f"result = image.crop(({x1}, {y1}, {x2}, {y2}))")
    for name in reversed(task.transforms):
        if name in ORIENT_OPS:
            lines.append(_UNDO[inverse_op(name)].format(src="result" if lines else "image"))
        elif name != "crop":
            raise ValueError(f"task {task.id!r} has transform {name!r}, which the oracle cannot undo")
    corruption = task.extra.get("corruption")
    if corruption:
        severity = int(task.extra.get("severity", 1))
        lines.append(enhancement_code(corruption, severity, src="result" if lines else "image"))
    return "\n".join(lines) if lines else None


_SEEN = {  # what a transform looks like to someone reading the shown image
    "rotate_90": "the content is turned 90 degrees counter-clockwise",
    "rotate_180": "the content is upside down",
    "rotate_270": "the content is turned 90 degrees clockwise",
    "flip_horizontal": "the content is mirrored left-right",
    "flip_vertical": "the content is mirrored top-bottom",
}
_FIX = {
    "rotate_90": "rotate it 90 degrees counter-clockwise",
    "rotate_180": "rotate it by 180 degrees",
    "rotate_270": "rotate it 90 degrees clockwise",
    "flip_horizontal": "mirror it left-right",
    "flip_vertical": "flip it top-bottom",
}
_CORRUPTION_SEEN = {"dark": "too dark", "low_contrast": "washed out (low contrast)", "noise": "noisy",
                    "blur": "blurred"}
_CORRUPTION_FIX = {"dark": "brighten it", "low_contrast": "raise the contrast", "noise": "denoise it with a median filter",
                   "blur": "sharpen it"}


def _explain(task: Task, image_index: int) -> tuple[str, str]:
    """(thought, description) for the oracle's code step, in plain words."""
    seen, fixes = [], []
    if "crop" in task.transforms:
        x1, y1, x2, y2 = (int(round(v)) for v in task.bbox)
        seen.append(f"the target is tiny, around ({x1}, {y1})-({x2}, {y2})")
        fixes.append(f"crop ({x1}, {y1}, {x2}, {y2})")
    orient = [t for t in task.transforms if t in ORIENT_OPS]
    if orient:
        seen.append(" and then ".join(_SEEN[t] for t in orient))
        fixes += [_FIX[inverse_op(t)] for t in reversed(orient)]
    corruption = task.extra.get("corruption")
    if corruption:
        seen.append(f"the image is {_CORRUPTION_SEEN[corruption]}")
        fixes.append(_CORRUPTION_FIX[corruption])
    which = f"Image {image_index + 1} (index {image_index}): " if len(task.images) > 1 else ""
    thought = f"{which}{'; '.join(seen)}. To read it I {', then '.join(fixes)}."
    return thought[0].upper() + thought[1:], ", then ".join(fixes).capitalize()


def oracle_solution(task: Task) -> list[dict[str, Any]]:
    """Steps `{"code", "image_index"}` that earn the maximum reward, then `{"answer"}`.

    Each step also carries a `thought` (why, in plain words) and the code step a one-line
    `description`, for agents that record demonstrations.
    """
    code = oracle_code(task)
    steps: list[dict[str, Any]] = []
    if code is not None:
        k = int(task.extra.get("transform_image", 0))
        thought, description = _explain(task, k)
        steps.append({"code": code, "image_index": k, "description": description, "thought": thought})
        done = "With the image fixed I can read it"
    else:
        done = "The image can be read as it is"
    steps.append({"answer": task.answer, "thought": f"{done}: the answer is {task.answer}."})
    return steps


def run_oracle(task: Task) -> list[Image.Image]:
    """Execute the oracle's code on the task's images with plain `exec`; returns its outputs.

    For tests and debugging only: the oracle's code is ours and trusted. Model-written code
    goes through the sandbox, never through this.
    """
    images = list(task.images)
    outputs = []
    for step in oracle_solution(task):
        if "code" not in step:
            continue
        namespace = {"image": images[step["image_index"]], "images": images, "Image": Image,
                     "ImageOps": ImageOps, "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter, "np": np}
        exec(step["code"], namespace)  # noqa: S102 - trusted oracle code
        images.append(namespace["result"])
        outputs.append(namespace["result"])
    return outputs


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _mse(a: Image.Image, b: Image.Image) -> float:
    return float(np.mean((np.asarray(a.convert("RGB"), np.float64) - np.asarray(b.convert("RGB"), np.float64)) ** 2))


def check_solvable(task: Task) -> None:
    """Verify a generated task against its clean render; raise ValueError saying what failed.

    Geometric fixes must restore the pre-transform render pixel for pixel (for a crop task:
    exactly the target's box of it); an enhancement must bring a corrupted image clearly
    closer to the clean render; images the task did not transform must be shown as rendered.
    """
    originals = render_original(task)
    outputs = run_oracle(task)
    k = int(task.extra.get("transform_image", 0))
    for i, (shown, original) in enumerate(zip(task.images, originals)):
        if i != k and not _same_pixels(shown, original):
            raise ValueError(f"{task.id}: image {i} has no transform but differs from its render")
    target = originals[k]
    if "crop" in task.transforms:
        box = task.extra.get("target_box_original")
        if box is None:
            raise ValueError(f"{task.id}: a crop task must record extra['target_box_original']")
        target = target.crop(tuple(box))
    if task.extra.get("corruption"):
        if not outputs or _mse(outputs[-1], target) >= 0.9 * _mse(task.images[k], target):
            raise ValueError(f"{task.id}: the {task.extra['corruption']} enhancement does not restore the content")
    elif outputs:
        if not _same_pixels(outputs[-1], target):
            raise ValueError(f"{task.id}: the oracle's fix does not restore the original render")
    elif not _same_pixels(task.images[k], target):
        raise ValueError(f"{task.id}: no op is needed but the shown image differs from its render")
