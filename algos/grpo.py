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
    7. log; every val_every steps a greedy validation (val/acc per category, apart from the
       shaped reward); every save_every steps a checkpoint that `trainer.resume=auto` continues

Under `torchrun` every rank rolls out and trains on its own prompts; gradients are averaged and
rank 0 logs. Configuration: `conf/grpo.yaml` (every key commented) and `algos/config.py`.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from agents.policy import Policy
from agents.rollout import RolloutEngine, Trajectory
from algos.advantages import grpo_advantages, rloo_advantages
from algos.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from algos.config import GRPOConfig, config_to_dict, hydra_main
from algos.distributed import all_reduce_mean, destroy_distributed, get_rank, get_world_size, init_distributed, is_main
from algos.losses import aggregate, kl_penalty, policy_loss
from algos.tracking import Tracker
from algos.train_step import (
    PromptSampler,
    build_optimizer,
    build_scheduler,
    episode_summary,
    gather_lists,
    mean_metrics,
    rollout_metrics,
    sample_table,
    update_step,
    validation_metrics,
)
from cv_env.reward import RewardConfig, apply_necessity
from cv_env.sandbox import Sandbox
from cv_env.tasks import load_tasks

__all__ = [
    "run",
    "main",
    "group_reward_terms",
    "compute_advantages",
    "loss_keep_mask",
    "score_trajectories",
    "grpo_update",
    "load_policy",
]


# --------------------------------------------------------------------------------------------
# Rewards and advantages of one batch of groups
# --------------------------------------------------------------------------------------------


def group_reward_terms(trajectories: Sequence[Trajectory], reward_cfg: RewardConfig) -> list[float]:
    """Per-trajectory group adjustment (beta x necessity), computed group by group; 0 when beta is 0."""
    if reward_cfg.beta == 0:
        return [0.0] * len(trajectories)
    adjustments = [0.0] * len(trajectories)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.group_id, []).append(i)
    for members in groups.values():
        episodes = [
            {"correct": trajectories[i].success, "n_calls": trajectories[i].num_tool_calls,
             "n_failed": trajectories[i].num_failed_calls}
            for i in members
        ]
        for i, value in zip(members, apply_necessity(episodes, reward_cfg)):
            adjustments[i] = value
    return adjustments


def _group_index(trajectories: Sequence[Trajectory]) -> torch.Tensor:
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t.group_id, len(ids)) for t in trajectories], dtype=torch.long)


def compute_advantages(rewards_G: torch.Tensor, trajectories: Sequence[Trajectory], estimator: str) -> torch.Tensor:
    """[G] advantages of the trajectories from their rewards and groups (grpo | drgrpo | rloo)."""
    group_ids_G = _group_index(trajectories)
    if estimator == "grpo":
        return grpo_advantages(rewards_G, group_ids_G, norm_by_std=True)
    if estimator == "drgrpo":
        return grpo_advantages(rewards_G, group_ids_G, norm_by_std=False)
    if estimator == "rloo":
        return rloo_advantages(rewards_G, group_ids_G)
    raise ValueError(f"algo.advantage_estimator {estimator!r} is not one of grpo, drgrpo, rloo")


def loss_keep_mask(trajectories: Sequence[Trajectory], rewards_G: torch.Tensor, mask_truncated: bool,
                   dynamic_sampling: bool) -> list[bool]:
    """Which trajectories enter the loss.

    mask_truncated: drop trajectories cut by the turn or token limit (DAPO over-long masking:
    an unfinished answer's reward says little about its tokens). dynamic_sampling: drop whole
    groups whose rewards are all equal (zero advantage, no signal; DAPO).
    """
    keep = [not (mask_truncated and t.truncated) for t in trajectories]
    if dynamic_sampling:
        group_ids_G = _group_index(trajectories)
        for g in group_ids_G.unique():
            members = (group_ids_G == g).nonzero().flatten().tolist()
            if float(rewards_G[members].max()) == float(rewards_G[members].min()):
                for i in members:
                    keep[i] = False
    return keep


# --------------------------------------------------------------------------------------------
# Scoring and the update
# --------------------------------------------------------------------------------------------


def score_trajectories(policy: Policy, trajectories: Sequence[Trajectory], micro_batch_size: int,
                       reference: Policy | None = None) -> list[torch.Tensor]:
    """Log-probs of each trajectory's tokens (1-D, target-aligned, 0 off the loss mask), no grad.

    reference: score with this frozen policy; `reference is policy` under LoRA means the base
    model with the adapters disabled.
    """
    scorer = reference or policy
    out: list[torch.Tensor] = []
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


def _logprobs_where(policy: Policy, trajectories: Sequence[Trajectory], which: Sequence[bool],
                    micro_batch_size: int, reference: Policy | None = None) -> list[torch.Tensor | None]:
    """`score_trajectories` for the trajectories where `which` is true; None elsewhere."""
    chosen = [i for i, wanted in enumerate(which) if wanted]
    out: list[torch.Tensor | None] = [None] * len(trajectories)
    for i, logprobs in zip(chosen, score_trajectories(policy, [trajectories[i] for i in chosen],
                                                      micro_batch_size, reference)):
        out[i] = logprobs
    return out


def _pad_rows(rows: Sequence[torch.Tensor], width: int, device: torch.device | str) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return out.to(device)


def grpo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trajectories: Sequence[Trajectory],
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
    reference's, when the KL term is in the loss.

    Returns the actor/* metrics averaged over the optimizer steps and the last step's lr.
    """
    algo, world = cfg.algo, get_world_size()
    kl_in_loss = algo.kl.in_loss and algo.kl.coef > 0
    if kl_in_loss and ref_logprobs is None:
        raise ValueError("algo.kl.coef > 0 with algo.kl.in_loss needs the reference log-probs (ref_logprobs)")
    max_len = cfg.rollout.max_total_tokens  # Dr.GRPO's constant normaliser: the largest trajectory
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.group_id, []).append(i)
    group_lists = list(groups.values())
    prompts_per_update = max(1, algo.mini_batch_size // world)
    device = policy.device

    def micro_batch(indices: list[int]) -> dict[str, Any]:
        chunk = [trajectories[i] for i in indices]
        batch = policy.collate(chunk, device=device)
        width = batch["input_ids"].shape[1]
        batch["advantages"] = advantages_G[indices].to(device=device, dtype=torch.float32)
        if old_logprobs is not None:
            batch["old_logprobs"] = _pad_rows([old_logprobs[i] for i in indices], width, device)
        if kl_in_loss:
            batch["ref_logprobs"] = _pad_rows([ref_logprobs[i] for i in indices], width, device)
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
    for epoch in range(algo.ppo_epochs):
        # A local generator: the order is reproducible and leaves the global RNG (checkpointed) alone.
        order = np.random.default_rng([seed, epoch]).permutation(len(group_lists)) if epoch else range(len(group_lists))
        ordered = [group_lists[g] for g in order]
        for start in range(0, max(1, len(ordered)), prompts_per_update):
            members = [i for group in ordered[start:start + prompts_per_update] for i in group if keep[i]]
            micro_batches = []
            for k in range(0, len(members), algo.micro_batch_size):
                indices = members[k:k + algo.micro_batch_size]
                masks = [torch.tensor(trajectories[i].loss_mask, dtype=torch.float32) for i in indices]
                micro_batches.append({"indices": indices, "loss_mask": _pad_rows(masks, max(map(len, masks)), "cpu")})
            stats = update_step(micro_batches, loss_fn, params, optimizer, scheduler, grad_clip=algo.grad_clip,
                                agg=algo.loss_agg, metric_names=metric_names)
            if stats is not None:
                per_update.append(stats)
    if not per_update:
        return {"data/updates": 0.0}
    merged = mean_metrics(per_update)
    out = {f"actor/{name}": value for name, value in merged.items() if name != "lr"}
    out["lr"] = per_update[-1]["lr"]
    out["data/updates"] = float(len(per_update))
    return out


# --------------------------------------------------------------------------------------------
# Building the pieces
# --------------------------------------------------------------------------------------------


def load_policy(cfg: GRPOConfig, device: torch.device, trainable: bool = True) -> Policy:
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
        freeze_vision=m.freeze_vision and trainable,
    )
    if not trainable:
        policy.eval()
        for p in policy.model.parameters():
            p.requires_grad_(False)
    return policy


def _check_vllm() -> None:
    from agents.vllm_backend import vllm_available

    if not vllm_available():
        raise RuntimeError(
            "rollout.backend=vllm needs the vllm package and a CUDA GPU: pip install -e '.[vllm]' on a GPU machine, "
            "or sample with transformers: rollout.backend=hf"
        )


def _generator(policy: Policy, cfg: GRPOConfig):
    """What samples the rollouts: the policy itself (hf) or a vLLM engine fed its weights."""
    if cfg.rollout.backend == "hf":
        return policy
    from agents.vllm_backend import VLLMBackend

    return VLLMBackend(policy, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                       max_model_len=cfg.rollout.max_total_tokens,
                       tensor_parallel_size=cfg.rollout.tensor_parallel_size)


def _env_kwargs(cfg: GRPOConfig) -> dict[str, Any]:
    # The engine passes tasks per rollout and its own shared sandbox.
    kwargs = cfg.env_kwargs()
    return {k: v for k, v in kwargs.items() if k not in ("tasks", "split", "sandbox")}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _validate(engine: RolloutEngine, val_tasks: list, chunk: int, seed: int) -> dict[str, float]:
    """Greedy episodes of this rank's share of the validation tasks; metrics over all ranks."""
    rank, world = get_rank(), get_world_size()
    mine = val_tasks[rank::world]
    summaries = []
    for start in range(0, len(mine), chunk):
        for t in engine.rollout(mine[start:start + chunk], n=1, seed=seed + start):
            summaries.append(episode_summary(t))
    return validation_metrics(gather_lists(summaries))


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def run(cfg: GRPOConfig) -> dict[str, Any]:
    """Train with GRPO as `cfg` says; returns a summary (steps, paths, last metrics)."""
    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    r, a, t = cfg.rollout, cfg.algo, cfg.trainer
    for key, value in (("rollout.prompts_per_step", r.prompts_per_step), ("algo.mini_batch_size", a.mini_batch_size)):
        if value % world:
            raise ValueError(f"{key}={value} must be divisible by the number of ranks ({world}): each rank takes an equal share")
    if r.backend == "vllm":
        _check_vllm()  # fail before loading the weights, not after
    output_dir = Path(t.output_dir)
    _seed_everything(t.seed + rank)

    # ---- policy, reference, optimizer -------------------------------------------------------
    # Each rank holds a full replica and gradients are averaged in `update_step`: Policy.logprobs
    # calls the decoder below the model's root module, which DDP's and FSDP2's hooks would miss.
    policy = load_policy(cfg, dist_info.device)
    reference = None
    if a.kl.coef > 0:
        reference = policy if policy.is_peft else load_policy(cfg, dist_info.device, trainable=False)
    optimizer = build_optimizer(policy.named_parameters(), a)
    updates_per_step = a.ppo_epochs * (r.prompts_per_step // a.mini_batch_size)
    scheduler = build_scheduler(optimizer, a, t.total_steps * updates_per_step)

    # ---- data ---------------------------------------------------------------------------------
    train_tasks = load_tasks(cfg.env.tasks, split=cfg.env.split, seed=t.seed)
    val_source = load_tasks(cfg.env.val_tasks or cfg.env.tasks, split=cfg.env.val_split, seed=t.seed)
    val_tasks = [val_source[i] for i in range(min(t.val_size, len(val_source)))]
    sampler = PromptSampler(len(train_tasks), seed=t.seed)

    # ---- resume -------------------------------------------------------------------------------
    start_step, resumed_from = 0, None
    checkpoint = resolve_resume(t.resume, output_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, policy.model, optimizer, scheduler)
        start_step, resumed_from = state.step, state.path
        sampler.load_state_dict(state.data_state)
    cleanup = contextlib.ExitStack()  # closes whatever was opened, however the run ends
    try:
        tracker = cleanup.enter_context(Tracker(
            cfg.logger, output_dir, run_config=config_to_dict(cfg), total_steps=t.total_steps,
            resume_step=start_step if checkpoint is not None else None))
        if resumed_from is not None and is_main():
            print(f"resuming from {resumed_from} (step {start_step})", flush=True)

        # ---- rollout engines (one sandbox pool shared by training and validation) -----------------
        sandbox = cleanup.enter_context(Sandbox(**cfg.env.sandbox.to_kwargs()))
        generator = _generator(policy, cfg)
        engine_kwargs = dict(sandbox=sandbox, env_kwargs=_env_kwargs(cfg), max_total_tokens=r.max_total_tokens)
        engine = cleanup.enter_context(RolloutEngine(
            generator, sampling=dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                     max_new_tokens=r.max_new_tokens), **engine_kwargs))
        val_engine = cleanup.enter_context(RolloutEngine(
            generator, sampling=dict(temperature=r.val_temperature, top_p=r.top_p, top_k=r.top_k,
                                     max_new_tokens=r.max_new_tokens), **engine_kwargs))
        if checkpoint is not None:
            engine.update_weights(policy.model)  # a separate generator (vLLM) starts from model.path's weights
        val_chunk = max(1, r.prompts_per_step * r.n // world)
        reward_cfg = cfg.reward_config()
        summary: dict[str, Any] = {"output_dir": str(output_dir), "resumed_from": str(resumed_from) if resumed_from else None}
        last_metrics: dict[str, float] = {}
        step = start_step
        if t.val_before_train and start_step == 0 and val_tasks:
            val_metrics = _validate(val_engine, val_tasks, val_chunk, seed=t.seed)
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
            trajectories = engine.rollout(prompts, n=r.n, group_ids=group_ids, seed=step_seed)
            # step_s: waiting for env steps (the sandbox) once generation is done; not the overlapped part.
            rollout_s, sandbox_s = engine.last_timings["total_s"], engine.last_timings["step_s"]

            # 3. group terms, then which trajectories enter the loss
            adjustments = group_reward_terms(trajectories, reward_cfg)
            rewards_G = torch.tensor([tr.reward + adj for tr, adj in zip(trajectories, adjustments)],
                                     dtype=torch.float32)
            keep = loss_keep_mask(trajectories, rewards_G, a.mask_truncated, a.dynamic_sampling)

            # 4. reference log-probs (KL), then advantages
            update_start = time.perf_counter()
            # KL in the reward shapes every trajectory's advantage; in the loss only those trained on.
            scored = [k or (reference is not None and not a.kl.in_loss) for k in keep]
            ref_logprobs = old_logprobs = None
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
            advantages_G = compute_advantages(rewards_G - a.kl.coef * kl_G, trajectories, a.advantage_estimator)

            # 5. the clipped-surrogate updates
            actor_metrics = grpo_update(policy, optimizer, scheduler, trajectories, advantages_G, keep, cfg,
                                        ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, seed=step_seed)
            update_s = time.perf_counter() - update_start

            # 6. new weights to the generator
            engine.update_weights(policy.model)

            # 7. log (figures of every rank), validate, checkpoint
            summaries = gather_lists([episode_summary(tr, float(rw)) for tr, rw in zip(trajectories, rewards_G)])
            sampled_tokens = sum(s["response_length"] for s in summaries)
            timing = all_reduce_mean({"time/rollout": rollout_s, "time/sandbox": sandbox_s, "time/update": update_s})
            actor_metrics.setdefault("lr", optimizer.param_groups[0]["lr"])
            actor_metrics = all_reduce_mean(actor_metrics)
            kept = sum(gather_lists([bool(k) for k in keep]))
            metrics = {
                **rollout_metrics(summaries),
                **actor_metrics,
                **timing,
                "time/step": time.perf_counter() - step_start,
                "throughput/tokens_per_s": sampled_tokens / max(timing["time/rollout"], 1e-9),
                "throughput/episodes_per_s": len(summaries) / max(timing["time/rollout"], 1e-9),
                "data/trajectories_in_loss": float(kept),
                "data/epoch": float(sampler.epoch),
            }
            if reward_cfg.beta > 0:
                metrics["reward/necessity"] = sum(gather_lists(adjustments)) / len(summaries) / reward_cfg.beta
            if reference is not None and not a.kl.in_loss:
                kl_per_token = float(kl_G.sum()) / max(1, sum(tr.num_sampled_tokens for tr in trajectories))
                metrics["actor/kl"] = all_reduce_mean({"kl": kl_per_token})["kl"]
            if t.sample_table_every and step % t.sample_table_every == 0 and is_main():
                rows, images = sample_table(policy.tokenizer, policy.image_token_id, trajectories,
                                            rewards_G.tolist(), advantages_G.tolist(), t.sample_table_rows)
                tracker.log_table("samples/train", rows, images, step=step)
            if t.val_every and (step % t.val_every == 0 or step == t.total_steps) and val_tasks:
                val_start = time.perf_counter()
                metrics.update(_validate(val_engine, val_tasks, val_chunk, seed=t.seed))
                metrics["time/validation"] = time.perf_counter() - val_start
            tracker.log(metrics, step=step)
            last_metrics.update(metrics)
            if (t.save_every and step % t.save_every == 0) or step == t.total_steps:
                save_checkpoint(output_dir, step, policy.model, optimizer, scheduler,
                                data_state=sampler.state_dict(), extra={"config": config_to_dict(cfg)},
                                keep_last=t.keep_last)
    finally:
        cleanup.close()

    checkpoints = list_checkpoints(output_dir)
    summary.update(
        steps=step,
        metrics_path=str(tracker.metrics_path) if tracker.metrics_path else None,
        checkpoint=str(checkpoints[-1]) if checkpoints else None,
        wandb_mode=tracker.mode,
        last_metrics=last_metrics,
    )
    if is_main():
        _print_summary(summary)
    destroy_distributed()
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    m = summary["last_metrics"]
    shown = ", ".join(f"{k}={m[k]:.4g}" for k in ("reward/total", "val/acc", "actor/kl", "actor/loss") if k in m)
    lines = [
        f"GRPO finished at step {summary['steps']}" + (f" (resumed from {summary['resumed_from']})" if summary["resumed_from"] else ""),
        f"  last figures:  {shown or 'none'}",
        f"  run folder:    {summary['output_dir']}",
        f"  metrics:       {summary['metrics_path'] or 'off (logger.metrics_jsonl=null)'}",
        f"  samples:       {summary['output_dir']}/tables/ (trajectories with their images)",
        f"  checkpoint:    {summary['checkpoint'] or 'none'}  (the same command resumes from it; raise trainer.total_steps to train on)",
        f"  W&B:           {summary['wandb_mode']}" + (f" (files in {summary['output_dir']}/wandb; `wandb sync` uploads)"
                                                     if summary["wandb_mode"] == "offline" else ""),
    ]
    print("\n".join(lines), flush=True)


@hydra_main("grpo")
def main(cfg: GRPOConfig) -> dict[str, Any]:
    """Entry point: `python -m algos.grpo +exp=tiny [key=value ...]` (Hydra overrides)."""
    return run(cfg)


if __name__ == "__main__":
    main()
