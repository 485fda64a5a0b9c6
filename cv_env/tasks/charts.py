"""`charts`: bar and line charts drawn with PIL, each value printed at its bar or point, and a
numeric (or label) question; sometimes shown misoriented."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cv_env.tasks import draw as D
from cv_env.tasks.base import Category, Rendered
from cv_env.tasks.geometry import ORIENT_ORDER, apply_transforms

_P_MISORIENTED = (0.3, 0.5, 0.7)  # by difficulty
_QUESTIONS = ("value", "max", "min", "difference", "sum", "count_above")
_SERIES_COLOURS = ("blue", "red", "green", "orange", "purple")


def sample_charts(rng: np.random.Generator, difficulty: int) -> dict:
    n = int(rng.integers(3 + difficulty, 6 + 2 * difficulty))
    pool = [D.MONTHS, D.FRUITS, D.REGIONS][int(rng.integers(3))]
    start = int(rng.integers(0, len(pool) - n + 1)) if pool is D.MONTHS else 0
    labels = list(pool[start:start + n]) if pool is D.MONTHS else [str(x) for x in rng.permutation(pool)[:n]]
    # Distinct values so "highest"/"lowest" have one answer.
    values = [int(v) for v in rng.choice(np.arange(5, 100), size=n, replace=False)]
    qtype = str(rng.choice(_QUESTIONS[: 3 + difficulty + 1]))
    a, b = (int(i) for i in rng.choice(n, size=2, replace=False))
    misoriented = rng.random() < _P_MISORIENTED[difficulty]
    return {
        "chart": str(rng.choice(["bar", "line"])),
        "labels": labels,
        "values": values,
        "question": qtype,
        "pair": [a, b],
        "threshold": int(rng.integers(3, 10)) * 10,
        "colour": str(rng.choice(_SERIES_COLOURS)),
        "title": str(rng.choice(["Monthly sales", "Visitors", "Orders", "Rainfall (mm)", "Score", "Units sold"])),
        "size": [int(rng.integers(420, 561)), int(rng.integers(320, 421))],
        "transform": str(rng.choice(ORIENT_ORDER)) if misoriented else None,
    }


def _draw_chart(p: dict) -> Image.Image:
    w, h = p["size"]
    image = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(image)
    left, right, top, bottom = 44, w - 16, 44, h - 36
    D.draw_text_centered(d, (w / 2, 18), p["title"], 18, (0, 0, 0))
    d.line((left, top, left, bottom), fill=(0, 0, 0), width=2)
    d.line((left, bottom, right, bottom), fill=(0, 0, 0), width=2)
    for tick in range(0, 101, 25):  # y axis 0..100
        y = bottom - (bottom - top) * tick / 100
        d.line((left - 4, y, left, y), fill=(0, 0, 0))
        d.line((left + 1, y, right, y), fill=(225, 225, 225))
        D.draw_text_centered(d, (left - 18, y), str(tick), 11, (60, 60, 60))
    n = len(p["values"])
    slot = (right - left) / n
    colour = D.COLOURS[p["colour"]]
    points = []
    for i, (label, value) in enumerate(zip(p["labels"], p["values"])):
        cx = left + slot * (i + 0.5)
        y = bottom - (bottom - top) * value / 100
        points.append((cx, y))
        D.draw_text_centered(d, (cx, bottom + 14), label, 12, (0, 0, 0))
        if p["chart"] == "bar":
            d.rectangle((cx - slot * 0.32, y, cx + slot * 0.32, bottom - 1), fill=colour)
    if p["chart"] == "line":
        d.line(points, fill=colour, width=3)
        for cx, y in points:
            d.ellipse((cx - 4, y - 4, cx + 4, y + 4), fill=colour)
    for (cx, y), value in zip(points, p["values"]):
        D.draw_text_centered(d, (cx, y - 11), str(value), 13, (0, 0, 0))
    return image


def render_charts(p: dict) -> Rendered:
    chart = _draw_chart(p)
    labels, values = p["labels"], p["values"]
    a, b = p["pair"]
    kind = "bar chart" if p["chart"] == "bar" else "line chart"
    q = p["question"]
    if q == "value":
        question, answer, atype = f"In the {kind}, what is the value for {labels[a]}?", str(values[a]), "number"
    elif q == "max":
        question, answer, atype = f"In the {kind}, which category has the highest value?", labels[int(np.argmax(values))], "text"
    elif q == "min":
        question, answer, atype = f"In the {kind}, which category has the lowest value?", labels[int(np.argmin(values))], "text"
    elif q == "difference":
        question = f"In the {kind}, how much larger is the value for {labels[a]} than for {labels[b]}? (Negative if smaller.)"
        answer, atype = str(values[a] - values[b]), "number"
    elif q == "sum":
        question, answer, atype = f"In the {kind}, what is the sum of the values for {labels[a]} and {labels[b]}?", str(values[a] + values[b]), "number"
    else:
        t = p["threshold"]
        question = f"In the {kind}, how many categories have a value above {t}?"
        answer, atype = str(sum(v > t for v in values)), "number"
    transforms = [p["transform"]] if p["transform"] else []
    if transforms:
        question += " The chart may be rotated or mirrored."
    return Rendered(
        images=[apply_transforms(chart, transforms)], originals=[chart], question=question,
        answer=answer, answer_type=atype, transforms=transforms,
    )


CHARTS = Category(
    "charts", sample_charts, render_charts,
    "bar/line charts with printed values; value, extremum, difference, sum and count questions",
)
