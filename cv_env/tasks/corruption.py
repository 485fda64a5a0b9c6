"""Natural corruptions (dark, low contrast, noise, blur), the enhancement that undoes each,
and the `corruption` category: a legible render degraded until an enhancement op is needed.

The corruption is not a geometric transform, so a corruption task has `transforms == []`;
`extra["corruption"]` and `extra["severity"]` record what was done and `enhancement_code`
gives the PIL code that makes the content readable again (the oracle uses it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from cv_env.tasks import draw as D
from cv_env.tasks.base import Category, Rendered

CORRUPTIONS: tuple[str, ...] = ("dark", "low_contrast", "noise", "blur")

# Per severity 0 (mild) .. 2 (strong).
_BRIGHTNESS = (0.3, 0.2, 0.13)
_CONTRAST = (0.3, 0.2, 0.13)
_NOISE_SIGMA = (30.0, 45.0, 60.0)
_BLUR_RADIUS = (1.2, 1.8, 2.4)


def corrupt(image: Image.Image, kind: str, severity: int, seed: int) -> Image.Image:
    """Degrade `image` with corruption `kind` at `severity` (0..2); deterministic in `seed`."""
    if severity not in (0, 1, 2):
        raise ValueError(f"severity must be 0, 1 or 2, got {severity!r}")
    image = image.convert("RGB")
    if kind == "dark":
        return ImageEnhance.Brightness(image).enhance(_BRIGHTNESS[severity])
    if kind == "low_contrast":
        return ImageEnhance.Contrast(image).enhance(_CONTRAST[severity])
    if kind == "noise":
        rng = np.random.default_rng(seed)
        arr = np.asarray(image, np.float32)
        arr = arr + rng.normal(0.0, _NOISE_SIGMA[severity], size=arr.shape[:2])[..., None]
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(_BLUR_RADIUS[severity]))
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def enhancement_code(kind: str, severity: int, src: str = "image") -> str:
    """PIL code (reading the variable `src`, assigning `result`) that makes a `kind`-corrupted
    image readable."""
    if kind == "dark":
        return f"result = ImageEnhance.Brightness({src}).enhance({1 / _BRIGHTNESS[severity]:.3f})"
    if kind == "low_contrast":
        return f"result = ImageEnhance.Contrast({src}).enhance({1 / _CONTRAST[severity]:.3f})"
    if kind == "noise":
        return f"result = {src}.filter(ImageFilter.MedianFilter(5))"
    if kind == "blur":
        # Unsharp mask at the blur's own radius: of the masks tried it brought the image
        # closest to the clean render at every severity (wider or stronger ones overshoot).
        return f"result = {src}.filter(ImageFilter.UnsharpMask(radius={_BLUR_RADIUS[severity]}, percent=200, threshold=0))"
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def sample_corruption(rng: np.random.Generator, difficulty: int) -> dict:
    kind = str(rng.choice(["word", "number", "code"]))
    return {
        "kind": kind,
        "text": D.random_text(rng, kind),
        "corruption": str(rng.choice(CORRUPTIONS)),
        "severity": int(difficulty),
        "size": [int(rng.integers(280, 421)), int(rng.integers(180, 281))],
        "font_size": {0: 44, 1: 34, 2: 26}[difficulty] + int(rng.integers(-3, 4)),
        "paper": D.light_colour(rng),
        "ink": D.dark_colour(rng),
        "render_seed": int(rng.integers(2**31)),
    }


def render_corruption(p: dict) -> Rendered:
    w, h = p["size"]
    clean = Image.new("RGB", (w, h), tuple(p["paper"]))
    d = ImageDraw.Draw(clean)
    fs = p["font_size"]
    while D.text_size(p["text"], fs)[2] > w - 20:  # long numbers on narrow canvases
        fs -= 2
    D.draw_text_centered(d, (w / 2, h / 2), p["text"], fs, tuple(p["ink"]))
    shown = corrupt(clean, p["corruption"], p["severity"], p["render_seed"])
    what = {"word": "word", "number": "number", "code": "code"}[p["kind"]]
    question = f"What {what} is written in the image? The image is hard to read; enhance it if needed."
    return Rendered(
        images=[shown], originals=[clean], question=question, answer=p["text"],
        answer_type="number" if p["kind"] == "number" else "text", transforms=[],
        extra={"corruption": p["corruption"], "severity": p["severity"]},
    )


CORRUPTION = Category(
    "corruption", sample_corruption, render_corruption,
    "text made hard to read by darkness, low contrast, noise or blur; an enhancement op fixes it",
)
