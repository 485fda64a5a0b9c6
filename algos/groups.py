"""The groups of one training step: a group is the rollouts of one prompt (`TrajectoryGroup`),
built once from the engine's trajectories; group terms, advantages and dynamic sampling compare
a trajectory with the others of its group.

    groups = make_groups(trajectories, cfg.reward_config())       # beta x necessity, once
    trajectories, rewards_G = flatten_groups(groups), torch.tensor(rewards_of(groups))
    keep = loss_keep_mask(groups, mask_truncated=True, dynamic_sampling=False)
    kept = kept_groups(groups, keep)                               # PPO's update takes only those
    signal = groups_with_signal(groups, advantages_G)
"""

from __future__ import annotations

from typing import Sequence

import torch

from agents.trajectory import Trajectory, TrajectoryGroup, flatten_groups
from cv_env.reward import RewardConfig, apply_necessity

__all__ = ["make_groups", "flatten_groups", "rewards_of", "group_index", "loss_keep_mask", "kept_groups",
           "groups_with_signal"]


def make_groups(trajectories: Sequence[Trajectory], reward_cfg: RewardConfig) -> list[TrajectoryGroup]:
    """The groups of `trajectories` (by `group_id`, in order of first appearance), each with its
    group terms: beta x tool necessity (`cv_env.reward.apply_necessity`), 0 when beta is 0."""
    members: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        members.setdefault(t.group_id, []).append(t)
    groups = []
    for group in members.values():
        terms = [0.0] * len(group)
        if reward_cfg.beta != 0:
            episodes = [{"correct": t.success, "n_calls": t.num_tool_calls, "n_failed": t.num_failed_calls,
                         "acc": t.reward_components.get("acc", 1.0)} for t in group]
            terms = [float(v) for v in apply_necessity(episodes, reward_cfg)]
        groups.append(TrajectoryGroup(tuple(group), tuple(terms)))
    return groups


def rewards_of(groups: Sequence[TrajectoryGroup]) -> list[float]:
    """Every group's `rewards_G`, group after group (the order of `flatten_groups`)."""
    return [r for group in groups for r in group.rewards_G]


def group_index(groups: Sequence[TrajectoryGroup]) -> torch.Tensor:
    """[G] long: the index of each trajectory's group, in the order of `flatten_groups`."""
    return torch.tensor([g for g, group in enumerate(groups) for _ in group.trajectories_G], dtype=torch.long)


def loss_keep_mask(groups: Sequence[TrajectoryGroup], mask_truncated: bool, dynamic_sampling: bool) -> list[bool]:
    """Which trajectories (in the order of `flatten_groups`) enter the loss.

    An episode ended by an exception (`Trajectory.error`) never does: its end is not the
    model's doing. mask_truncated: drop trajectories cut by the turn or token limit (DAPO
    over-long masking: an unfinished answer's reward says little about its tokens).
    dynamic_sampling: drop whole groups whose rewards are all equal (zero advantage, no signal; DAPO).
    """
    keep = []
    for group in groups:
        rewards = group.rewards_G
        flat = dynamic_sampling and max(rewards) == min(rewards)
        keep += [not (flat or t.error or (mask_truncated and t.truncated)) for t in group.trajectories_G]
    return keep


def kept_groups(groups: Sequence[TrajectoryGroup], keep: Sequence[bool]) -> list[TrajectoryGroup]:
    """`groups` with only their kept trajectories (`keep` in `flatten_groups` order); a group with
    none kept is left out. Each trajectory keeps its group term."""
    out, i = [], 0
    for group in groups:
        flags = keep[i:i + len(group)]
        i += len(group)
        members = [(t, term) for t, term, k in zip(group.trajectories_G, group.group_terms_G, flags) if k]
        if members:
            out.append(TrajectoryGroup(tuple(t for t, _ in members), tuple(term for _, term in members)))
    if i != len(keep):
        raise ValueError(f"keep has {len(keep)} flags for {i} trajectories: give one per trajectory")
    return out


def groups_with_signal(groups: Sequence[TrajectoryGroup], advantages_G: torch.Tensor) -> list[bool]:
    """Per group: whether any of its trajectories has a nonzero advantage. A group whose rewards
    are all equal teaches nothing; their share says how much of a step's sampling the update can
    learn from (logged by GRPO as data/groups_with_signal)."""
    index_G = group_index(groups)
    return [bool((advantages_G[index_G == g] != 0).any()) for g in range(len(groups))]
