"""PPO for CodeVision: `python -m algos.ppo +exp=tiny_ppo` (CPU, minutes).

Proximal Policy Optimization (Schulman et al. 2017) with a learned critic and generalized
advantage estimation (Schulman et al. 2016) over the tokens of multi-turn trajectories. Where
GRPO gives every token of a trajectory the same group-relative advantage, PPO keeps the env's
dense rewards where they happened: each turn's reward (a failed tool call's penalty, the final
outcome) sits on that turn's last sampled token, and GAE spreads it back over the tokens that led
to it. One step:

    1. draw prompts_per_step tasks (each data-parallel rank takes its share)
    2. roll out n trajectories per task, multi-turn, through the env and its sandbox
    3. group terms (tool necessity, when reward.beta > 0) go on each trajectory's final token
    4. score the kept trajectories: the critic's values (and the reference's log-probs for KL)
    5. GAE over the sampled tokens (tool-response tokens are the env's, not decisions), whitened
    6. ppo_epochs x mini-batches: clipped surrogate (+ KL, + entropy bonus) and clipped value
       loss in one backward pass; the policy and the critic step with their own optimizers and
       gradient clipping. During the first critic.warmup_steps steps only the critic trains.
    7. new weights to the generator; log, validate, checkpoint (policy and critic)

Everything shared with GRPO (rollouts, losses, optimizer step, metrics, the run's set-up, resume,
checkpoints and summary in `algos.run`) is the same code: the runs log the same names plus
critic/*. Configuration: `conf/ppo.yaml` (every key commented) and `algos/ppo_config.py`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from agents.policy import Policy
from agents.trajectory import Trajectory, TrajectoryGroup
from algos.advantages import gae_advantages, whiten
from algos.batching import group_minibatches, pad_rows
from algos.checkpoint import is_complete, load_checkpoint, save_checkpoint
from algos.cli import hydra_main
from algos.critic import Critic, load_critic, logprobs_and_values, score_values
from algos.distributed import all_reduce_mean, get_world_size, is_main
from algos.losses import aggregate, kl_in_reward, kl_penalty, policy_loss, value_loss
from algos.optim import build_optimizer, build_scheduler
from algos.ppo_config import PPOConfig
from algos.engines import check_rollout_backend, load_task_splits, open_engines, validate
from algos.groups import flatten_groups, kept_groups, loss_keep_mask, make_groups, rewards_of
from algos.metrics import report_episode_errors, sample_table, step_metrics
from algos.prompt_sampler import PromptSampler
from algos.run import due, finish, finished, load_policy, load_reference, open_tracker, resume, save, start_run, timed
from algos.scoring import score_trajectories
from algos.update import mean_metrics, optimizer_step, update_step

__all__ = ["run", "main", "token_advantages", "ppo_update", "critic_checkpoint_path"]


# --------------------------------------------------------------------------------------------
# Advantages: GAE over each trajectory's sampled tokens
# --------------------------------------------------------------------------------------------


def token_advantages(
    trajectories: Sequence[Trajectory],
    values: Sequence[torch.Tensor],
    gamma: float,
    lam: float,
    adjustments: Sequence[float] | None = None,
    kl: Sequence[torch.Tensor] | None = None,
    kl_coef: float = 0.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """GAE advantages and value targets of each trajectory's tokens (1-D, 0 off its loss mask).

    The rewards are the trajectory's `token_rewards` (each env step's reward on its turn's last
    sampled token), plus the trajectory's group adjustment (e.g. beta x necessity) on its final
    turn's last token, minus `kl_coef x kl` on every sampled token (KL in the reward). GAE then
    runs over the sampled tokens only (`algos.advantages.gae_advantages`).

    Args:
        values: the critic's values at rollout time, one 1-D tensor per trajectory (target-aligned).
        adjustments: one episode-level reward term per trajectory (default none).
        kl: per-token KL estimates per trajectory (for KL in the reward), with `kl_coef`.

    Returns:
        ``(advantages, returns)``: one 1-D float32 tensor per trajectory, of its length.
    """
    if len(values) != len(trajectories):
        raise ValueError(f"got {len(values)} value rows for {len(trajectories)} trajectories: give one per trajectory")
    if not trajectories:
        return [], []
    rewards_BT = pad_rows([t.token_rewards for t in trajectories])
    width = rewards_BT.shape[1]
    mask_BT = pad_rows([t.loss_mask for t in trajectories], width)
    values_BT = pad_rows([v[:len(t)] for v, t in zip(values, trajectories)], width)
    if adjustments is not None:
        for b, (t, adjustment) in enumerate(zip(trajectories, adjustments)):
            if adjustment and not t.turn_ends:
                raise ValueError(f"trajectory of task {t.task_id!r} has no assistant turn to carry its group reward")
            if adjustment:
                rewards_BT[b, t.turn_ends[-1]] += float(adjustment)
    if kl is not None and kl_coef > 0:
        rewards_BT = kl_in_reward(rewards_BT, pad_rows(kl, width), mask_BT, kl_coef)
    advantages_BT, returns_BT = gae_advantages(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
    lengths = [len(t) for t in trajectories]
    return ([advantages_BT[b, :n] for b, n in enumerate(lengths)], [returns_BT[b, :n] for b, n in enumerate(lengths)])


def _gae_metrics(values: Sequence[torch.Tensor], advantages: Sequence[torch.Tensor], returns: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor]) -> dict[str, float]:
    """Means of the raw advantages and returns over sampled tokens, and the critic's explained
    variance 1 - Var(returns - values) / Var(returns): 1 predicts the returns, 0 is no better than
    a constant, < 0 worse. All 0 without sampled tokens (every rank logs the same names)."""
    sampled = torch.cat(list(masks)) if masks else torch.zeros(0, dtype=torch.bool)
    if not sampled.any():
        return {"critic/advantages_mean": 0.0, "critic/returns_mean": 0.0, "critic/explained_variance": 0.0}
    v, a, r = (torch.cat(list(rows))[sampled] for rows in (values, advantages, returns))
    variance = r.var(unbiased=False)
    explained = float(1.0 - (r - v).var(unbiased=False) / variance) if variance > 0 else 0.0
    return {"critic/advantages_mean": float(a.mean()), "critic/returns_mean": float(r.mean()),
            "critic/explained_variance": explained}


# --------------------------------------------------------------------------------------------
# Scoring and the update
# --------------------------------------------------------------------------------------------


def ppo_update(
    policy: Policy,
    critic: Critic,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    schedulers: tuple[Any, Any],
    groups: Sequence[TrajectoryGroup],
    advantages: Sequence[torch.Tensor],
    returns: Sequence[torch.Tensor],
    old_values: Sequence[torch.Tensor],
    cfg: PPOConfig,
    train_policy: bool = True,
    ref_logprobs: Sequence[torch.Tensor] | None = None,
    old_logprobs: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """`algo.ppo_epochs` passes of mini-batched PPO updates over one step's kept trajectories.

    `groups` hold the trajectories that enter the loss (`algos.groups.kept_groups`); the per-token
    rows (advantages, returns, old values, log-probs: 1-D per trajectory) are theirs, in
    `flatten_groups(groups)` order. Mini-batches hold `algo.mini_batch_size /
    world_size` prompts (their kept trajectories), in micro-batches of `algo.micro_batch_size`.
    Each micro-batch's loss is the policy's (clipped surrogate, KL, entropy bonus) plus
    `critic.vf_coef` x the clipped value loss, from one forward of the policy (and of a separate
    critic); `update_step` steps the policy, then the critic steps on the gradients the same
    backward left on it. With `train_policy=False` (critic warm-up) only the value loss is formed,
    the policy's trunk runs without gradients, and only the critic steps.

    optimizers / schedulers: (policy's, critic's). old_logprobs: default the sampler's.
    Returns actor/* and critic/* metrics averaged over the optimizer steps, `lr` (the policy's).
    """
    algo, c = cfg.algo, cfg.critic
    (actor_optimizer, critic_optimizer), (actor_scheduler, critic_scheduler) = optimizers, schedulers
    kl_in_loss = train_policy and algo.kl.in_loss and algo.kl.coef > 0
    if kl_in_loss and ref_logprobs is None:
        raise ValueError("algo.kl.coef > 0 with algo.kl.in_loss needs the reference log-probs (ref_logprobs)")
    max_len = cfg.rollout.max_total_tokens
    device = policy.device
    trajectories = flatten_groups(groups)
    def micro_batch(indices: list[int]) -> dict[str, Any]:
        # Only the loss mask now (update_step weighs micro-batches by it); loss_fn collates.
        return {"indices": indices, "loss_mask": pad_rows([trajectories[i].loss_mask for i in indices])}

    def loss_fn(micro: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        indices = micro["indices"]
        batch = policy.collate([trajectories[i] for i in indices], device=device)
        width = batch["input_ids"].shape[1]

        def rows(per_trajectory: Sequence[torch.Tensor]) -> torch.Tensor:
            return pad_rows([per_trajectory[i] for i in indices], width).to(device)

        mask_BT = batch["loss_mask"]
        if train_policy:
            logprobs_BT, entropy_BT, values_BT = logprobs_and_values(policy, critic, batch, c.value_grad_to_trunk)
        elif critic.kind == "shared":
            with torch.no_grad():  # the policy is frozen: its trunk needs no graph
                hidden_BTH = policy.hidden_states(batch)
            values_BT = critic.values(batch, hidden_BTH=hidden_BTH)
        else:
            values_BT = critic.values(batch)
        vf_loss, vf_metrics = value_loss(values_BT, rows(old_values), rows(returns), mask_BT,
                                         clip_range=c.clip_range, agg=algo.loss_agg, max_len=max_len)
        loss = c.vf_coef * vf_loss
        metrics = {"critic/value_loss": vf_loss.detach(), "critic/vf_clipfrac": vf_metrics["vf_clipfrac"],
                   "critic/values_mean": vf_metrics["values_mean"]}
        if not train_policy:
            return loss, metrics
        old_logprobs_BT = rows(old_logprobs) if old_logprobs is not None else batch["old_logprobs"]
        pg_loss, pg_metrics = policy_loss(
            logprobs_BT, old_logprobs_BT, rows(advantages), mask_BT,
            clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
            clip_ratio_c=algo.clip_ratio_c, agg=algo.loss_agg, max_len=max_len,
        )
        actor_loss = pg_loss
        metrics.update({"actor/pg_loss": pg_loss.detach(), "actor/clipfrac": pg_metrics["clipfrac"],
                        "actor/approx_kl": pg_metrics["approx_kl"]})
        if kl_in_loss:
            kl_BT = kl_penalty(logprobs_BT, rows(ref_logprobs), algo.kl.kind)
            actor_loss = actor_loss + algo.kl.coef * aggregate(kl_BT, mask_BT, algo.loss_agg, max_len)
            metrics["actor/kl"] = aggregate(kl_BT.detach(), mask_BT, "token-mean")
        if algo.entropy_coef > 0:
            actor_loss = actor_loss - algo.entropy_coef * aggregate(entropy_BT, mask_BT, algo.loss_agg, max_len)
        metrics["actor/entropy"] = aggregate(entropy_BT.detach(), mask_BT, "token-mean")
        metrics["actor/loss"] = actor_loss.detach()
        return actor_loss + loss, metrics

    metric_names = ["critic/value_loss", "critic/vf_clipfrac", "critic/values_mean"]
    if train_policy:
        metric_names += ["actor/loss", "actor/pg_loss", "actor/clipfrac", "actor/approx_kl", "actor/entropy"]
        metric_names += ["actor/kl"] if kl_in_loss else []
    actor_params = list(policy.parameters())
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    policy.train()
    critic.train()
    per_update: list[dict[str, float]] = []
    prompts_per_update = max(1, algo.mini_batch_size // get_world_size())
    for members in group_minibatches(groups, prompts_per_update, algo.ppo_epochs, seed):
        micro_batches = [micro_batch(members[k:k + algo.micro_batch_size])
                         for k in range(0, len(members), algo.micro_batch_size)]
        if not train_policy:
            stats = update_step(micro_batches, loss_fn, critic_params, critic_optimizer, critic_scheduler,
                                grad_clip=c.grad_clip, agg=algo.loss_agg, metric_names=metric_names)
            if stats is not None:
                stats["critic/grad_norm"], stats["critic/lr"] = stats.pop("grad_norm"), stats.pop("lr")
                per_update.append(stats)
            continue
        critic_optimizer.zero_grad(set_to_none=True)
        stats = update_step(micro_batches, loss_fn, actor_params, actor_optimizer, actor_scheduler,
                            grad_clip=algo.grad_clip, agg=algo.loss_agg, metric_names=metric_names)
        if stats is None:  # no rank had a loss token: nothing was computed, nothing steps
            continue
        stats["actor/grad_norm"], stats["lr"] = stats.pop("grad_norm"), stats.pop("lr")
        # The critic steps on the gradients the same backward left on its parameters.
        stats["critic/grad_norm"], stats["critic/lr"] = optimizer_step(critic_params, critic_optimizer,
                                                                       critic_scheduler, c.grad_clip)
        per_update.append(stats)
    if not per_update:
        return {"data/updates": 0.0}
    out = mean_metrics(per_update)
    for name in ("lr", "critic/lr"):
        if name in per_update[-1]:
            out[name] = per_update[-1][name]
    out.setdefault("lr", actor_optimizer.param_groups[0]["lr"])
    out["data/updates"] = float(len(per_update))
    return out


# --------------------------------------------------------------------------------------------
# Building the pieces
# --------------------------------------------------------------------------------------------


def critic_checkpoint_path(policy_checkpoint: str | Path) -> Path:
    """Where the critic of a policy checkpoint lives: `<run>/checkpoints/step_N` (the policy,
    loadable by `algos.evaluate` like a GRPO checkpoint) has its critic in `<run>/critic/checkpoints/step_N`."""
    policy_checkpoint = Path(policy_checkpoint)
    return policy_checkpoint.parent.parent / "critic" / "checkpoints" / policy_checkpoint.name


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def run(cfg: PPOConfig) -> dict[str, Any]:
    """Train with PPO as `cfg` says; returns a summary (steps, paths, last metrics)."""
    r, a, c, t = cfg.rollout, cfg.algo, cfg.critic, cfg.trainer
    check_rollout_backend(r)  # fail before loading the weights, not after
    start = start_run(cfg, t.total_steps, shares={"rollout.prompts_per_step": r.prompts_per_step,
                                                  "algo.mini_batch_size": a.mini_batch_size})
    if start.point.finished:
        return finished(start, "PPO")
    rank, world = start.rank, start.world

    # ---- policy, critic, reference, optimizers -------------------------------------------------
    policy = load_policy(cfg, start.device)
    critic = load_critic(cfg, policy, start.device)
    reference = load_reference(cfg, policy, start.device)
    updates_per_step = a.ppo_epochs * (r.prompts_per_step // a.mini_batch_size)
    actor_optimizer = build_optimizer(policy.named_parameters(), a)
    # The policy's schedule starts after the critic warm-up, when it first steps.
    actor_scheduler = build_scheduler(actor_optimizer, a, (t.total_steps - c.warmup_steps) * updates_per_step)
    critic_optim = cfg.critic_optim()
    critic_optimizer = build_optimizer(critic.named_parameters(), critic_optim)
    critic_scheduler = build_scheduler(critic_optimizer, critic_optim, t.total_steps * updates_per_step)

    # ---- data, then where a resumed run stood: the policy's checkpoint, then its critic --------
    train_tasks, val_tasks = load_task_splits(cfg)
    sampler = PromptSampler(len(train_tasks), seed=t.seed)
    critic_checkpoint = None
    if start.point.checkpoint is not None:
        critic_checkpoint = critic_checkpoint_path(start.point.checkpoint)
        if not is_complete(critic_checkpoint):
            raise FileNotFoundError(
                f"{start.point.checkpoint} has no critic at {critic_checkpoint}: it was not written by algos.ppo (a "
                "GRPO or SFT checkpoint starts a PPO run as model.path=<its weights>, not as trainer.resume)"
            )
    start_step = resume(start, policy.model, actor_optimizer, actor_scheduler, sampler)
    if critic_checkpoint is not None:
        load_checkpoint(critic_checkpoint, critic, critic_optimizer, critic_scheduler, restore_rng=False)

    last_metrics: dict[str, float] = {}
    step = start_step
    with contextlib.ExitStack() as cleanup:  # closes whatever was opened, however the run ends
        tracker = open_tracker(cfg, start, cleanup, t.total_steps, start_step)
        engine, val_engine = open_engines(cfg, policy, cleanup, resumed=start.point.checkpoint is not None)
        val_chunk = max(1, r.prompts_per_step * r.n // world)
        reward_cfg = cfg.reward_config()
        if t.val_before_train and start_step == 0 and val_tasks:
            val_metrics = validate(val_engine, val_tasks, val_chunk, seed=t.seed)
            tracker.log(val_metrics, step=0)
            last_metrics.update(val_metrics)

        for step in range(start_step + 1, t.total_steps + 1):
            step_start = time.perf_counter()
            step_seed = t.seed * 1_000_003 + step * 1_009 + rank
            train_policy = step > c.warmup_steps

            # 1-2. prompts, then n rollouts each (this rank's share)
            indices = sampler.draw(r.prompts_per_step)
            prompts = [train_tasks[i] for i in indices[rank::world]]
            group_ids = [f"step{step}-prompt{rank + k * world}" for k in range(len(prompts))]
            trajectories = engine.rollout(prompts, n=r.n, group_ids=group_ids, seed=step_seed)
            report_episode_errors(trajectories, step)  # the run goes on without them
            rollout_s, sandbox_s = engine.last_timings["total_s"], engine.last_timings["step_s"]

            # 3. group terms, and which trajectories enter the losses
            groups = make_groups(trajectories, reward_cfg)
            trajectories = flatten_groups(groups)
            adjustments = [term for group in groups for term in group.group_terms_G]
            rewards_G = torch.tensor(rewards_of(groups), dtype=torch.float32)
            keep = loss_keep_mask(groups, a.mask_truncated, False)
            kept_by_group = kept_groups(groups, keep)
            kept = flatten_groups(kept_by_group)

            # 4. values at rollout time (and the policy's own log-probs when another engine sampled:
            #    its numerics differ, and the ratio must start at 1), the reference's log-probs
            update_start = time.perf_counter()
            old_values, old_logprobs = score_values(policy, critic, kept, a.micro_batch_size,
                                                    with_logprobs=r.backend != "hf")
            # The reference matters to a frozen policy only through a KL in the reward.
            needs_reference = reference is not None and (train_policy or not a.kl.in_loss)
            ref_logprobs = score_trajectories(policy, kept, a.micro_batch_size, reference) if needs_reference else None
            kl = None
            if ref_logprobs is not None and not a.kl.in_loss:
                behaviour = old_logprobs or [torch.tensor(tr.sampler_logprobs, dtype=torch.float32) for tr in kept]
                kl = [kl_penalty(b, ref, a.kl.kind) * torch.tensor(tr.loss_mask, dtype=torch.float32)
                      for b, ref, tr in zip(behaviour, ref_logprobs, kept)]

            # 5. GAE over the sampled tokens, with the dense turn rewards where they were earned
            kept_adjustments = [adj for adj, k in zip(adjustments, keep) if k]
            advantages, returns = token_advantages(kept, old_values, a.gamma, a.lam,
                                                   adjustments=kept_adjustments, kl=kl, kl_coef=a.kl.coef)
            masks = [torch.tensor(tr.loss_mask, dtype=torch.bool) for tr in kept]
            critic_metrics = _gae_metrics(old_values, advantages, returns, masks)
            if a.whiten_advantages and kept:
                flat = whiten(torch.cat(advantages), torch.cat(masks))
                advantages = list(flat.split([len(tr) for tr in kept]))

            # 6. the updates (critic only during its warm-up)
            update_metrics = ppo_update(
                policy, critic, (actor_optimizer, critic_optimizer), (actor_scheduler, critic_scheduler), kept_by_group,
                advantages, returns, old_values, cfg, train_policy=train_policy, ref_logprobs=ref_logprobs,
                old_logprobs=old_logprobs, seed=step_seed)
            update_s = time.perf_counter() - update_start

            # 7. new weights to the generator; log (figures of every rank), validate, checkpoint
            if train_policy:
                engine.update_weights(policy.model)
            timings = {"time/rollout": rollout_s, "time/sandbox": sandbox_s, "time/update": update_s}
            metrics = {
                **step_metrics(groups, reward_cfg.beta, timings, sum(keep)),
                **all_reduce_mean({**update_metrics, **critic_metrics}),
                "time/step": time.perf_counter() - step_start,
                "data/critic_warmup": float(not train_policy),
                "data/epoch": float(sampler.epoch),
            }
            if kl is not None:
                kl_per_token = float(sum(k.sum() for k in kl)) / max(1, sum(tr.num_sampled_tokens for tr in kept))
                metrics["actor/kl"] = all_reduce_mean({"kl": kl_per_token})["kl"]
            if t.sample_table_every and step % t.sample_table_every == 0 and is_main():
                # One figure per row: the mean advantage over the trajectory's sampled tokens (0 if not kept).
                kept_means = iter([float(adv[mask].mean()) if mask.any() else 0.0 for adv, mask in zip(advantages, masks)])
                row_advantages = [next(kept_means) if k else 0.0 for k in keep]
                rows, images = sample_table(policy.tokenizer, policy.image_token_id, trajectories,
                                            rewards_G.tolist(), row_advantages, t.sample_table_rows)
                tracker.log_table("samples/train", rows, images, step=step)
            if t.val_every and due(step, t.val_every, t.total_steps) and val_tasks:
                metrics.update(timed("time/validation", lambda: validate(val_engine, val_tasks, val_chunk, seed=t.seed)))
            tracker.log(metrics, step=step)
            last_metrics.update(metrics)
            if due(step, t.save_every, t.total_steps):
                # The critic first: a complete policy checkpoint then always has its critic beside it.
                save_checkpoint(start.output_dir / "critic", step, critic, critic_optimizer, critic_scheduler,
                                keep_last=t.keep_last)
                save(cfg, step, policy.model, actor_optimizer, actor_scheduler, sampler)

    return finish(start, "PPO", tracker, step, last_metrics,
                  ("reward/total", "val/acc", "actor/kl", "actor/loss", "critic/value_loss", "critic/explained_variance"),
                  "critic beside it under critic/; the same command resumes")


@hydra_main("ppo")
def main(cfg: PPOConfig) -> dict[str, Any]:
    """Entry point: `python -m algos.ppo +exp=tiny_ppo [key=value ...]` (Hydra overrides)."""
    return run(cfg)


if __name__ == "__main__":
    main()
