"""Task sources: the built-in procedural suite, the robustness wrapper, CodeVision-RL parquet I/O.

    from cv_env.tasks import load_tasks
    src = load_tasks("synthetic", split="test", seed=0)   # or a category, a .parquet path, a list
    task = src[0]; task = src.sample(np.random.default_rng(0))

Categories (`CATEGORIES`): orientation_ocr, tiny_ocr, corruption, charts, shapes_space,
multi_image, orientation_diagnostic (the default mix), glyph_orientation and corner_orientation
(learning experiments). `oracle.oracle_solution(task)` gives the reward-maximising tool calls.

Conventions every source follows:
* `transforms` lists what was applied to the upright original to make the shown image
  (`rotate_90/180/270` counter-clockwise as `Image.rotate(d, expand=True)`, `flip_horizontal`,
  `flip_vertical`), plus "crop" when the answer needs a crop at `bbox` (shown-frame pixels of
  image 0). No geometric fix needed: `transforms == []`.
* A corruption (dark, low contrast, noise, blur) is not a transform: `extra["corruption"]`
  and `extra["severity"]` record it.
* multi_image: `transforms` describes image `extra["transform_image"]`.
* orientation_diagnostic records its applied transform too (its inverse is the verifying op);
  `extra["orientation_is_answer"]` marks that the answer changes with the orientation.
* Generated tasks keep their parameters in `extra["generator"]` (they determine the answer:
  never show `extra` to the model); `render_original(task)` re-renders the clean originals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cv_env.task import Task
from cv_env.tasks.base import ListSource, TaskSource
from cv_env.tasks.parquet import LOAD_OPTIONS, MalformedRowError, read_parquet, write_parquet
from cv_env.tasks.robustness import ROBUSTNESS_VARIANTS, RobustnessWrapper
from cv_env.tasks.suite import CATEGORIES, DEFAULT_MIX, SPLITS, SyntheticSuite, render_original

# The options `load_tasks` passes on, by kind of source (`task_options` / `env.tasks_options`).
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "parquet": tuple(LOAD_OPTIONS),
    "synthetic": ("size", "difficulty"),
}

__all__ = [
    "CATEGORIES", "DEFAULT_MIX", "SPLITS", "ROBUSTNESS_VARIANTS", "TASK_OPTIONS", "ListSource", "MalformedRowError",
    "RobustnessWrapper", "SyntheticSuite", "TaskSource", "load_tasks", "read_parquet", "render_original",
    "write_parquet",
]


def load_tasks(spec: Any = "synthetic", split: str = "train", seed: int = 0, **kwargs) -> TaskSource:
    """Resolve a task specification into a `TaskSource`.

    `spec` is one of: "synthetic" (the default suite); a category name or comma-separated names
    ("orientation_ocr", "charts,tiny_ocr"); a path to a .parquet file, a glob or a directory of
    them; a `TaskSource` (returned as is); or a list of `Task`. `split` and `seed` select the
    synthetic items; extra keyword arguments are the source's options (`TASK_OPTIONS`): size and
    difficulty for `SyntheticSuite`; on_error, crop_from_bbox, image_column and answer_field for
    `read_parquet`. An option set to None keeps its default; one the source does not take is an
    error that names the options it does take.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if isinstance(spec, TaskSource) or (isinstance(spec, (list, tuple)) and all(isinstance(t, Task) for t in spec)):
        if kwargs:
            raise ValueError(f"task options {sorted(kwargs)} apply to a source that load_tasks opens (synthetic or "
                             "parquet), not to a given TaskSource or list of tasks: drop them")
        return spec if isinstance(spec, TaskSource) else ListSource(spec)
    if isinstance(spec, Path) or (isinstance(spec, str) and (spec.endswith(".parquet") or Path(spec).is_dir()
                                                              or any(c in spec for c in "*?["))):
        return read_parquet(spec, **_options(kwargs, "parquet"))
    if isinstance(spec, str):
        kwargs = _options(kwargs, "synthetic")
        name = spec.strip()
        if name in ("synthetic", "default"):
            return SyntheticSuite(None, split=split, seed=seed, **kwargs)
        names = [n.strip() for n in name.split(",")]
        if all(n in CATEGORIES for n in names):
            return SyntheticSuite(names, split=split, seed=seed, **kwargs)
        raise ValueError(
            f"unknown task spec {spec!r}: use 'synthetic', a category ({', '.join(CATEGORIES)}), "
            "a .parquet path, a TaskSource or a list of cv_env.Task"
        )
    raise TypeError(f"cannot load tasks from a {type(spec).__name__}; expected a str, Path, TaskSource or list of Task")


def _options(kwargs: dict[str, Any], kind: str) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(TASK_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"task option(s) {unknown} do not apply to a {kind} source; it takes: "
                         f"{', '.join(TASK_OPTIONS[kind])}")
    return kwargs
