"""The pieces of a policy-gradient trainer that GRPO and PPO share, free of either algorithm.

    seed_everything(cfg.trainer.seed + rank)
    policy = load_policy(cfg, device)                        # + load_policy(..., trainable=False): a reference
    sampler = PromptSampler(len(tasks), seed=0)             # data position; checkpointed
    indices = sampler.draw(64)                               # the next 64 prompts, epoch by epoch
    logprobs = score_trajectories(policy, trajectories, micro_batch_size=8)   # no grad, 1-D each
    for members in group_minibatches(trajectories, prompts_per_update=4, epochs=2, seed=0): ...
    optimizer = build_optimizer(policy.named_parameters(), cfg.algo)
    scheduler = build_scheduler(optimizer, cfg.algo, total_updates)
    stats = update_step(micro_batches, loss_fn, params, optimizer, scheduler, grad_clip=1.0, agg="token-mean")

`update_step` is one optimizer step over a mini-batch split into micro-batches (gradient
accumulation). Each micro-batch's loss is normalised by its own tokens (see
`algos.losses.aggregate`); `update_step` scales it by its share of the mini-batch's tokens (or
sequences, for the seq-mean modes), summed over all data-parallel ranks, so the gradient is the
exact aggregate over the whole mini-batch whatever the micro-batch size or number of ranks.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from agents.policy import Policy
from algos.distributed import get_world_size, is_distributed

__all__ = [
    "seed_everything",
    "load_policy",
    "score_trajectories",
    "PromptSampler",
    "group_minibatches",
    "pad_rows",
    "build_optimizer",
    "build_scheduler",
    "loss_weight",
    "all_reduce_gradients",
    "optimizer_step",
    "update_step",
    "mean_metrics",
    "gather_lists",
]


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (checkpoints save and restore them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_policy(cfg: Any, device: torch.device, trainable: bool = True) -> Policy:
    """The policy of `cfg.model` (LoRA / frozen vision tower when asked); `trainable=False`
    gives the frozen reference copy (no adapters, eval mode, no gradients)."""
    m = cfg.model
    lora = None
    if trainable and m.lora.enabled:
        lora = {"r": m.lora.r, "alpha": m.lora.alpha, "dropout": m.lora.dropout,
                "target_modules": list(m.lora.target_modules)}
    policy = Policy.load(
        m.path, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing and trainable, lora=lora,
        freeze_vision=m.freeze_vision and trainable, chat_template=m.chat_template,
        tool_response_format=m.tool_response_format,
    )
    if not trainable:
        policy.eval()
        for p in policy.model.parameters():
            p.requires_grad_(False)
    return policy


def score_trajectories(policy: Policy, trajectories: Sequence[Any], micro_batch_size: int,
                       reference: Policy | None = None) -> list[Tensor]:
    """Log-probs of each trajectory's tokens (1-D, target-aligned, 0 off the loss mask), no grad.

    reference: score with this frozen policy; `reference is policy` under LoRA means the base
    model with the adapters disabled.
    """
    scorer = reference or policy
    out: list[Tensor] = []
    was_training = policy.model.training
    policy.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(trajectories), micro_batch_size):
                chunk = trajectories[start:start + micro_batch_size]
                batch = policy.collate(chunk)
                if reference is not None and reference is policy:
                    with policy.with_adapter_disabled():
                        logprobs_BT, _ = policy.logprobs(batch)
                else:
                    logprobs_BT, _ = scorer.logprobs(batch)
                out.extend(logprobs_BT[b, :len(t.token_ids)].cpu() for b, t in enumerate(chunk))
    finally:
        policy.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# Data position
# --------------------------------------------------------------------------------------------


class PromptSampler:
    """Draws prompt indices from a task source of `num_tasks` items: a fresh seeded permutation
    per epoch, consumed in order, so every task is seen once per epoch and a resumed run
    continues from the exact next prompt (`state_dict` / `load_state_dict`, JSON-ready).
    """

    def __init__(self, num_tasks: int, seed: int = 0):
        if num_tasks < 1:
            raise ValueError(f"the training task source is empty (0 tasks): check env.tasks and env.split")
        self.num_tasks = int(num_tasks)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_tasks)

    def draw(self, count: int) -> list[int]:
        """The next `count` task indices (crossing into the next epoch's order when needed)."""
        if count < 1:
            raise ValueError(f"draw needs count >= 1, got {count}")
        out: list[int] = []
        while len(out) < count:
            order = self._order(self.epoch)
            take = min(count - len(out), self.num_tasks - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_tasks:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"num_tasks": self.num_tasks, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_tasks"]) != self.num_tasks or int(state["seed"]) != self.seed:
            raise ValueError(
                f"the checkpoint's prompt order was over {state['num_tasks']} tasks with seed {state['seed']}, but this "
                f"run has {self.num_tasks} tasks with seed {self.seed}: resume with the same env.tasks, env.split and "
                "trainer.seed, or start a new run (trainer.resume=never or another trainer.output_dir)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def group_minibatches(trajectories: Sequence[Any], prompts_per_update: int, epochs: int, seed: int,
                      keep: Sequence[bool] | None = None) -> Iterator[list[int]]:
    """The trajectory indices of each mini-batch of an update phase: `epochs` passes over the
    groups (`group_id`, in order of first appearance), `prompts_per_update` groups a mini-batch.

    The first pass keeps the rollout order; later ones shuffle the groups with a local generator
    seeded by (seed, epoch), so the order is reproducible and the global RNG (checkpointed) is
    left alone. keep: leave out the trajectories marked False. A step without trajectories still
    yields one empty mini-batch per epoch, so every data-parallel rank takes the same number of
    optimizer steps.
    """
    if prompts_per_update < 1:
        raise ValueError(f"prompts_per_update must be >= 1, got {prompts_per_update}")
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.group_id, []).append(i)
    group_lists = list(groups.values())
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(group_lists)) if epoch else range(len(group_lists))
        ordered = [group_lists[g] for g in order]
        for start in range(0, max(1, len(ordered)), prompts_per_update):
            yield [i for group in ordered[start:start + prompts_per_update] for i in group if keep is None or keep[i]]


def pad_rows(rows: Sequence[Sequence[float] | Tensor], width: int | None = None) -> Tensor:
    """[len(rows), width] float32 on the CPU: each 1-D row at the left, zeros after it
    (width: default the longest row)."""
    width = max((len(row) for row in rows), default=0) if width is None else width
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# --------------------------------------------------------------------------------------------


def build_optimizer(named_parameters: Iterable[tuple[str, Tensor]], algo: Any) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm scales (1-D).

    algo: an `AlgoConfig` (lr, weight_decay, adam_betas).
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


# --------------------------------------------------------------------------------------------
# One optimizer step with gradient accumulation
# --------------------------------------------------------------------------------------------


def loss_weight(mask_BT: Tensor, agg: str) -> float:
    """What a micro-batch's aggregated loss averages over: its loss tokens for "token-mean",
    its sequences with at least one loss token for the seq-mean modes."""
    mask_BT = mask_BT > 0
    if agg == "token-mean":
        return float(mask_BT.sum())
    return float(mask_BT.any(dim=1).sum())


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL moves CUDA tensors only


def _global_sum(value: float) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def _global_max(value: int) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_gradients(params: Sequence[Tensor], bucket_bytes: int = 256 * 2**20) -> None:
    """Average gradients over data-parallel ranks (a parameter without a gradient counts as 0).

    For models that are not wrapped in DDP/FSDP (whose hooks already reduce): every rank must
    call it with the same parameters in the same order. Gradients travel in flat buckets of
    about `bucket_bytes` (one collective per bucket, not per tensor). No-op in one process.
    """
    if not is_distributed():
        return
    world = get_world_size()
    grads = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    buckets: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[]])
    for grad in grads:
        bucket = buckets[(grad.dtype, grad.device)]
        if bucket[-1] and sum(g.numel() * g.element_size() for g in bucket[-1]) >= bucket_bytes:
            bucket.append([])
        bucket[-1].append(grad)
    for bucket_list in buckets.values():
        for bucket in bucket_list:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()


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
    global_total = _global_sum(local_total)
    if global_total == 0:
        return None
    world = get_world_size()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    passes = [(micro, weight) for micro, weight in zip(micro_batches, weights) if weight > 0 or lockstep]
    if lockstep:
        passes += [(micro_batches[0], 0.0)] * (_global_max(len(micro_batches)) - len(micro_batches))
    for micro, weight in passes:
        loss, metrics = loss_fn(micro)
        scale = weight * world / global_total
        (loss * scale).backward()
        for name, value in metrics.items():
            sums[name] += float(value) * weight
    grad_norm, lr = optimizer_step(params, optimizer, scheduler, grad_clip, sync_gradients)
    names = sorted(sums) if metric_names is None else list(metric_names)
    totals = [sums[name] for name in names] + [local_total]
    if metric_names is not None and is_distributed():
        reduced = torch.tensor(totals, dtype=torch.float64, device=_device())
        dist.all_reduce(reduced)
        totals = reduced.tolist()
    out = {name: value / totals[-1] for name, value in zip(names, totals)} if totals[-1] else {}
    out.update(grad_norm=grad_norm, lr=lr)
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def gather_lists(items: Sequence[Any]) -> list[Any]:
    """Concatenate every rank's list of picklable items, in rank order (on every rank).

    For per-episode summaries, whose metric names (categories, ops) differ between ranks and so
    cannot be averaged key by key. Returns the list unchanged in one process.
    """
    if not is_distributed():
        return list(items)
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for rank_items in gathered for item in rank_items]


def mean_metrics(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average each key over the records that have it."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        for name, value in record.items():
            sums[name] += float(value)
            counts[name] += 1
    return {name: sums[name] / counts[name] for name in sums}
