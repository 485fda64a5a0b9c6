"""The optimizer and its learning-rate schedule, as every trainer builds them.

    optimizer = build_optimizer(policy.named_parameters(), cfg.algo)   # AdamW, no decay on 1-D params
    scheduler = build_scheduler(optimizer, cfg.algo, total_updates)     # warmup, then constant | linear | cosine

`cfg.algo` is any config with the `algos.config.OptimConfig` fields (lr, warmup_steps,
weight_decay, adam_betas, scheduler): GRPO's, PPO's (and its critic's), SFT's.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(named_parameters: Iterable[tuple[str, Tensor]], algo: Any) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm scales (1-D).

    algo: an `OptimConfig` (lr, weight_decay, adam_betas).
    """
    decay, no_decay = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the policy has no trainable parameters: check model.lora and model.freeze_vision")
    groups = [{"params": decay, "weight_decay": algo.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=algo.lr, betas=tuple(algo.adam_betas))


def build_scheduler(optimizer: torch.optim.Optimizer, algo: Any, total_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `algo.warmup_steps` optimizer steps, then constant, linear or cosine
    decay to 0 at `total_updates` (the number of optimizer steps of the whole run)."""
    warmup, kind = int(algo.warmup_steps), algo.scheduler
    horizon = max(1, int(total_updates) - warmup)

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        progress = min(1.0, (update - warmup) / horizon)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"algo.scheduler {kind!r} is not one of constant, linear, cosine")

    factor(warmup)  # an unknown kind fails here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
