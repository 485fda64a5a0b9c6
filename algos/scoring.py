"""Per-token figures of whole trajectories without gradients: the log-probs a trainer scores
before its update (the reference's for KL, the trainer's own when another engine sampled).

    logprobs = score_trajectories(policy, trajectories, micro_batch_size=8)             # 1-D each
    ref_logprobs = score_trajectories(policy, trajectories, 8, reference=reference)
    values = score_rows(policy, trajectories, 8, lambda batch: critic.values(batch))   # any [B, T] figure
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from agents.policy import Policy

__all__ = ["score_rows", "score_trajectories"]


def score_rows(policy: Policy, trajectories: Sequence[Any], micro_batch_size: int,
               forward: Callable[[dict[str, Any]], Sequence[Tensor]],
               modules: Sequence[torch.nn.Module] = ()) -> list[list[Tensor]]:
    """Run `forward` on the collated trajectories, `micro_batch_size` at a time, in eval mode and
    without gradients; cut each [B, T] tensor it returns into one 1-D CPU row per trajectory, of
    its length. Returns one list of rows per tensor `forward` returns.

    modules: more modules besides the policy to hold in eval mode meanwhile (a separate critic).
    """
    out: list[list[Tensor]] | None = None
    held = [policy.model, *modules]
    was_training = [m.training for m in held]
    for m in held:
        m.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(trajectories), micro_batch_size):
                chunk = trajectories[start:start + micro_batch_size]
                tensors_BT = forward(policy.collate(chunk))
                out = out or [[] for _ in tensors_BT]
                for rows, tensor_BT in zip(out, tensors_BT):
                    rows.extend(tensor_BT[b, :len(t.token_ids)].cpu() for b, t in enumerate(chunk))
    finally:
        for m, training in zip(held, was_training):
            m.train(training)
    return out or []


def score_trajectories(policy: Policy, trajectories: Sequence[Any], micro_batch_size: int,
                       reference: Policy | None = None) -> list[Tensor]:
    """Log-probs of each trajectory's tokens (1-D, target-aligned, 0 off the loss mask), no grad.

    reference: score with this frozen policy; `reference is policy` under LoRA means the base
    model with the adapters disabled.
    """
    def forward(batch: dict[str, Any]) -> tuple[Tensor]:
        if reference is not None and reference is policy:
            with policy.with_adapter_disabled():
                return (policy.logprobs(batch)[0],)
        return ((reference or policy).logprobs(batch)[0],)

    rows = score_rows(policy, trajectories, micro_batch_size, forward)
    return rows[0] if rows else []
