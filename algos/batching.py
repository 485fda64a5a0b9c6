"""Mini-batches of a step's trajectories, group by group, and padded per-token rows.

    for members in group_minibatches(groups, prompts_per_update=4, epochs=2, seed=0): ...
    advantages_BT = pad_rows([advantages_T, ...], width)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from agents.trajectory import TrajectoryGroup

__all__ = ["group_minibatches", "pad_rows"]


def group_minibatches(groups: Sequence[TrajectoryGroup], prompts_per_update: int, epochs: int, seed: int,
                      keep: Sequence[bool] | None = None) -> Iterator[list[int]]:
    """The trajectory indices (in `flatten_groups(groups)` order) of each mini-batch of an update
    phase: `epochs` passes over the groups, `prompts_per_update` groups a mini-batch.

    The first pass keeps the groups' order; later ones shuffle the groups with a local generator
    seeded by (seed, epoch), so the order is reproducible and the global RNG (checkpointed) is
    left alone. keep: leave out the trajectories marked False. A step without trajectories still
    yields one empty mini-batch per epoch, so every data-parallel rank takes the same number of
    optimizer steps.
    """
    if prompts_per_update < 1:
        raise ValueError(f"prompts_per_update must be >= 1, got {prompts_per_update}")
    starts = np.cumsum([0] + [len(group) for group in groups])
    members = [range(starts[g], starts[g + 1]) for g in range(len(groups))]
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(members)) if epoch else range(len(members))
        ordered = [members[g] for g in order]
        for start in range(0, max(1, len(ordered)), prompts_per_update):
            yield [int(i) for group in ordered[start:start + prompts_per_update] for i in group
                   if keep is None or keep[i]]


def pad_rows(rows: Sequence[Sequence[float] | Tensor], width: int | None = None) -> Tensor:
    """[len(rows), width] float32 on the CPU: each 1-D row at the left, zeros after it
    (width: default the longest row)."""
    width = max((len(row) for row in rows), default=0) if width is None else width
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out
