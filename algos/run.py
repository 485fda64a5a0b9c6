"""The run skeleton every trainer shares, as plain functions: set-up, resume, tracker, the
schedule of validations and checkpoints, and the summary at the end. The trainers (`algos.grpo`,
`algos.ppo`, `algos.sft`) call these around their algorithm:

    start = start_run(cfg, total_steps=cfg.trainer.total_steps)   # ranks, resume plan, seeds
    if start.point.finished:
        return finished(start, "GRPO")
    policy = load_policy(cfg, start.device)
    reference = load_reference(cfg, policy, start.device)          # None without a KL term
    ...                                                             # optimizer, data, sampler
    start_step = resume(start, policy.model, optimizer, scheduler, sampler)
    with contextlib.ExitStack() as cleanup:
        tracker = open_tracker(cfg, start, cleanup, total_steps, start_step)
        for step in range(start_step + 1, total_steps + 1):
            ...                                                     # the algorithm
            if due(step, cfg.trainer.save_every, total_steps):
                save(cfg, step, policy.model, optimizer, scheduler, sampler)
    return finish(start, "GRPO", tracker, step, last_metrics, figures=(...), checkpoint_note="...")

`cfg` is any trainer config (`GRPOConfig`, `PPOConfig`, `SFTConfig`): these read its `model`,
`trainer` (seed, resume, output_dir, save_every, keep_last) and `logger` blocks only.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from agents.policy import Policy
from algos.checkpoint import ResumePoint, finished_run, list_checkpoints, load_checkpoint, plan_resume, save_checkpoint
from algos.config import config_to_dict
from algos.distributed import destroy_distributed, init_distributed, is_main
from algos.prompt_sampler import PromptSampler
from algos.tracking import Tracker, print_run_summary, say

__all__ = ["RunStart", "seed_everything", "start_run", "finished", "load_policy", "load_reference", "resume",
           "open_tracker", "due", "timed", "save", "finish"]


@dataclass(frozen=True)
class RunStart:
    """Where this process begins a run: its rank among `world`, its device, the run folder and
    the checkpoint it resumes from (`point.checkpoint`, None for a fresh run)."""

    rank: int
    world: int
    device: torch.device
    output_dir: Path
    point: ResumePoint


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (checkpoints save and restore them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(cfg: Any, total_steps: int | None, shares: Mapping[str, int] | None = None) -> RunStart:
    """Join the ranks `torchrun` started, plan the resume and seed this rank's generators.

    total_steps: the run's length, or None when it is known only once the data is read (SFT:
    the caller then compares `point.step` with it). shares: batch sizes each rank takes an equal
    share of, by config key; each must divide by the number of ranks. A run folder whose
    checkpoint was written with other settings stops here (`algos.checkpoint.plan_resume`),
    before any weights are read.
    """
    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    for key, value in (shares or {}).items():
        if value % world:
            raise ValueError(f"{key}={value} must be divisible by the number of ranks ({world}): each rank takes an equal share")
    t = cfg.trainer
    output_dir = Path(t.output_dir)
    point = plan_resume(t.resume, output_dir, config_to_dict(cfg), total_steps)
    seed_everything(t.seed + rank)
    return RunStart(rank, world, dist_info.device, output_dir, point)


def finished(start: RunStart, algorithm: str) -> dict[str, Any]:
    """The summary of a run that already reached its last step (nothing is trained); leaves the ranks."""
    destroy_distributed()
    return finished_run(algorithm, start.point, start.output_dir)


def load_policy(cfg: Any, device: torch.device | str, trainable: bool = True) -> Policy:
    """The policy of `cfg.model` (LoRA / frozen vision tower when asked); `trainable=False`
    gives the frozen reference copy (no adapters, eval mode, no gradients)."""
    m = cfg.model
    policy = Policy.load(
        m.path, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing and trainable,
        lora=m.lora.adapter_kwargs() if trainable else None,
        freeze_vision=m.freeze_vision and trainable, chat_template=m.chat_template,
        tool_response_format=m.tool_response_format,
    )
    if not trainable:
        policy.eval()
        for p in policy.model.parameters():
            p.requires_grad_(False)
    return policy


def load_reference(cfg: Any, policy: Policy, device: torch.device | str) -> Policy | None:
    """The frozen reference policy of the KL term (`algo.kl.coef > 0`), else None. Under LoRA the
    reference is the policy itself with its adapters disabled (`algos.scoring.score_trajectories`)."""
    if cfg.algo.kl.coef <= 0:
        return None
    return policy if policy.is_peft else load_policy(cfg, device, trainable=False)


def resume(start: RunStart, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
           sampler: PromptSampler) -> int:
    """Load the checkpoint the run resumes from (if any) into the model, optimizer, schedule,
    RNGs and data position; return its step (0 for a fresh run)."""
    if start.point.checkpoint is None:
        return 0
    state = load_checkpoint(start.point.checkpoint, model, optimizer, scheduler)
    sampler.load_state_dict(state.data_state)
    if is_main():
        say(f"resuming from {state.path} (step {state.step})")
    return state.step


def open_tracker(cfg: Any, start: RunStart, cleanup: contextlib.ExitStack, total_steps: int,
                 start_step: int) -> Tracker:
    """The run's metrics tracker (W&B, metrics.jsonl, progress bar), closed by `cleanup`; a
    resumed run continues its W&B run and progress from `start_step`."""
    resumed = start.point.checkpoint is not None
    return cleanup.enter_context(Tracker(cfg.logger, start.output_dir, run_config=config_to_dict(cfg),
                                         total_steps=total_steps, resume_step=start_step if resumed else None))


def due(step: int, every: int, total_steps: int) -> bool:
    """Whether a periodic event (a checkpoint, a validation) falls on `step`: every `every` steps
    (0: none on the way) and always at the last step."""
    return bool(every and step % every == 0) or step == total_steps


def timed(name: str, work: Callable[[], Mapping[str, float]]) -> dict[str, float]:
    """`work()`'s metrics plus `name`: the seconds it took (e.g. time/validation)."""
    begin = time.perf_counter()
    metrics = dict(work())
    metrics[name] = time.perf_counter() - begin
    return metrics


def save(cfg: Any, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         sampler: PromptSampler) -> Path:
    """A resumable checkpoint of the run at `step` in `trainer.output_dir` (weights, optimizer,
    schedule, RNGs, data position and the run's config); older ones beyond `trainer.keep_last`
    are deleted."""
    t = cfg.trainer
    return save_checkpoint(t.output_dir, step, model, optimizer, scheduler, data_state=sampler.state_dict(),
                           extra={"config": config_to_dict(cfg)}, keep_last=t.keep_last)


def finish(start: RunStart, algorithm: str, tracker: Tracker, step: int, last_metrics: Mapping[str, float],
           figures: Sequence[str], checkpoint_note: str, extra_lines: Sequence[str] = (),
           **extra: Any) -> dict[str, Any]:
    """The run's summary (steps, paths of the metrics and the latest checkpoint, last metrics,
    plus `extra`), printed on rank 0 with `figures` from the last metrics; leaves the ranks."""
    checkpoints = list_checkpoints(start.output_dir)
    summary = {
        "output_dir": str(start.output_dir),
        "resumed_from": str(start.point.checkpoint) if start.point.checkpoint is not None else None,
        "steps": step,
        "metrics_path": str(tracker.metrics_path) if tracker.metrics_path else None,
        "checkpoint": str(checkpoints[-1]) if checkpoints else None,
        "wandb_mode": tracker.mode,
        "last_metrics": dict(last_metrics),
        **extra,
    }
    if is_main():
        print_run_summary(algorithm, summary, figures, checkpoint_note, extra_lines)
    destroy_distributed()
    return summary
