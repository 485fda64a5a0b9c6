"""`shapes_space`: coloured shapes and a spatial question (left/right, above/below, extremes,
counts per half) about the *upright* scene, shown rotated or mirrored, so the answer changes
unless the orientation is fixed first. A caption printed along the top marks which way is up.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cv_env.tasks import draw as D
from cv_env.tasks.base import Category, Rendered
from cv_env.tasks.geometry import ORIENT_ORDER, apply_transforms

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
_QUESTIONS = ("left_right", "above_below", "extreme", "count_half")
_P_UPRIGHT = (0.2, 0.1, 0.05)  # share shown with no transform, by difficulty
_SIZE = (400, 300)
_CAPTION_H = 34  # the caption strip at the top; shapes live below it
_GAP = 30  # minimum separation along the axis a question is about


def sample_shapes_space(rng: np.random.Generator, difficulty: int) -> dict:
    w, h = _SIZE
    n = int(rng.integers(3 + difficulty, 5 + 2 * difficulty))
    kinds = [(s, c) for s in SHAPES for c in D.SHAPE_COLOURS]
    chosen = rng.permutation(len(kinds))[:n]  # every (shape, colour) at most once: names are unique
    shapes: list[dict] = []
    for k in chosen:
        for _ in range(200):
            r = int(rng.integers(14, 26))
            x, y = int(rng.integers(r + 4, w - r - 4)), int(rng.integers(_CAPTION_H + r + 4, h - r - 4))
            if all((x - o["x"]) ** 2 + (y - o["y"]) ** 2 > (r + o["r"] + 8) ** 2 for o in shapes):
                shapes.append({"shape": kinds[k][0], "colour": kinds[k][1], "x": x, "y": y, "r": r})
                break
    upright = rng.random() < _P_UPRIGHT[difficulty]
    return {
        "shapes": shapes,
        "question": str(rng.choice(_QUESTIONS)),
        "pick": [int(i) for i in rng.permutation(len(shapes))[:2]],
        "side": str(rng.choice(["min", "max"])),
        "caption": f"Figure {int(rng.integers(1, 100))}",
        "transform": None if upright else str(rng.choice(ORIENT_ORDER)),
    }


def _name(s: dict) -> str:
    return f"{s['colour']} {s['shape']}"


def _question(p: dict) -> tuple[str, str, str] | None:
    """(question, answer, answer_type), or None when the layout makes the answer ambiguous."""
    shapes = p["shapes"]
    a, b = (shapes[i] for i in p["pick"])
    w, h = _SIZE
    q = p["question"]
    if q == "left_right":
        if abs(a["x"] - b["x"]) < _GAP:
            return None
        ans = "A" if a["x"] < b["x"] else "B"
        return f"Is the {_name(a)} to the left or to the right of the {_name(b)}? A. left B. right", ans, "choice"
    if q == "above_below":
        if abs(a["y"] - b["y"]) < _GAP:
            return None
        ans = "A" if a["y"] < b["y"] else "B"
        return f"Is the {_name(a)} above or below the {_name(b)}? A. above B. below", ans, "choice"
    if q == "extreme":
        axis = "x" if p["pick"][0] % 2 == 0 else "y"
        ranked = sorted(shapes, key=lambda s: s[axis], reverse=p["side"] == "max")
        if abs(ranked[1][axis] - ranked[0][axis]) < _GAP:
            return None
        word = {("x", "min"): "leftmost", ("x", "max"): "rightmost", ("y", "min"): "topmost", ("y", "max"): "bottom-most"}
        return f"What colour is the {word[axis, p['side']]} shape?", ranked[0]["colour"], "text"
    # count_half: which half is fixed by side (min = upper/left) and the first pick's parity.
    axis = "x" if p["pick"][0] % 2 == 0 else "y"
    mid = (w / 2) if axis == "x" else (_CAPTION_H + h) / 2
    if any(abs(s[axis] - mid) < 12 for s in shapes):
        return None
    low = p["side"] == "min"
    count = sum((s[axis] < mid) == low for s in shapes)
    half = {("x", True): "left half", ("x", False): "right half", ("y", True): "upper half", ("y", False): "lower half"}
    region = "of the area below the caption" if axis == "y" else "of the image"
    return f"How many shapes are in the {half[axis, low]} {region}?", str(count), "number"


def _fallback(p: dict) -> tuple[str, str, str]:
    """A question that is never ambiguous (shapes do not overlap, so some axis separates them)."""
    a, b = (p["shapes"][i] for i in p["pick"])
    if abs(a["x"] - b["x"]) >= abs(a["y"] - b["y"]):
        ans = "A" if a["x"] < b["x"] else "B"
        return f"Is the {_name(a)} to the left or to the right of the {_name(b)}? A. left B. right", ans, "choice"
    ans = "A" if a["y"] < b["y"] else "B"
    return f"Is the {_name(a)} above or below the {_name(b)}? A. above B. below", ans, "choice"


def render_shapes_space(p: dict) -> Rendered:
    w, h = _SIZE
    image = Image.new("RGB", (w, h), (250, 250, 246))
    d = ImageDraw.Draw(image)
    d.rectangle((0, 0, w, _CAPTION_H - 6), fill=(225, 225, 225))
    d.text((10, 6), p["caption"], font=D.font(20), fill=(0, 0, 0))
    for s in p["shapes"]:
        x, y, r, colour = s["x"], s["y"], s["r"], D.COLOURS[s["colour"]]
        if s["shape"] == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif s["shape"] == "square":
            d.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        else:
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)
    question, answer, atype = _question(p) or _fallback(p)
    transforms = [p["transform"]] if p["transform"] else []
    question = (
        "The scene has a caption strip along its top edge; answer for the scene in that upright "
        f"orientation (the image shown may be rotated or mirrored). {question}"
    )
    return Rendered(
        images=[apply_transforms(image, transforms)], originals=[image], question=question,
        answer=answer, answer_type=atype, transforms=transforms,
    )


SHAPES_SPACE = Category(
    "shapes_space", sample_shapes_space, render_shapes_space,
    "coloured shapes; left/right, above/below, extreme and per-half count questions about the upright scene",
)
