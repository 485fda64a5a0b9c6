"""The built-in procedural suite: category registry, default mix, splits, `SyntheticSuite`.

Item `i` of a suite is a pure function of (seed, split, i): its category comes from a fixed
interleaved schedule (so proportions are exact over every block), its parameters from a seeded
generator, and its split from a hash of its content. Parameters are redrawn until the hash
falls in the split's range, so `train`, `validation` and `test` never share an item, whatever
the seed, and no list of items is ever stored.
"""

from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np
from PIL import Image

from cv_env.task import Task
from cv_env.tasks.base import DIFFICULTIES, Category, Rendered, TaskSource, content_hash
from cv_env.tasks.charts import CHARTS
from cv_env.tasks.corruption import CORRUPTION
from cv_env.tasks.multi import MULTI_IMAGE
from cv_env.tasks.ocr import ORIENTATION_OCR, TINY_OCR
from cv_env.tasks.orientation import CORNER_ORIENTATION, GLYPH_ORIENTATION, ORIENTATION_DIAGNOSTIC
from cv_env.tasks.shapes import SHAPES_SPACE

CATEGORIES: dict[str, Category] = {
    c.name: c
    for c in (ORIENTATION_OCR, TINY_OCR, CORRUPTION, CHARTS, SHAPES_SPACE, MULTI_IMAGE,
              ORIENTATION_DIAGNOSTIC, GLYPH_ORIENTATION, CORNER_ORIENTATION)
}

# Share of each category in the default suite (per block of 20 items). glyph_orientation and
# corner_orientation are learning-experiment categories and stay out of the default benchmark.
DEFAULT_MIX: dict[str, int] = {
    "orientation_ocr": 4,
    "tiny_ocr": 3,
    "corruption": 3,
    "charts": 3,
    "shapes_space": 3,
    "multi_image": 2,
    "orientation_diagnostic": 2,
}

# Each split owns a slice of the content-hash range [0, 1).
SPLITS: dict[str, tuple[float, float]] = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
DEFAULT_SIZES: dict[str, int] = {"train": 10_000, "validation": 500, "test": 500}
_SPLIT_CODE = {"train": 1, "validation": 2, "test": 3}
_MAX_DRAWS = 10_000


def _schedule(mix: Mapping[str, int]) -> list[str]:
    """A block in which category c appears mix[c] times, spread evenly (not in runs)."""
    slots = [((j + 0.5) / k, name) for name, k in mix.items() for j in range(k)]
    return [name for _, name in sorted(slots, key=lambda s: (s[0], list(mix).index(s[1])))]


def _normalise_mix(categories) -> dict[str, int]:
    if categories is None:
        mix = dict(DEFAULT_MIX)
    elif isinstance(categories, str):
        mix = {name.strip(): 1 for name in categories.split(",")}
    elif isinstance(categories, Mapping):
        mix = dict(categories)
    else:
        mix = {name: 1 for name in categories}
    for name, weight in mix.items():
        if name not in CATEGORIES:
            raise ValueError(f"unknown task category {name!r}; known: {', '.join(CATEGORIES)}")
        if not (isinstance(weight, (int, np.integer)) and weight >= 0):
            raise ValueError(f"category weights are non-negative integers (items per block), got {name}={weight!r}")
    mix = {name: int(w) for name, w in mix.items() if w > 0}
    if not mix:
        raise ValueError("the category mix is empty: give at least one category a positive weight")
    return mix


class SyntheticSuite(TaskSource):
    """The procedural benchmark, generated lazily and deterministically.

    Args:
        categories: None for `DEFAULT_MIX`; a category name or comma-separated names; a list of
            names (equal shares); or a dict name -> items per block.
        split: "train", "validation" or "test" (disjoint by content).
        seed: changes every item; the same (seed, split, index) always gives the same task.
        size: number of items (default: 10,000 train, 500 validation, 500 test).
        difficulty: 0 (easy), 1 (medium), 2 (hard), or "mixed" (drawn per item).
    """

    def __init__(self, categories=None, split: str = "train", seed: int = 0, size: int | None = None,
                 difficulty: int | str = 1):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if difficulty != "mixed" and difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be 0, 1, 2 or 'mixed', got {difficulty!r}")
        self.mix = _normalise_mix(categories)
        self.split, self.seed, self.difficulty = split, int(seed), difficulty
        self.size = DEFAULT_SIZES[split] if size is None else int(size)
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._schedule = _schedule(self.mix)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"SyntheticSuite({self.mix}, split={self.split!r}, seed={self.seed}, size={self.size}, difficulty={self.difficulty!r})"

    def category_of(self, index: int) -> str:
        """The category of item `index` (cheap: no rendering)."""
        return self._schedule[index % len(self._schedule)]

    def params(self, index: int) -> tuple[str, dict, int]:
        """(category, params, difficulty) of item `index`, drawn until its content is in this split."""
        block, pos = divmod(index, len(self._schedule))
        name = self._schedule[pos]
        per_block = self.mix[name]
        cat_index = block * per_block + self._schedule[:pos].count(name)
        lo, hi = SPLITS[self.split]
        cat_code = zlib.crc32(name.encode())
        for draw in range(_MAX_DRAWS):
            rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], cat_code, cat_index, draw])
            difficulty = int(rng.integers(3)) if self.difficulty == "mixed" else int(self.difficulty)
            params = CATEGORIES[name].sample(rng, difficulty)
            if lo <= content_hash(params) < hi:
                return name, params, difficulty
        raise RuntimeError(f"no {name} item for split {self.split!r} after {_MAX_DRAWS} draws")  # p < 1e-400

    def _get(self, index: int) -> Task:
        name, params, difficulty = self.params(index)
        rendered = CATEGORIES[name].render(params)
        return _to_task(rendered, name, params, difficulty, f"synthetic/{self.split}/{self.seed}/{index}/{name}",
                        {"split": self.split, "seed": self.seed, "index": index})


def _to_task(rendered: Rendered, name: str, params: dict, difficulty: int, task_id: str, where: dict) -> Task:
    extra = dict(rendered.extra)
    extra["generator"] = {"category": name, "params": params, "difficulty": difficulty, **where}
    return Task(
        id=task_id, images=rendered.images, question=rendered.question, answer=rendered.answer,
        answer_type=rendered.answer_type, category=name, transforms=list(rendered.transforms),
        bbox=rendered.bbox, source="synthetic", extra=extra,
    )


def render_original(task: Task) -> list[Image.Image]:
    """The clean, upright renders of a generated task's images (for solvability checks).

    Works for any task made by the suite (also after the robustness wrapper or a parquet
    round trip, which keep `extra["generator"]`). These images are never part of a `Task`.
    """
    gen = task.extra.get("generator")
    if not isinstance(gen, dict) or gen.get("category") not in CATEGORIES:
        raise ValueError(f"task {task.id!r} was not made by the synthetic suite (no extra['generator']); "
                         "only generated tasks can be re-rendered")
    return CATEGORIES[gen["category"]].render(gen["params"]).originals


def categories_table() -> list[tuple[str, str, int]]:
    """(name, description, default share per block) for every category."""
    return [(name, c.description, DEFAULT_MIX.get(name, 0)) for name, c in CATEGORIES.items()]

