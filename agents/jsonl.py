"""Trajectories (and their transcripts) as JSON lines, images as PNG files beside them. No torch.

    write_jsonl(trajectories, "run/demos.jsonl")        # appends; PNGs in run/demos_images/
    trajectories = read_jsonl("run/demos.jsonl")
    write_jsonl(transcripts, "eval/model.jsonl")         # a Transcript adds its task context
    transcripts = read_transcripts("eval/model.jsonl")

One record per episode: the `Trajectory`'s fields with its turns nested, every image a relative
PNG path (PNG is lossless: pixels, and so `pixel_values`, round-trip). `pixel_values` is not
written (`Policy.collate` recomputes it from the images). A `Transcript` record is its
trajectory's plus the fields of its task context (ground_truth, agent, variant, base_id).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from agents.trajectory import Trajectory, Turn

_NOT_WRITTEN = ("prompt_images", "turns", "pixel_values")
_REQUIRED = ("task_id", "group_id", "category", "prompt_text", "turns")


def trajectory_to_json(trajectory: Trajectory, image_paths: list[list[str]] | None = None) -> dict[str, Any]:
    """A JSON-safe dict; image_paths[0] are the prompt images' paths, image_paths[1 + i] turn i's."""
    paths = image_paths or [[] for _ in range(1 + len(trajectory.turns))]
    out = {f.name: getattr(trajectory, f.name) for f in dataclasses.fields(trajectory) if f.name not in _NOT_WRITTEN}
    out["prompt_images"] = list(paths[0])
    out["turns"] = [{**{f.name: getattr(turn, f.name) for f in dataclasses.fields(turn) if f.name != "reply_images"},
                     "reply_images": list(paths[1 + i])} for i, turn in enumerate(trajectory.turns)]
    return json.loads(json.dumps(out))  # tuples become lists: the dict equals what a reader sees


def trajectory_from_json(data: dict[str, Any], base_dir: str | os.PathLike = ".") -> Trajectory:
    """Inverse of `trajectory_to_json`; image paths are read relative to `base_dir`."""
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise ValueError(f"trajectory record is missing field(s) {missing}: was it written by write_jsonl?")
    names = {f.name for f in dataclasses.fields(Trajectory)} - set(_NOT_WRITTEN)
    kwargs = {k: v for k, v in data.items() if k in names}
    for key in ("prompt_ids", "used_ops"):
        kwargs[key] = tuple(kwargs.get(key, ()))
    kwargs["image_grid_thw"] = [list(g) for g in kwargs.get("image_grid_thw", [])]
    turn_names = {f.name for f in dataclasses.fields(Turn)}
    turns = []
    for record in data["turns"]:
        fields = {k: v for k, v in record.items() if k in turn_names and k != "reply_images"}
        for key in ("sampled_ids", "logprobs", "context_ids", "ops"):
            fields[key] = tuple(fields.get(key, ()))
        turns.append(Turn(**fields, reply_images=tuple(_load_images(record.get("reply_images", []), base_dir))))
    return Trajectory(**kwargs, prompt_images=tuple(_load_images(data.get("prompt_images", []), base_dir)),
                      turns=tuple(turns))


def write_jsonl(records: Iterable[Any], path: str | os.PathLike, image_dir: str | None = None) -> Path:
    """Write one JSON line per `Trajectory` or `agents.transcript.Transcript` to `path`.

    image_dir: folder for the PNGs, relative to the JSONL's folder (default "<stem>_images").
    Appends when `path` exists, so a run can stream batches into one file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = image_dir or f"{path.stem}_images"
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            trajectory = getattr(record, "trajectory", record)
            context = record.context() if hasattr(record, "context") else {}
            group = "" if trajectory.group_id == trajectory.task_id else f"{trajectory.group_id}-"
            agent = f"{context['agent']}-" if context.get("agent") else ""
            stem = safe_name(f"{agent}{group}{trajectory.task_id}-{trajectory.sample_index}")
            paths = []
            for key, images in [("input", trajectory.prompt_images)] + [
                    (f"turn{i}", turn.reply_images) for i, turn in enumerate(trajectory.turns)]:
                paths.append([])
                for j, image in enumerate(images):
                    relative = f"{image_dir}/{stem}-{key}-{j}.png"
                    image.save(path.parent / relative)
                    paths[-1].append(relative)
            f.write(json.dumps({**trajectory_to_json(trajectory, paths), **context}, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[Trajectory]:
    """Read the trajectories `write_jsonl` wrote (images loaded from their PNG files)."""
    path = Path(path)
    return [trajectory_from_json(data, base_dir=path.parent) for data in json_lines(path)]


def json_lines(path: str | os.PathLike):
    """Yield the JSON object of each non-empty line; a bad line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON line ({error.msg})") from error


def safe_name(text: str) -> str:
    """A file-name-safe stem for `text` (used for image files next to a JSONL)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]


def _load_images(paths: list[str], base_dir: str | os.PathLike) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(Path(base_dir) / path) as image:
            images.append(image.convert("RGB"))
    return images
