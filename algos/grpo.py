"""GRPO for CodeVision: `python -m algos.grpo +exp=tiny` (CPU, minutes) or `+exp=qwen3vl` (the paper).

Group Relative Policy Optimization (Shao et al. 2024, *DeepSeekMath*) as CodeVision trains it,
with DAPO's clip-higher, over-long masking and dynamic sampling (Yu et al. 2025). One step:

    1. draw prompts_per_step tasks (each data-parallel rank takes its share)
    2. roll out n trajectories per task, multi-turn, through the env and its sandbox
    3. group terms: tool necessity compares the rollouts of one task (when reward.beta > 0)
    4. advantages: each trajectory's reward against its group (grpo | drgrpo | rloo)
    5. ppo_epochs x mini-batches: clipped surrogate (+ k3 KL to the frozen reference, + entropy
       bonus), gradient accumulation over micro-batches, grad clip, AdamW step
    6. new weights to the generator (a no-op when it samples from the trained model itself)
    7. log (data/groups_with_signal: the share of groups whose rewards differ, the only ones the
       update learns from); every val_every steps a greedy validation (val/acc per category, apart from the
       shaped reward); every save_every steps a checkpoint that `trainer.resume=auto` continues

Under `torchrun` every rank rolls out and trains on its own prompts; gradients are averaged and
rank 0 logs. With `trainer.fsdp=true` the policy is sharded over the ranks with FSDP2: rollouts
and scoring run on gathered weights (`fsdp2_gathered`), the updates in lock-step. The pieces GRPO
shares with PPO live in `algos.engines`, `algos.groups` and `algos.metrics` (around the
algorithm), `algos.run` (the run's set-up, resume, checkpoints and summary) and `algos.update`
(the optimizer step). Configuration: `conf/grpo.yaml` (every key commented) and `algos/config.py`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Sequence

import torch

from agents.policy import Policy
from agents.trajectory import Trajectory, TrajectoryGroup
from algos.advantages import grpo_advantages, rloo_advantages
from algos.batching import group_minibatches, pad_rows
from algos.cli import hydra_main
from algos.config import GRPOConfig
from algos.distributed import all_reduce_mean, fsdp2_gathered, fsdp2_wrap, gather_lists, get_world_size, is_fsdp2, is_main
from algos.losses import aggregate, kl_penalty, policy_loss
from algos.engines import check_rollout_backend, load_task_splits, open_engines, validate
from algos.groups import flatten_groups, group_index, groups_with_signal, loss_keep_mask, make_groups, rewards_of
from algos.metrics import report_episode_errors, sample_table, step_metrics
from algos.optim import build_optimizer, build_scheduler
from algos.prompt_sampler import PromptSampler
from algos.run import due, finish, finished, load_policy, load_reference, open_tracker, resume, save, start_run, timed
from algos.scoring import score_trajectories
from algos.update import mean_metrics, update_step

__all__ = ["run", "main", "compute_advantages", "grpo_update"]


# --------------------------------------------------------------------------------------------
# Rewards and advantages of one batch of groups
# --------------------------------------------------------------------------------------------


def compute_advantages(rewards_G: torch.Tensor, groups: Sequence[TrajectoryGroup], estimator: str) -> torch.Tensor:
    """[G] advantages of the groups' trajectories (`flatten_groups` order) from their rewards
    (grpo | drgrpo | rloo)."""
    group_ids_G = group_index(groups)
    if estimator == "grpo":
        return grpo_advantages(rewards_G, group_ids_G, norm_by_std=True)
    if estimator == "drgrpo":
        return grpo_advantages(rewards_G, group_ids_G, norm_by_std=False)
    if estimator == "rloo":
        return rloo_advantages(rewards_G, group_ids_G)
    raise ValueError(f"algo.advantage_estimator {estimator!r} is not one of grpo, drgrpo, rloo")


# --------------------------------------------------------------------------------------------
# Scoring and the update
# --------------------------------------------------------------------------------------------


def _logprobs_where(policy: Policy, trajectories: Sequence[Trajectory], which: Sequence[bool],
                    micro_batch_size: int, reference: Policy | None = None) -> list[torch.Tensor | None]:
    """`score_trajectories` for the trajectories where `which` is true; None elsewhere."""
    chosen = [i for i, wanted in enumerate(which) if wanted]
    out: list[torch.Tensor | None] = [None] * len(trajectories)
    for i, logprobs in zip(chosen, score_trajectories(policy, [trajectories[i] for i in chosen],
                                                      micro_batch_size, reference)):
        out[i] = logprobs
    return out


def grpo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    groups: Sequence[TrajectoryGroup],
    advantages_G: torch.Tensor,
    keep: Sequence[bool],
    cfg: GRPOConfig,
    ref_logprobs: Sequence[torch.Tensor | None] | None = None,
    old_logprobs: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """`algo.ppo_epochs` passes of mini-batched clipped-surrogate updates over one step's groups.

    Groups are split into mini-batches of `algo.mini_batch_size / world_size` prompts on each
    rank (the same number of optimizer steps on every rank); the kept trajectories of a
    mini-batch run in micro-batches of `algo.micro_batch_size` with exact loss scaling
    (`update_step`). old_logprobs: the sampler's (default) or recomputed ones; ref_logprobs: the
    reference's, when the KL term is in the loss. A policy sharded with FSDP2 reduces its own
    gradients, and every rank runs as many forward/backward passes (`update_step(lockstep=True)`):
    a rank with nothing kept in a mini-batch runs one of its trajectories scaled by 0.

    advantages_G, keep, ref_logprobs and old_logprobs are per trajectory, in `flatten_groups(groups)`
    order. Returns the actor/* metrics averaged over the optimizer steps and the last step's lr.
    """
    algo = cfg.algo
    trajectories = flatten_groups(groups)
    kl_in_loss = algo.kl.in_loss and algo.kl.coef > 0
    if kl_in_loss and ref_logprobs is None:
        raise ValueError("algo.kl.coef > 0 with algo.kl.in_loss needs the reference log-probs (ref_logprobs)")
    max_len = cfg.rollout.max_total_tokens  # Dr.GRPO's constant normaliser: the largest trajectory
    device = policy.device

    def micro_batch(indices: list[int]) -> dict[str, Any]:
        chunk = [trajectories[i] for i in indices]
        batch = policy.collate(chunk, device=device)
        width = batch["input_ids"].shape[1]
        batch["advantages"] = advantages_G[indices].to(device=device, dtype=torch.float32)
        # A trajectory that was not scored (only ever an FSDP2 filler pass, scaled by 0) reads zeros.
        if old_logprobs is not None:
            batch["old_logprobs"] = pad_rows([_or_empty(old_logprobs[i]) for i in indices], width).to(device)
        if kl_in_loss:
            batch["ref_logprobs"] = pad_rows([_or_empty(ref_logprobs[i]) for i in indices], width).to(device)
        return batch

    def loss_fn(micro: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = micro_batch(micro["indices"])  # collated here: one micro-batch in memory at a time
        logprobs_BT, entropy_BT = policy.logprobs(batch)
        mask_BT = batch["loss_mask"]
        pg_loss, pg_metrics = policy_loss(
            logprobs_BT, batch["old_logprobs"], batch["advantages"], mask_BT,
            clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
            clip_ratio_c=algo.clip_ratio_c, agg=algo.loss_agg, max_len=max_len,
        )
        loss = pg_loss
        metrics = {"pg_loss": pg_loss.detach(), "clipfrac": pg_metrics["clipfrac"], "approx_kl": pg_metrics["approx_kl"]}
        if kl_in_loss:
            kl_BT = kl_penalty(logprobs_BT, batch["ref_logprobs"], algo.kl.kind)
            loss = loss + algo.kl.coef * aggregate(kl_BT, mask_BT, algo.loss_agg, max_len)
            metrics["kl"] = aggregate(kl_BT.detach(), mask_BT, "token-mean")
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * aggregate(entropy_BT, mask_BT, algo.loss_agg, max_len)
        metrics["entropy"] = aggregate(entropy_BT.detach(), mask_BT, "token-mean")
        metrics["loss"] = loss.detach()
        return loss, metrics

    metric_names = ["loss", "pg_loss", "clipfrac", "approx_kl", "entropy"] + (["kl"] if kl_in_loss else [])
    params = list(policy.parameters())
    policy.train()
    per_update: list[dict[str, float]] = []
    sharded = is_fsdp2(policy.model)
    prompts_per_update = max(1, algo.mini_batch_size // get_world_size())
    for members in group_minibatches(groups, prompts_per_update, algo.ppo_epochs, seed, keep=keep):
        micro_batches = []
        for k in range(0, len(members), algo.micro_batch_size):
            indices = members[k:k + algo.micro_batch_size]
            micro_batches.append({"indices": indices, "loss_mask": pad_rows([trajectories[i].loss_mask for i in indices])})
        if sharded and not micro_batches and trajectories:
            micro_batches.append({"indices": [0], "loss_mask": torch.zeros(1, 1)})  # weight 0: runs scaled by 0
        stats = update_step(micro_batches, loss_fn, params, optimizer, scheduler, grad_clip=algo.grad_clip,
                            agg=algo.loss_agg, metric_names=metric_names, sync_gradients=not sharded,
                            lockstep=sharded)
        if stats is not None:
            per_update.append(stats)
    if not per_update:
        return {"data/updates": 0.0}
    merged = mean_metrics(per_update)
    out = {f"actor/{name}": value for name, value in merged.items() if name != "lr"}
    out["lr"] = per_update[-1]["lr"]
    out["data/updates"] = float(len(per_update))
    return out


def _or_empty(row: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(0) if row is None else row


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def run(cfg: GRPOConfig) -> dict[str, Any]:
    """Train with GRPO as `cfg` says; returns a summary (steps, paths, last metrics)."""
    r, a, t = cfg.rollout, cfg.algo, cfg.trainer
    check_rollout_backend(r)  # fail before loading the weights, not after
    start = start_run(cfg, t.total_steps, shares={"rollout.prompts_per_step": r.prompts_per_step,
                                                  "algo.mini_batch_size": a.mini_batch_size})
    if start.point.finished:
        return finished(start, "GRPO")
    rank, world = start.rank, start.world

    # ---- policy, reference, optimizer -------------------------------------------------------
    # trainer.fsdp: FSDP2 shards the policy over the ranks and reduces its gradients itself;
    # otherwise each rank holds a full replica and `update_step` averages the gradients.
    policy = load_policy(cfg, start.device)
    if t.fsdp and world > 1:
        fsdp2_wrap(policy.model, mixed_precision=None)  # the weights keep model.dtype, as unsharded
    # Rollouts and scoring run a different number of forwards on each rank: on gathered weights.
    # vLLM samples from its own copy of the weights: its rollouts need no gathered policy.
    gathered = functools.partial(fsdp2_gathered, policy.model)
    sampling_weights = gathered if r.backend == "hf" else contextlib.nullcontext
    reference = load_reference(cfg, policy, start.device)
    optimizer = build_optimizer(policy.named_parameters(), a)
    updates_per_step = a.ppo_epochs * (r.prompts_per_step // a.mini_batch_size)
    scheduler = build_scheduler(optimizer, a, t.total_steps * updates_per_step)

    # ---- data, then where a resumed run stood -------------------------------------------------
    train_tasks, val_tasks = load_task_splits(cfg)
    sampler = PromptSampler(len(train_tasks), seed=t.seed)
    start_step = resume(start, policy.model, optimizer, scheduler, sampler)

    last_metrics: dict[str, float] = {}
    step = start_step
    with contextlib.ExitStack() as cleanup:  # closes whatever was opened, however the run ends
        tracker = open_tracker(cfg, start, cleanup, t.total_steps, start_step)
        engine, val_engine = open_engines(cfg, policy, cleanup, resumed=start.point.checkpoint is not None)
        val_chunk = max(1, r.prompts_per_step * r.n // world)
        reward_cfg = cfg.reward_config()

        def validation() -> dict[str, float]:
            with sampling_weights():
                return validate(val_engine, val_tasks, val_chunk, seed=t.seed)

        if t.val_before_train and start_step == 0 and val_tasks:
            val_metrics = validation()
            tracker.log(val_metrics, step=0)
            last_metrics.update(val_metrics)

        for step in range(start_step + 1, t.total_steps + 1):
            step_start = time.perf_counter()
            step_seed = t.seed * 1_000_003 + step * 1_009 + rank

            # 1-2. prompts, then n rollouts each (this rank's share)
            indices = sampler.draw(r.prompts_per_step)
            mine = indices[rank::world]
            prompts = [train_tasks[i] for i in mine]
            group_ids = [f"step{step}-prompt{rank + k * world}" for k in range(len(prompts))]
            with sampling_weights():
                trajectories = engine.rollout(prompts, n=r.n, group_ids=group_ids, seed=step_seed)
            report_episode_errors(trajectories, step)  # the run goes on without them
            # step_s: waiting for env steps (the sandbox) once generation is done; not the overlapped part.
            rollout_s, sandbox_s = engine.last_timings["total_s"], engine.last_timings["step_s"]

            # 3. the groups with their terms, then which trajectories enter the loss
            groups = make_groups(trajectories, reward_cfg)
            trajectories = flatten_groups(groups)
            rewards_G = torch.tensor(rewards_of(groups), dtype=torch.float32)
            keep = loss_keep_mask(groups, a.mask_truncated, a.dynamic_sampling)

            # 4. reference log-probs (KL), then advantages
            update_start = time.perf_counter()
            # KL in the reward shapes every trajectory's advantage; in the loss only those trained on.
            scored = [k or (reference is not None and not a.kl.in_loss) for k in keep]
            ref_logprobs = old_logprobs = None
            with gathered():
                if reference is not None:
                    ref_logprobs = _logprobs_where(policy, trajectories, scored, a.micro_batch_size, reference)
                if r.backend != "hf":
                    # Another engine's log-probs differ from the trainer's numerics: the ratio must start at 1.
                    old_logprobs = _logprobs_where(policy, trajectories, scored, a.micro_batch_size)
            kl_G = torch.zeros_like(rewards_G)  # KL summed over each trajectory's sampled tokens
            if reference is not None and not a.kl.in_loss:
                for i, tr in enumerate(trajectories):
                    sampled = torch.tensor(tr.loss_mask, dtype=torch.bool)
                    behaviour = old_logprobs[i] if old_logprobs else torch.tensor(tr.sampler_logprobs)
                    kl_G[i] = kl_penalty(behaviour[sampled], ref_logprobs[i][sampled], a.kl.kind).sum()
            advantages_G = compute_advantages(rewards_G - a.kl.coef * kl_G, groups, a.advantage_estimator)

            # 5. the clipped-surrogate updates
            actor_metrics = grpo_update(policy, optimizer, scheduler, groups, advantages_G, keep, cfg,
                                        ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, seed=step_seed)
            update_s = time.perf_counter() - update_start

            # 6. new weights to the generator
            engine.update_weights(policy.model)

            # 7. log (figures of every rank), validate, checkpoint
            timings = {"time/rollout": rollout_s, "time/sandbox": sandbox_s, "time/update": update_s}
            actor_metrics.setdefault("lr", optimizer.param_groups[0]["lr"])
            metrics = {
                **step_metrics(groups, reward_cfg.beta, timings, sum(keep)),
                **all_reduce_mean(actor_metrics),
                "time/step": time.perf_counter() - step_start,
                "data/epoch": float(sampler.epoch),
            }
            signal = gather_lists(groups_with_signal(groups, advantages_G))
            metrics["data/groups_with_signal"] = sum(signal) / max(1, len(signal))
            if reference is not None and not a.kl.in_loss:
                kl_per_token = float(kl_G.sum()) / max(1, sum(tr.num_sampled_tokens for tr in trajectories))
                metrics["actor/kl"] = all_reduce_mean({"kl": kl_per_token})["kl"]
            if t.sample_table_every and step % t.sample_table_every == 0 and is_main():
                rows, images = sample_table(policy.tokenizer, policy.image_token_id, trajectories,
                                            rewards_G.tolist(), advantages_G.tolist(), t.sample_table_rows)
                tracker.log_table("samples/train", rows, images, step=step)
            if t.val_every and due(step, t.val_every, t.total_steps) and val_tasks:
                metrics.update(timed("time/validation", validation))
            tracker.log(metrics, step=step)
            last_metrics.update(metrics)
            if due(step, t.save_every, t.total_steps):
                save(cfg, step, policy.model, optimizer, scheduler, sampler)

    return finish(start, "GRPO", tracker, step, last_metrics, ("reward/total", "val/acc", "actor/kl", "actor/loss"),
                  "the same command resumes from it; raise trainer.total_steps to train on",
                  [f"  samples:       {start.output_dir}/tables/ (trajectories with their images)"])


@hydra_main("grpo")
def main(cfg: GRPOConfig) -> dict[str, Any]:
    """Entry point: `python -m algos.grpo +exp=tiny [key=value ...]` (Hydra overrides)."""
    return run(cfg)


if __name__ == "__main__":
    main()
