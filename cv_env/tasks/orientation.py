"""Orientation categories.

`orientation_diagnostic` — the paper's 5-way question: which of the five transforms was
applied (A-E)? Like every category, `transforms` records the transform that was applied, so
the required op (E) is its inverse: undoing the suspected transform and seeing the text read
normally is how the answer is verified, and the oracle does exactly that before answering.
Because the answer *is* the orientation, re-orienting such a task changes its answer;
`extra["orientation_is_answer"]` marks it so the robustness wrapper re-renders instead.

`glyph_orientation` — an easy category for learning experiments: a 112 px image with a dark
band along its top (a red mark at the band's left end) and one large arrow or letter, shown
under one of none / rotate_90/180/270 / flip_horizontal / flip_vertical. The question asks
about the upright image, so the answer is only right after the orientation is fixed; the
band and mark are the coarse cue that says which fix is needed.

`corner_orientation` — the easiest of them: the same banded 112 px image with one large solid
square in a corner of the area below the band, asked in which corner it sits upright. The fix and
the reading both rest on coarse position cues (where the band, the mark and the square are): a
2 M-parameter Qwen3-VL trained from scratch reads it on every held-out item after 5 minutes of
SFT, so it isolates "can the model see where things are" from "can it read a shape" (the same
model reads glyphs on ~1/3 of items after as long).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cv_env.tasks import draw as D
from cv_env.tasks.base import Category, Rendered
from cv_env.tasks.geometry import ORIENT_ORDER, apply_transforms

# ---------------------------------------------------------------------- orientation_diagnostic

DIAGNOSTIC_CHOICES: dict[str, str] = {  # letter -> transform, in the paper's order
    "A": "rotate_90",
    "B": "rotate_180",
    "C": "rotate_270",
    "D": "flip_horizontal",
    "E": "flip_vertical",
}
_DESCRIBE = {
    "rotate_90": "rotated 90 degrees counter-clockwise",
    "rotate_180": "rotated 180 degrees",
    "rotate_270": "rotated 90 degrees clockwise",
    "flip_horizontal": "mirrored left-right (horizontal flip)",
    "flip_vertical": "mirrored top-bottom (vertical flip)",
}


def diagnostic_question(choices: dict[str, str]) -> str:
    options = " ".join(f"{letter}. {_DESCRIBE[t]}" for letter, t in choices.items())
    return (
        "This image was made from an upright original by exactly one of these operations. "
        f"Which one? {options}. Answer with the letter."
    )


def sample_orientation_diagnostic(rng: np.random.Generator, difficulty: int) -> dict:
    n_lines = {0: 1, 1: 3, 2: 4}[difficulty]
    # Hard items are near-square, so the aspect ratio does not give rotations away.
    w = int(rng.integers(300, 420))
    h = int(w * (rng.uniform(0.6, 0.75) if difficulty < 2 else rng.uniform(0.9, 1.0)))
    return {
        "title": D.random_word(rng).capitalize() + " " + D.random_word(rng),
        "lines": [" ".join(D.random_word(rng) for _ in range(3)) for _ in range(n_lines)],
        "size": [w, h],
        "font_size": {0: 34, 1: 24, 2: 18}[difficulty],
        "paper": D.light_colour(rng),
        "ink": D.dark_colour(rng),
        "transform": str(rng.choice(ORIENT_ORDER)),
    }


def render_orientation_diagnostic(p: dict, transform: str | None = None) -> Rendered:
    """Render a diagnostic item; `transform` overrides the sampled one (robustness wrapper)."""
    transform = transform or p["transform"]
    w, h = p["size"]
    image = Image.new("RGB", (w, h), tuple(p["paper"]))
    d = ImageDraw.Draw(image)
    fs = p["font_size"]
    y = 12
    d.text((14, y), p["title"], font=D.font(fs + 6), fill=tuple(p["ink"]))
    y += fs + 18
    for line in p["lines"]:
        size = fs
        while D.text_size(line, size)[2] > w - 28 and size > 10:
            size -= 2
        d.text((14, y), line, font=D.font(size), fill=tuple(p["ink"]))
        y += size + 10
    answer = next(letter for letter, t in DIAGNOSTIC_CHOICES.items() if t == transform)
    return Rendered(
        images=[apply_transforms(image, [transform])], originals=[image],
        question=diagnostic_question(DIAGNOSTIC_CHOICES), answer=answer, answer_type="choice",
        transforms=[transform],
        extra={"orientation_is_answer": True, "choices": dict(DIAGNOSTIC_CHOICES)},
    )


ORIENTATION_DIAGNOSTIC = Category(
    "orientation_diagnostic", sample_orientation_diagnostic, render_orientation_diagnostic,
    "the paper's 5-way question: which transform (rotate 90/180/270, flip h/v) was applied",
)

# --------------------------------------------------------------------------- glyph_orientation

GLYPH_SIZE = 112
_BAND = 18
ARROW_CHOICES: dict[str, str] = {"A": "up", "B": "down", "C": "left", "D": "right"}
LETTER_CHOICES: dict[str, str] = {"A": "b", "B": "d", "C": "p", "D": "q"}
GLYPH_TRANSFORMS: tuple[str | None, ...] = (None,) + ORIENT_ORDER


def sample_glyph_orientation(rng: np.random.Generator, difficulty: int) -> dict:
    # Difficulty only adds the letter variant (b/d/p/q are each other's rotations and mirrors).
    variant = "arrow" if difficulty == 0 or rng.random() < 0.5 else "letter"
    options = ARROW_CHOICES if variant == "arrow" else LETTER_CHOICES
    return {
        "variant": variant,
        "value": str(rng.choice(list(options.values()))),
        "transform": GLYPH_TRANSFORMS[int(rng.integers(len(GLYPH_TRANSFORMS)))],
        "ink": str(rng.choice(["blue", "black", "green", "purple"])),
        "jitter": [int(v) for v in rng.integers(-6, 7, size=2)],
    }


def _arrow(direction: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """An arrow polygon pointing up, turned to `direction`."""
    up = [(0, -r), (0.7 * r, -0.05 * r), (0.28 * r, -0.05 * r), (0.28 * r, r), (-0.28 * r, r), (-0.28 * r, -0.05 * r), (-0.7 * r, -0.05 * r)]
    turn = {"up": lambda x, y: (x, y), "down": lambda x, y: (-x, -y), "left": lambda x, y: (y, -x), "right": lambda x, y: (-y, x)}[direction]
    return [(cx + tx, cy + ty) for tx, ty in (turn(x, y) for x, y in up)]


def _banded_canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """The upright 112 px canvas: white, a dark band along the top, a red mark at its left end."""
    s = GLYPH_SIZE
    image = Image.new("RGB", (s, s), (255, 255, 255))
    d = ImageDraw.Draw(image)
    d.rectangle((0, 0, s - 1, _BAND - 1), fill=(50, 50, 50))
    d.rectangle((3, 3, _BAND - 4, _BAND - 4), fill=D.COLOURS["red"])
    return image, d


def _banded_item(image: Image.Image, transform: str | None, options: dict[str, str], value: str,
                 what: str) -> Rendered:
    """The shown (transformed) image and the 4-way question `what` about the upright one."""
    transforms = [transform] if transform else []
    answer = next(letter for letter, v in options.items() if v == value)
    listed = " ".join(f"{k}. {v}" for k, v in options.items())
    question = ("Upright, this image has a dark band along its top edge with a red mark at the band's left "
                f"end; the image shown may be rotated or mirrored. {what} {listed}")
    return Rendered(
        images=[apply_transforms(image, transforms)], originals=[image], question=question,
        answer=answer, answer_type="choice", transforms=transforms,
    )


def render_glyph_orientation(p: dict) -> Rendered:
    s = GLYPH_SIZE
    image, d = _banded_canvas()
    cx, cy = s / 2 + p["jitter"][0], (_BAND + s) / 2 + p["jitter"][1] / 2
    ink = D.COLOURS[p["ink"]]
    if p["variant"] == "arrow":
        d.polygon(_arrow(p["value"], cx, cy, 34), fill=ink)
        options, what = ARROW_CHOICES, "Which way does the arrow point in the upright image?"
    else:
        D.draw_text_centered(d, (cx, cy), p["value"], 80, ink)
        options, what = LETTER_CHOICES, "Which letter is shown in the upright image?"
    return _banded_item(image, p["transform"], options, p["value"], what)


GLYPH_ORIENTATION = Category(
    "glyph_orientation", sample_glyph_orientation, render_glyph_orientation,
    "easy 112 px glyph/arrow under none/rotations/flips; answer about the upright image (learning experiments)",
)

# --------------------------------------------------------------------------- corner_orientation

CORNER_CHOICES: dict[str, str] = {"A": "top-left", "B": "top-right", "C": "bottom-left", "D": "bottom-right"}
_SQUARE = 34  # side of the square: more than one 28 px image token at the model's 112 px view


def sample_corner_orientation(rng: np.random.Generator, difficulty: int) -> dict:
    # Difficulty does not change this category: it is the easy end of the orientation family.
    return {
        "corner": str(rng.choice(list(CORNER_CHOICES.values()))),
        "transform": GLYPH_TRANSFORMS[int(rng.integers(len(GLYPH_TRANSFORMS)))],
        "ink": str(rng.choice(["blue", "black", "green", "purple"])),
        "offset": [int(v) for v in rng.integers(0, 5, size=2)],  # px: every parameter set draws a distinct image
    }


def render_corner_orientation(p: dict) -> Rendered:
    s, margin = GLYPH_SIZE, 8
    image, d = _banded_canvas()
    vertical, horizontal = p["corner"].split("-")
    x = margin if horizontal == "left" else s - margin - _SQUARE
    y = _BAND + margin if vertical == "top" else s - margin - _SQUARE
    x, y = x + p["offset"][0] - 2, y + p["offset"][1] - 2  # within the 8 px margins
    d.rectangle((x, y, x + _SQUARE - 1, y + _SQUARE - 1), fill=D.COLOURS[p["ink"]])
    return _banded_item(image, p["transform"], CORNER_CHOICES, p["corner"],
                        "In which corner of the upright image is the coloured square?")


CORNER_ORIENTATION = Category(
    "corner_orientation", sample_corner_orientation, render_corner_orientation,
    "easiest 112 px banded image with a square in one corner, shown under none/rotations/flips; which corner upright?",
)
