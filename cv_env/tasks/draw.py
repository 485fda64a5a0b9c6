"""Drawing helpers shared by the generators: fonts, colours, vocabularies, backgrounds.

Fonts are Pillow's built-in scalable font only (`ImageFont.load_default(size=...)`), so the
suite renders identically on any machine with no system fonts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colours with the names questions use; chosen far apart so a name is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (30, 150, 60),
    "blue": (40, 80, 215),
    "yellow": (245, 205, 25),
    "orange": (245, 130, 20),
    "purple": (135, 55, 175),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple")

WORDS: tuple[str, ...] = tuple(
    """
    apple river stone cloud tiger piano garden window silver rocket harbor candle forest
    mirror planet basket ladder orange pencil castle bridge winter summer autumn spring
    falcon meadow copper marble violet anchor lantern compass island valley canyon desert
    jungle glacier thunder breeze shadow sunset meteor comet galaxy nectar pepper ginger
    walnut almond cherry lemon mango peach banana grape melon olive tomato carrot onion
    button zipper needle thread pocket jacket helmet saddle wagon engine signal ticket
    market office school museum temple palace tunnel tower station airport parking
    doctor farmer pilot sailor singer dancer writer painter baker hunter keeper
    purple yellow golden bronze crystal velvet cotton linen paper rubber plastic
    hammer wrench shovel bucket kettle teapot saucer spoon ladle blender toaster
    rabbit turtle parrot beaver badger donkey monkey walrus salmon lobster oyster
    circle square spiral arrow vector matrix signal binary pixel kernel filter
    """.split()
)
MONTHS: tuple[str, ...] = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
FRUITS: tuple[str, ...] = ("Apple", "Pear", "Plum", "Kiwi", "Lime", "Fig", "Date", "Peach")
REGIONS: tuple[str, ...] = ("North", "South", "East", "West", "Center", "Coast", "Hills")

# Characters that stay distinct in small print (no 0/O, 1/I/L, 5/S, 2/Z, 8/B).
CODE_CHARS = "ACDEFGHJKMNPQRTUVWXY34679"


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at `size` pixels (cached: loading costs ~1 ms)."""
    return ImageFont.load_default(size=int(size))


def text_size(text: str, size: int) -> tuple[int, int, int, int]:
    """The ink box (x1, y1, x2, y2) of `text` drawn at the origin in font `size`."""
    return font(size).getbbox(text)


def draw_text_centered(draw: ImageDraw.ImageDraw, center: tuple[float, float], text: str, size: int, fill) -> list[int]:
    """Draw `text` with its ink box centred on `center`; returns that ink box."""
    x1, y1, x2, y2 = text_size(text, size)
    ox = int(round(center[0] - (x1 + x2) / 2))
    oy = int(round(center[1] - (y1 + y2) / 2))
    draw.text((ox, oy), text, font=font(size), fill=fill)
    return [ox + x1, oy + y1, ox + x2, oy + y2]


def random_word(rng: np.random.Generator) -> str:
    return str(WORDS[int(rng.integers(len(WORDS)))])


def random_code(rng: np.random.Generator, length: int) -> str:
    return "".join(CODE_CHARS[int(i)] for i in rng.integers(len(CODE_CHARS), size=length))


def random_text(rng: np.random.Generator, kind: str) -> str:
    """A word, a number or a short code (`kind` in word|number|code)."""
    if kind == "word":
        return random_word(rng).upper() if rng.random() < 0.4 else random_word(rng)
    if kind == "number":
        return str(int(rng.integers(10, 100_000)))
    if kind == "code":
        return f"{random_code(rng, 2)}-{int(rng.integers(10, 1000))}"
    raise ValueError(f"unknown text kind {kind!r}")


def light_colour(rng: np.random.Generator) -> list[int]:
    return [int(v) for v in rng.integers(190, 256, size=3)]


def dark_colour(rng: np.random.Generator) -> list[int]:
    return [int(v) for v in rng.integers(0, 90, size=3)]


def background(size: tuple[int, int], style: str, c1, c2) -> Image.Image:
    """A solid, gradient or striped RGB background."""
    w, h = size
    if style == "solid":
        return Image.new("RGB", (w, h), tuple(c1))
    a, b = np.asarray(c1, np.float32), np.asarray(c2, np.float32)
    if style == "gradient":
        t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        row = (a * (1 - t) + b * t).astype(np.uint8)
        return Image.fromarray(np.repeat(row, h, axis=0))
    if style == "stripes":
        stripe = (np.arange(h) // 12 % 2).astype(bool)[:, None, None]
        arr = np.where(stripe, a, b).astype(np.uint8)
        return Image.fromarray(np.repeat(arr, w, axis=1))
    raise ValueError(f"unknown background style {style!r}")
