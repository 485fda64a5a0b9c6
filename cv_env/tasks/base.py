"""`TaskSource`: what the environment draws episodes from, and the generator contract.

A task source is a finite, indexable, deterministic sequence of `Task`s: `len(src)`,
`src[i]`, iteration, and `src.sample(rng)`. Generated suites build item `i` on demand, so a
source of 10,000 tasks costs nothing until it is read.

Generators (one per category) are two pure functions, which is what makes items reproducible
and splits disjoint without storing anything:

* `sample(rng, difficulty) -> params`: draw the item's parameters (plain JSON data: the text,
  the layout, the transform, a render seed). Cheap, so the suite can redraw until an item's
  content hash lands in the requested split.
* `render(params) -> Rendered`: draw the images and write the question and answer. The
  pre-transform renders (`originals`) come back too, for solvability checks only; they never
  enter the `Task`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from cv_env.task import AnswerType, Task

DIFFICULTIES: tuple[int, ...] = (0, 1, 2)  # easy, medium, hard


class TaskSource(ABC):
    """A finite, deterministic, indexable sequence of tasks.

    Subclasses implement `__len__` and `_get(i)` (i already in range); indexing with negative
    numbers, iteration and `sample` come from here.
    """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _get(self, index: int) -> Task: ...

    def __getitem__(self, index: int) -> Task:
        n = len(self)
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"task sources are indexed by int, got {type(index).__name__}")
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"task index {index} is out of range: this source has {n} tasks (0..{n - 1})")
        return self._get(i)

    def __iter__(self) -> Iterator[Task]:
        for i in range(len(self)):
            yield self._get(i)

    def sample(self, rng: np.random.Generator) -> Task:
        """A task drawn uniformly with `rng` (the env passes its seeded generator)."""
        n = len(self)
        if n == 0:
            raise ValueError(f"cannot sample from an empty task source ({self!r})")
        return self._get(int(rng.integers(n)))


class ListSource(TaskSource):
    """A task source over an in-memory list of tasks."""

    def __init__(self, tasks: Sequence[Task]):
        tasks = list(tasks)
        for i, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(f"tasks[{i}] is {type(task).__name__}, expected cv_env.Task")
        self.tasks = tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def _get(self, index: int) -> Task:
        return self.tasks[index]

    def __repr__(self) -> str:
        return f"ListSource({len(self.tasks)} tasks)"


@dataclass
class Rendered:
    """What a generator's `render(params)` returns: a task's content plus its clean originals."""

    images: list[Image.Image]  # as shown to the model
    originals: list[Image.Image]  # pre-transform, pre-corruption renders (never shown)
    question: str
    answer: str
    answer_type: AnswerType
    transforms: list[str] = field(default_factory=list)
    bbox: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Category:
    """One generator category: its name, parameter sampler and renderer."""

    name: str
    sample: Callable[[np.random.Generator, int], dict]
    render: Callable[[dict], Rendered]
    description: str


def content_hash(params: dict) -> float:
    """A number in [0, 1) fixed by an item's content; it decides the item's split.

    The render seed is left out on purpose: two items that differ only in clutter or noise
    are the same question and must not straddle train and test.
    """
    key = {k: v for k, v in params.items() if k != "render_seed"}
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
