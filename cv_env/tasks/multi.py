"""`multi_image`: two or three images, each showing an underlined number, one of them shown
upside down or mirrored, and a question comparing them.

The numbers use digits that stay digits when turned (0 1 6 8 9), so an uncorrected "68"
reads "89": the answer is only right once the right image (`image_index`) is fixed. The
underline marks the upright side. For this category `transforms` describes the image
`extra["transform_image"]` (not necessarily image 0); the others are shown as rendered.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cv_env.tasks import draw as D
from cv_env.tasks.base import Category, Rendered
from cv_env.tasks.geometry import ORIENT_ORDER, apply_transforms

_TURNABLE = "01689"
_TURNED = {"0": "0", "1": "1", "6": "9", "8": "8", "9": "6"}
_QUESTIONS = ("sum", "largest", "difference")


def _turnable_number(rng: np.random.Generator, digits: int) -> str:
    """A number whose 180-degree reading is a different number (so a wrong fix shows)."""
    while True:
        text = "".join(_TURNABLE[int(i)] for i in rng.integers(len(_TURNABLE), size=digits))
        turned = "".join(_TURNED[c] for c in reversed(text))
        if text[0] != "0" and turned[0] != "0" and turned != text:
            return text


def sample_multi_image(rng: np.random.Generator, difficulty: int) -> dict:
    n_images = 2 if difficulty < 2 else 3
    digits = 2 if difficulty == 0 else 3
    numbers: list[str] = []
    while len(numbers) < n_images:
        candidate = _turnable_number(rng, digits)
        if candidate not in numbers:
            numbers.append(candidate)
    return {
        "numbers": numbers,
        "question": str(rng.choice(_QUESTIONS[: 2 + (difficulty > 0)])),
        "transform_image": int(rng.integers(n_images)),
        # Rotations and the vertical flip turn digits into other digits; a left-right mirror
        # only mirrors them, which a model can still see through, so it is rarer.
        "transform": str(rng.choice(ORIENT_ORDER, p=[0.2, 0.35, 0.2, 0.05, 0.2])),
        "papers": [D.light_colour(rng) for _ in range(n_images)],
        "ink": D.dark_colour(rng),
    }


def _number_card(text: str, paper, ink) -> Image.Image:
    image = Image.new("RGB", (240, 160), tuple(paper))
    d = ImageDraw.Draw(image)
    x1, y1, x2, y2 = D.draw_text_centered(d, (120, 74), text, 64, tuple(ink))
    d.rectangle((x1, y2 + 8, x2, y2 + 14), fill=tuple(ink))  # the underline marks the bottom
    return image


def render_multi_image(p: dict) -> Rendered:
    originals = [_number_card(t, paper, p["ink"]) for t, paper in zip(p["numbers"], p["papers"])]
    k = p["transform_image"]
    shown = list(originals)
    shown[k] = apply_transforms(originals[k], [p["transform"]])
    values = [int(t) for t in p["numbers"]]
    n = len(values)
    intro = (
        f"Each of the {n} images shows one underlined number (the underline is below the number when "
        "the image is upright); an image may be rotated or mirrored. "
    )
    if p["question"] == "sum":
        question, answer, atype = intro + "What is the sum of the numbers?", str(sum(values)), "number"
    elif p["question"] == "largest":
        letters = "ABC"[:n]
        listed = " ".join(f"{letters[i]}. image {i + 1}" for i in range(n))
        question = intro + f"Which image shows the largest number? {listed}"
        answer, atype = letters[int(np.argmax(values))], "choice"
    else:
        question = intro + "What is the largest number minus the smallest number?"
        answer, atype = str(max(values) - min(values)), "number"
    return Rendered(
        images=shown, originals=originals, question=question, answer=answer, answer_type=atype,
        transforms=[p["transform"]], extra={"transform_image": k},
    )


MULTI_IMAGE = Category(
    "multi_image", sample_multi_image, render_multi_image,
    "2-3 underlined numbers, one image upside down or mirrored; sum / largest / difference",
)
