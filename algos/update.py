"""One optimizer step over a mini-batch split into micro-batches (gradient accumulation).

    stats = update_step(micro_batches, loss_fn, params, optimizer, scheduler, grad_clip=1.0, agg="token-mean")

Each micro-batch's loss is normalised by its own tokens (see `algos.losses.aggregate`);
`update_step` scales it by its share of the mini-batch's tokens (or sequences, for the seq-mean
modes), summed over all data-parallel ranks, so the gradient is the exact aggregate over the
whole mini-batch whatever the micro-batch size or number of ranks. GRPO, PPO and SFT all step
through it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from algos.distributed import all_reduce_gradients, all_reduce_max, all_reduce_sum, all_reduce_sums, get_world_size

__all__ = ["loss_weight", "optimizer_step", "update_step", "mean_metrics"]


def loss_weight(mask_BT: Tensor, agg: str) -> float:
    """What a micro-batch's aggregated loss averages over: its loss tokens for "token-mean",
    its sequences with at least one loss token for the seq-mean modes."""
    mask_BT = mask_BT > 0
    if agg == "token-mean":
        return float(mask_BT.sum())
    return float(mask_BT.any(dim=1).sum())


def optimizer_step(params: Sequence[Tensor], optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float,
                   sync_gradients: bool = True) -> tuple[float, float]:
    """Step on the gradients the parameters hold: average them over ranks (`sync_gradients`, for
    models not wrapped in DDP/FSDP), clip their global norm to `grad_clip`, step the optimizer
    and the schedule, clear them. Returns (the norm before clipping, the lr of this step).

    A non-finite gradient skips the optimizer step (it would destroy the weights); the schedule
    still advances, and the caller sees the norm.
    """
    if sync_gradients:
        all_reduce_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    if torch.isfinite(grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), float(lr)


def update_step(
    micro_batches: Sequence[Mapping[str, Any]],
    loss_fn: Callable[[Mapping[str, Any]], tuple[Tensor, Mapping[str, Tensor]]],
    params: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    grad_clip: float,
    agg: str,
    sync_gradients: bool = True,
    metric_names: Sequence[str] | None = None,
    lockstep: bool = False,
) -> dict[str, float] | None:
    """One optimizer step over a mini-batch given as micro-batches; call on every rank together.

    Args:
        micro_batches: one mapping per micro-batch with its "loss_mask" [B, T] (1 at tokens in
            the loss), which sets the accumulation weights before any forward pass; anything else
            in it is for `loss_fn` (the collated tensors, or what to collate them from). A rank may
            pass none (its share of the mini-batch was filtered out): it then contributes a zero
            gradient.
        loss_fn: micro-batch -> (loss aggregated over that micro-batch with `agg`, metrics as
            0-dim tensors).
        params: the trainable parameters (gradient clipping and, with `sync_gradients`, averaging).
        grad_clip: max global gradient norm.
        agg: the loss aggregation mode `loss_fn` uses (decides the accumulation weights).
        sync_gradients: average gradients over ranks here (models not wrapped in DDP/FSDP).
        lockstep: run equally many forward/backward passes on every rank, as an FSDP2 model
            needs (each pass gathers its weights and reduces its gradients, collectives that all
            ranks join): micro-batches without loss tokens still run, and a rank with fewer
            micro-batches runs its first one again; such passes are scaled by 0. Every rank must
            then pass at least one micro-batch (its loss_fn collating real tokens).
        metric_names: the names `loss_fn` reports; given, the metrics are averaged over every
            rank's micro-batches (a rank without loss tokens reports none of its own). Needed
            under data parallelism so every rank returns the same names.

    Returns:
        Metrics averaged over the mini-batch with the same weights as the loss, plus
        "grad_norm" (before clipping) and "lr" (of this step); None when no rank had any loss
        token (no optimizer step is taken).
    """
    if lockstep and not micro_batches:
        raise ValueError("update_step(lockstep=True) needs at least one micro-batch on every rank: pass one "
                         "with a zero loss_mask (it runs scaled by 0) where this rank has nothing to train on")
    weights = [loss_weight(micro["loss_mask"], agg) for micro in micro_batches]
    local_total = sum(weights)
    # The ranks' gradients are averaged, so a rank's micro-batch weighs world * w / global total.
    global_total = all_reduce_sum(local_total)
    if global_total == 0:
        return None
    world = get_world_size()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    passes = [(micro, weight) for micro, weight in zip(micro_batches, weights) if weight > 0 or lockstep]
    if lockstep:
        passes += [(micro_batches[0], 0.0)] * (all_reduce_max(len(micro_batches)) - len(micro_batches))
    for micro, weight in passes:
        loss, metrics = loss_fn(micro)
        scale = weight * world / global_total
        (loss * scale).backward()
        for name, value in metrics.items():
            sums[name] += float(value) * weight
    grad_norm, lr = optimizer_step(params, optimizer, scheduler, grad_clip, sync_gradients)
    names = sorted(sums) if metric_names is None else list(metric_names)
    totals = [sums[name] for name in names] + [local_total]
    if metric_names is not None:
        totals = all_reduce_sums(totals)
    out = {name: value / totals[-1] for name, value in zip(names, totals)} if totals[-1] else {}
    out.update(grad_norm=grad_norm, lr=lr)
    return out


def mean_metrics(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average each key over the records that have it."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        for name, value in record.items():
            sums[name] += float(value)
            counts[name] += 1
    return {name: sums[name] / counts[name] for name in sums}
