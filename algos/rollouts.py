"""A training step's rollouts, as GRPO and PPO both get them: before either algorithm begins.

    train_tasks, val_tasks = load_task_splits(cfg)
    engine, val_engine = build_engines(cfg, make_generator(policy, cfg.rollout), sandbox)
    trajectories = engine.rollout(prompts, n=cfg.rollout.n, group_ids=group_ids, seed=seed)
    adjustments = group_reward_terms(trajectories, cfg.reward_config())    # beta x necessity
    keep = loss_keep_mask(trajectories, rewards_G, mask_truncated=True, dynamic_sampling=False)
    metrics = step_metrics(trajectories, rewards_G, adjustments, beta, timings, sum(keep))   # reward/..., tool/...
    metrics = validate(val_engine, val_tasks, chunk=16, seed=0)              # val/acc, ...

A group is the rollouts of one prompt (`Trajectory.group_id`): group terms and dynamic sampling
compare a trajectory with the others of its group. `cfg` is a `GRPOConfig` (or `PPOConfig`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from agents.policy import Policy
from agents.rollout import RolloutEngine, Trajectory
from algos.distributed import all_reduce_mean, get_rank, get_world_size
from algos.train_step import episode_summary, gather_lists, rollout_metrics, validation_metrics
from cv_env.reward import RewardConfig, apply_necessity
from cv_env.tasks import load_tasks

__all__ = [
    "check_rollout_backend",
    "make_generator",
    "build_engines",
    "load_task_splits",
    "validate",
    "group_index",
    "group_reward_terms",
    "loss_keep_mask",
    "step_metrics",
]


# --------------------------------------------------------------------------------------------
# What samples, and on what
# --------------------------------------------------------------------------------------------


def check_rollout_backend(rollout: Any) -> None:
    """Fail early (before loading any weights) when `rollout.backend` cannot run here."""
    if rollout.backend != "vllm":
        return
    from agents.vllm_backend import vllm_available

    if not vllm_available():
        raise RuntimeError(
            "rollout.backend=vllm needs the vllm package and a CUDA GPU: pip install -e '.[vllm]' on a GPU machine, "
            "or sample with transformers: rollout.backend=hf"
        )


def make_generator(policy: Policy, rollout: Any):
    """What samples the rollouts: the policy itself (hf) or a vLLM engine fed its weights."""
    if rollout.backend == "hf":
        return policy
    check_rollout_backend(rollout)
    from agents.vllm_backend import VLLMBackend

    return VLLMBackend(policy, gpu_memory_utilization=rollout.gpu_memory_utilization,
                       max_model_len=rollout.max_total_tokens, tensor_parallel_size=rollout.tensor_parallel_size)


def build_engines(cfg: Any, generator: Any, sandbox: Any) -> tuple[RolloutEngine, RolloutEngine]:
    """The training engine (sampling at `rollout.temperature`) and the validation one (at
    `rollout.val_temperature`, greedy by default), sharing the generator and the sandbox pool.
    Both are context managers: the caller closes them."""
    r = cfg.rollout
    # The engine passes the tasks per rollout and its own shared sandbox.
    env_kwargs = {k: v for k, v in cfg.env_kwargs().items() if k not in ("tasks", "split", "sandbox")}
    shared = dict(sandbox=sandbox, env_kwargs=env_kwargs, max_total_tokens=r.max_total_tokens)

    def sampling(temperature: float) -> dict[str, Any]:
        return dict(temperature=temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens)

    return (RolloutEngine(generator, sampling=sampling(r.temperature), **shared),
            RolloutEngine(generator, sampling=sampling(r.val_temperature), **shared))


def load_task_splits(cfg: Any) -> tuple[Any, list]:
    """The training task source (`env.tasks`, `env.split`) and the first `trainer.val_size`
    validation tasks (`env.val_tasks`, default the training source, `env.val_split`)."""
    seed = cfg.trainer.seed
    train_tasks = load_tasks(cfg.env.tasks, split=cfg.env.split, seed=seed)
    val_source = load_tasks(cfg.env.val_tasks or cfg.env.tasks, split=cfg.env.val_split, seed=seed)
    return train_tasks, [val_source[i] for i in range(min(cfg.trainer.val_size, len(val_source)))]


def validate(engine: RolloutEngine, val_tasks: Sequence, chunk: int, seed: int) -> dict[str, float]:
    """Greedy episodes of this rank's share of the validation tasks, `chunk` tasks per rollout
    call; the metrics (`algos.train_step.validation_metrics`) are over all ranks."""
    rank, world = get_rank(), get_world_size()
    mine = list(val_tasks)[rank::world]
    summaries = []
    for start in range(0, len(mine), chunk):
        summaries.extend(episode_summary(t) for t in engine.rollout(mine[start:start + chunk], n=1, seed=seed + start))
    return validation_metrics(gather_lists(summaries))


# --------------------------------------------------------------------------------------------
# The groups of one step
# --------------------------------------------------------------------------------------------


def group_index(trajectories: Sequence[Trajectory]) -> torch.Tensor:
    """[G] long: the index of each trajectory's group, numbered in order of first appearance."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t.group_id, len(ids)) for t in trajectories], dtype=torch.long)


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


def loss_keep_mask(trajectories: Sequence[Trajectory], rewards_G: torch.Tensor, mask_truncated: bool,
                   dynamic_sampling: bool) -> list[bool]:
    """Which trajectories enter the loss.

    mask_truncated: drop trajectories cut by the turn or token limit (DAPO over-long masking:
    an unfinished answer's reward says little about its tokens). dynamic_sampling: drop whole
    groups whose rewards are all equal (zero advantage, no signal; DAPO).
    """
    keep = [not (mask_truncated and t.truncated) for t in trajectories]
    if dynamic_sampling:
        group_ids_G = group_index(trajectories)
        for g in group_ids_G.unique():
            members = (group_ids_G == g).nonzero().flatten().tolist()
            if float(rewards_G[members].max()) == float(rewards_G[members].min()):
                for i in members:
                    keep[i] = False
    return keep


def step_metrics(trajectories: Sequence[Trajectory], rewards_G: torch.Tensor, adjustments: Sequence[float],
                 beta: float, timings: dict[str, float], trajectories_in_loss: int) -> dict[str, float]:
    """The figures of a step's rollouts that every RL trainer logs, over all ranks (call on each).

    `rollout_metrics` of the episodes scored with the rewards the update used (`rewards_G`, group
    terms included), reward/necessity (the mean necessity term, when `beta` > 0), the timings
    averaged over ranks (`timings`: time/rollout, time/sandbox, time/update), throughput/* over
    the rollout time, and data/trajectories_in_loss summed over ranks.
    """
    summaries = gather_lists([episode_summary(t, float(reward)) for t, reward in zip(trajectories, rewards_G)])
    timing = all_reduce_mean(timings)
    rollout_s = max(timing["time/rollout"], 1e-9)
    metrics = {
        **rollout_metrics(summaries),
        **timing,
        "throughput/tokens_per_s": sum(s["response_length"] for s in summaries) / rollout_s,
        "throughput/episodes_per_s": len(summaries) / rollout_s,
        "data/trajectories_in_loss": float(sum(gather_lists([int(trajectories_in_loss)]))),
    }
    if beta > 0:
        metrics["reward/necessity"] = sum(gather_lists(list(adjustments))) / max(1, len(summaries)) / beta
    return metrics
