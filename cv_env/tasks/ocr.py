"""OCR categories: text shown misoriented (`orientation_ocr`) and a tiny tag on a large
cluttered canvas (`tiny_ocr`, MVToolBench-like: needs an orientation fix *and* a crop)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cv_env.tasks import draw as D
from cv_env.tasks.base import Category, Rendered
from cv_env.tasks.geometry import ORIENT_ORDER, apply_transforms, frame_of, int_box

# ---------------------------------------------------------------------------- orientation_ocr

_OCR_SIZE = {0: 48, 1: 36, 2: 26}  # font px of the target text by difficulty
_BOX_COLOURS = ("red", "blue", "green", "purple", "orange")


def sample_orientation_ocr(rng: np.random.Generator, difficulty: int) -> dict:
    kind = str(rng.choice(["word", "number", "code"]))
    n_distractors = {0: 0, 1: int(rng.integers(1, 3)), 2: int(rng.integers(2, 4))}[difficulty]
    w, h = int(rng.integers(300, 481)), int(rng.integers(200, 321))
    boxes = [str(c) for c in rng.permutation(_BOX_COLOURS)[: n_distractors + 1]]
    return {
        "kind": kind,
        "text": D.random_text(rng, kind),
        "distractors": [D.random_text(rng, str(rng.choice(["word", "number", "code"]))) for _ in range(n_distractors)],
        "box_colours": boxes,  # [target, distractor 1, ...]
        "size": [w, h],
        "font_size": _OCR_SIZE[difficulty] + int(rng.integers(-4, 5)),
        "background": str(rng.choice(["solid", "gradient", "stripes"] if difficulty else ["solid", "gradient"])),
        "bg1": D.light_colour(rng),
        "bg2": D.light_colour(rng),
        "ink": D.dark_colour(rng),
        "transform": str(rng.choice(ORIENT_ORDER)),
        "render_seed": int(rng.integers(2**31)),
    }


def _place_labels(rng, size, labels, font_size):
    """Non-overlapping label boxes (text + padding) at random places; shrinks text if crowded."""
    w, h = size
    for fs in range(font_size, 9, -2):
        placed = []
        for text in labels:
            x1, y1, x2, y2 = D.text_size(text, fs)
            bw, bh = x2 - x1 + 2 * (fs // 3) + 4, y2 - y1 + 2 * (fs // 3) + 4
            if bw >= w - 8 or bh >= h - 8:
                break
            for _ in range(60):
                bx, by = int(rng.integers(4, w - bw - 3)), int(rng.integers(4, h - bh - 3))
                box = (bx, by, bx + bw, by + bh)
                if all(box[2] + 6 < o[0] or o[2] + 6 < box[0] or box[3] + 6 < o[1] or o[3] + 6 < box[1] for o in placed):
                    placed.append(box)
                    break
            else:
                break
        if len(placed) == len(labels):
            return fs, placed
    raise ValueError(f"cannot place {len(labels)} labels on a {size} image")  # not reached for sampled sizes


def render_orientation_ocr(p: dict) -> Rendered:
    rng = np.random.default_rng(p["render_seed"])
    image = D.background(tuple(p["size"]), p["background"], p["bg1"], p["bg2"])
    d = ImageDraw.Draw(image)
    labels = [p["text"]] + p["distractors"]
    fs, boxes = _place_labels(rng, p["size"], labels, p["font_size"])
    for text, box, colour in zip(labels, boxes, p["box_colours"]):
        d.rectangle(box, fill=(255, 255, 255), outline=D.COLOURS[colour], width=3)
        D.draw_text_centered(d, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fs, tuple(p["ink"]))
    what = {"word": "word", "number": "number", "code": "code"}[p["kind"]]
    if p["distractors"]:
        question = f"What {what} is written inside the {p['box_colours'][0]} box?"
    else:
        question = f"What {what} is written in the image?"
    question += " The image may be rotated or mirrored."
    shown = apply_transforms(image, [p["transform"]])
    return Rendered(
        images=[shown], originals=[image], question=question, answer=p["text"],
        answer_type="number" if p["kind"] == "number" else "text", transforms=[p["transform"]],
    )


ORIENTATION_OCR = Category(
    "orientation_ocr", sample_orientation_ocr, render_orientation_ocr,
    "words, numbers or codes in coloured boxes, shown rotated 90/180/270 or flipped",
)

# ---------------------------------------------------------------------------------- tiny_ocr

_TINY_CANVAS = {0: (1500, 1000), 1: (1700, 1150), 2: (2000, 1300)}
_TINY_FONT = {0: 18, 1: 16, 2: 13}  # shrunk further if the tag would exceed the area limit
_TAG_COLOURS = ("yellow", "red", "blue", "green")
MAX_TARGET_SHARE = 0.0005  # the target's box covers under 0.05 % of the canvas


def sample_tiny_ocr(rng: np.random.Generator, difficulty: int) -> dict:
    w, h = _TINY_CANVAS[difficulty]
    return {
        "size": [w + int(rng.integers(0, 101)), h + int(rng.integers(0, 101))],
        "text": D.random_code(rng, int(rng.integers(3, 5))),
        "tag_colour": str(rng.choice(_TAG_COLOURS)),
        "font_size": _TINY_FONT[difficulty],
        "position": [float(rng.uniform(0.03, 0.93)), float(rng.uniform(0.03, 0.93))],
        "n_clutter": {0: 40, 1: 80, 2: 140}[difficulty],
        "n_decoys": {0: 0, 1: 3, 2: 6}[difficulty],  # small tags of other colours with other codes
        "paper": D.light_colour(rng),
        "transform": str(rng.choice(ORIENT_ORDER)),
        "render_seed": int(rng.integers(2**31)),
    }


def _tag_box(text: str, font_size: int, area_limit: float) -> tuple[int, int, int]:
    """(font size, width, height) of a tag holding `text`, shrunk until it is under `area_limit`."""
    for fs in range(font_size, 7, -1):
        x1, y1, x2, y2 = D.text_size(text, fs)
        tw, th = x2 - x1 + 4, y2 - y1 + 4
        if tw * th < area_limit:
            return fs, tw, th
    raise ValueError(f"tag text {text!r} does not fit under {area_limit:.0f} px²")


def _draw_tag(d: ImageDraw.ImageDraw, xy, text: str, fs: int, tw: int, th: int, colour) -> list[int]:
    x, y = xy
    d.rectangle((x, y, x + tw - 1, y + th - 1), fill=colour)
    D.draw_text_centered(d, (x + tw / 2, y + th / 2), text, fs, (0, 0, 0))
    return [x, y, x + tw, y + th]


def render_tiny_ocr(p: dict) -> Rendered:
    rng = np.random.default_rng(p["render_seed"])
    w, h = p["size"]
    image = Image.new("RGB", (w, h), tuple(p["paper"]))
    d = ImageDraw.Draw(image)
    tag_rgb = D.COLOURS[p["tag_colour"]]
    for _ in range(p["n_clutter"]):
        # Muted clutter keeps every saturated tag colour unique to tags.
        colour = tuple(int(v) for v in rng.integers(60, 200, size=3) // 2 + 60)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(20, 160))
        kind = int(rng.integers(4))
        if kind == 0:
            d.rectangle((x, y, x + s, y + s // 2), outline=colour, width=2)
        elif kind == 1:
            d.ellipse((x, y, x + s, y + s), fill=colour)
        elif kind == 2:
            d.line((x, y, x + int(rng.integers(-200, 200)), y + int(rng.integers(-200, 200))), fill=colour, width=3)
        else:
            d.text((x, y), D.random_word(rng), font=D.font(int(rng.integers(10, 20))), fill=colour)
    fs, tw, th = _tag_box(p["text"], p["font_size"], MAX_TARGET_SHARE * w * h)
    tx, ty = int(p["position"][0] * (w - tw)), int(p["position"][1] * (h - th))
    target = [tx, ty, tx + tw, ty + th]
    decoy_colours = [c for c in _TAG_COLOURS if c != p["tag_colour"]]
    for _ in range(p["n_decoys"]):
        code = D.random_code(rng, len(p["text"]))
        for _try in range(20):  # keep decoys well clear of the target so the crop shows one tag
            dx, dy = int(rng.integers(0, w - tw)), int(rng.integers(0, h - th))
            if abs(dx - tx) > 3 * tw or abs(dy - ty) > 3 * th:
                _draw_tag(d, (dx, dy), code, fs, tw, th, D.COLOURS[str(rng.choice(decoy_colours))])
                break
    # Clear a margin so no clutter touches the tag, then draw it last.
    d.rectangle((tx - 3, ty - 3, tx + tw + 2, ty + th + 2), fill=tuple(p["paper"]))
    _draw_tag(d, (tx, ty), p["text"], fs, tw, th, tag_rgb)
    transforms = [p["transform"], "crop"]
    shown = apply_transforms(image, transforms)
    bbox = int_box(frame_of(transforms, (w, h)).box_from_source(target))
    question = (
        f"Somewhere in this large image there is a small {p['tag_colour']} tag with a code printed on it. "
        "What is the code? The image may be rotated or mirrored."
    )
    return Rendered(
        images=[shown], originals=[image], question=question, answer=p["text"], answer_type="text",
        transforms=transforms, bbox=bbox, extra={"target_box_original": target},
    )


TINY_OCR = Category(
    "tiny_ocr", sample_tiny_ocr, render_tiny_ocr,
    "a tiny coloured tag (<0.05% of the area) on a cluttered >=1500x1000 canvas, misoriented: crop + fix",
)
