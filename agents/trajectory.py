"""`Trajectory`: one finished episode as the trainer sees it, and its JSONL (+ PNG) form.

Everything is per token and target-aligned with the log-prob convention of `agents.logprobs`:
`loss_mask[t] == 1` exactly where the model sampled `token_ids[t]`, and `sampler_logprobs[t]`
is the log-prob the sampler gave it. Each env step's reward sits in `token_rewards` at the last
sampled token of its turn (`turn_ends`), so `sum(token_rewards) == reward`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image

from agents.jsonl import json_lines, safe_name


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One episode: tokens, masks, sampler log-probs, rewards, images and metadata.

    token_ids / loss_mask / sampler_logprobs / token_rewards: one entry per token.
    turn_ends[i]: index of the last sampled token of assistant turn i; turn_rewards[i] its reward.
    images: the images whose placeholders appear in token_ids, in order (what the model saw);
    image_grid_thw: their patch grids; pixel_values: the processor's patches for them (None after
    reading JSONL: `Policy.collate` recomputes them from `images`, deterministically).
    truncated: the episode ended without an answer, by the turn limit ("max_turns"), the
    total-token budget ("token_budget") or an exception ("error"), named in `truncation`.
    error: for truncation "error", the exception that ended the episode (its turn could not be
    stepped or rendered); trainers leave such trajectories out of the loss.
    temperature: the sampling temperature (log-probs are of the temperature-scaled distribution;
    1.0 for greedy decoding).
    used_ops / num_failed_calls / turn_ops: what the env saw the code do (`info["used_ops"]`,
    `info["n_failed"]`, each step's `info["ops"]`), for tool metrics and the viewer.
    judge: the LLM judge's ruling on the answer (`info["judge"]`), {} when it was not asked.
    """

    task_id: str
    group_id: str
    category: str
    token_ids: list[int]
    loss_mask: list[int]
    sampler_logprobs: list[float]
    token_rewards: list[float]
    turn_ends: list[int]
    turn_rewards: list[float]
    reward: float
    reward_components: dict[str, float]
    images: list[Image.Image]
    image_grid_thw: list[list[int]]
    pixel_values: torch.Tensor | None
    success: bool
    num_turns: int
    num_tool_calls: int
    truncated: bool
    truncation: str
    prompt_length: int
    temperature: float = 1.0
    sample_index: int = 0
    answer: str | None = None
    used_ops: list[str] = field(default_factory=list)  # ops of the episode's successful executions
    num_failed_calls: int = 0  # tool calls that failed (bad code, timeouts, malformed calls)
    turn_ops: list[list[str]] = field(default_factory=list)  # turn i's detected ops ([] for answers/failures)
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""
    judge: dict[str, Any] = field(default_factory=dict)  # correct, rule, source, latency_s

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_sampled_tokens(self) -> int:
        return int(sum(self.loss_mask))

    def to_json(self, image_paths: list[str] | None = None) -> dict[str, Any]:
        """A JSON-safe dict; images are referenced by `image_paths` (written by `write_jsonl`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("images", "pixel_values")}
        out["images"] = list(image_paths) if image_paths is not None else []
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], base_dir: str | os.PathLike = ".") -> "Trajectory":
        """Inverse of `to_json`; image paths are read relative to `base_dir`."""
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"pixel_values", "temperature", "sample_index", "answer", "timings",
                                        "used_ops", "num_failed_calls", "turn_ops", "error", "judge"})
        if missing:
            raise ValueError(f"trajectory record is missing field(s) {missing}: was it written by write_jsonl?")
        kwargs = {k: v for k, v in data.items() if k in names and k not in ("images", "pixel_values")}
        images = []
        for path in data.get("images", []):
            with Image.open(Path(base_dir) / path) as image:
                images.append(image.convert("RGB"))
        return cls(images=images, pixel_values=None, **kwargs)


def write_jsonl(trajectories: Iterable[Trajectory], path: str | os.PathLike, image_dir: str | None = None) -> Path:
    """Write one JSON line per trajectory to `path`; images go to PNG files beside it.

    image_dir: folder for the PNGs, relative to the JSONL's folder (default "<stem>_images").
    Appends when `path` exists, so a run can stream batches into one file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = image_dir or f"{path.stem}_images"
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for trajectory in trajectories:
            group = "" if trajectory.group_id == trajectory.task_id else f"{trajectory.group_id}-"
            stem = safe_name(f"{group}{trajectory.task_id}-{trajectory.sample_index}")
            paths = []
            for i, image in enumerate(trajectory.images):
                relative = f"{image_dir}/{stem}-{i}.png"
                image.save(path.parent / relative)  # PNG is lossless: pixels (and pixel_values) round-trip
                paths.append(relative)
            f.write(json.dumps(trajectory.to_json(paths)) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[Trajectory]:
    """Read the trajectories `write_jsonl` wrote (images loaded from their PNG files)."""
    path = Path(path)
    return [Trajectory.from_json(data, base_dir=path.parent) for data in json_lines(path)]
