"""Advantage estimators shared by the GRPO and PPO trainers.

Pure functions on torch tensors, free of trainer state. Shape suffixes name the dimensions:
``G`` = every rollout of a batch (groups laid side by side), ``B`` = batch rows, ``T`` = token
positions. Advantages are training targets, so every function here returns detached tensors.

* :func:`grpo_advantages` -- group-relative advantages of GRPO (Shao et al. 2024, *DeepSeekMath*)
  and, with ``norm_by_std=False``, of Dr.GRPO (Liu et al. 2025, *Understanding R1-Zero-Like
  Training: A Critical Perspective*).
* :func:`rloo_advantages` -- REINFORCE leave-one-out (Ahmadian et al. 2024, *Back to Basics*).
* :func:`gae_advantages` -- generalized advantage estimation (Schulman et al. 2016) over the
  sampled tokens of a multi-turn trajectory, with dense per-turn rewards.
* :func:`whiten` -- masked normalisation to zero mean and unit variance.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grpo_advantages", "rloo_advantages", "gae_advantages", "whiten"]


def _check_group_inputs(rewards_G: Tensor, group_ids_G: Tensor) -> Tensor:
    """Validate a flat batch of rewards with its group ids; return the rewards as floats."""
    if rewards_G.dim() != 1:
        raise ValueError(
            f"rewards_G must be 1-D (one scalar reward per rollout), got shape {tuple(rewards_G.shape)}; "
            "sum each trajectory's rewards first"
        )
    if group_ids_G.shape != rewards_G.shape:
        raise ValueError(
            f"group_ids_G has shape {tuple(group_ids_G.shape)} but rewards_G has shape "
            f"{tuple(rewards_G.shape)}: give one group id per reward"
        )
    if group_ids_G.is_floating_point() or group_ids_G.is_complex():
        raise TypeError(f"group_ids_G must hold integers (one id per prompt), got dtype {group_ids_G.dtype}")
    rewards_G = rewards_G.detach()
    if not rewards_G.is_floating_point():
        rewards_G = rewards_G.to(torch.get_default_dtype())
    if not torch.isfinite(rewards_G).all():
        bad = torch.nonzero(~torch.isfinite(rewards_G)).flatten().tolist()
        raise ValueError(
            f"rewards_G holds non-finite values at indices {bad[:10]}: fix the reward before computing advantages"
        )
    return rewards_G


def _group_statistics(rewards_G: Tensor, group_ids_G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-rollout group size, group mean, group unbiased std and an "all rewards equal" flag."""
    _, index_G = torch.unique(group_ids_G, return_inverse=True)
    num_groups = int(index_G.max()) + 1 if index_G.numel() else 0
    zeros = rewards_G.new_zeros(num_groups)
    counts = zeros.scatter_add(0, index_G, torch.ones_like(rewards_G))
    means = zeros.scatter_add(0, index_G, rewards_G) / counts
    deviations_G = rewards_G - means[index_G]
    # Bessel-corrected, like torch.std and the reference GRPO implementations.
    variances = zeros.scatter_add(0, index_G, deviations_G**2) / (counts - 1).clamp(min=1)
    # Exact test for "nothing to compare": a mean computed in floating point can miss equal
    # rewards by one ulp, and that ulp divided by a ~0 std is not a small number.
    highs = zeros.scatter_reduce(0, index_G, rewards_G, reduce="amax", include_self=False)
    lows = zeros.scatter_reduce(0, index_G, rewards_G, reduce="amin", include_self=False)
    constant_G = (highs == lows)[index_G]
    return counts[index_G], deviations_G, variances.sqrt()[index_G], constant_G


def grpo_advantages(rewards_G: Tensor, group_ids_G: Tensor, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: each rollout's reward minus its group's mean reward.

    GRPO (Shao et al. 2024, *DeepSeekMath*, eq. 3 outcome supervision) divides by the group's
    standard deviation: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``, with the
    Bessel-corrected std (as ``torch.std``). Dr.GRPO (Liu et al. 2025, *Understanding R1-Zero-Like
    Training*) drops the division (``norm_by_std=False``): ``A_i = r_i - mean(r_group)``, because
    dividing by the std up-weights prompts that are nearly always solved or always failed.

    Args:
        rewards_G: ``[G]`` one scalar reward per rollout (a trajectory's total reward).
        group_ids_G: ``[G]`` integer id of the prompt each rollout answered; groups may be of any
            size, in any order, interleaved, with any id values.
        norm_by_std: divide by the group std (GRPO) or not (Dr.GRPO).
        eps: added to the std so a near-constant group does not explode.

    Returns:
        ``[G]`` advantages (detached, floating point). A group of one rollout has nothing to be
        compared with and a group whose rewards are all equal carries no signal: both get exactly
        0 (never NaN).
    """
    rewards_G = _check_group_inputs(rewards_G, group_ids_G)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    counts_G, deviations_G, stds_G, constant_G = _group_statistics(rewards_G, group_ids_G)
    advantages_G = deviations_G / (stds_G + eps) if norm_by_std else deviations_G
    return torch.where(constant_G | (counts_G < 2), torch.zeros_like(advantages_G), advantages_G)


def rloo_advantages(rewards_G: Tensor, group_ids_G: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, *Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs*).

    Each rollout's baseline is the mean reward of the *other* rollouts of its group, which keeps
    the baseline independent of the rollout and the gradient estimate unbiased:
    ``A_i = r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) * (r_i - mean(r_group))``.

    Args:
        rewards_G: ``[G]`` one scalar reward per rollout.
        group_ids_G: ``[G]`` integer prompt id of each rollout (any order, any ids).

    Returns:
        ``[G]`` advantages (detached). A group of one has no other rollout to form a baseline and
        gets 0, as does a group whose rewards are all equal.
    """
    rewards_G = _check_group_inputs(rewards_G, group_ids_G)
    counts_G, deviations_G, _, constant_G = _group_statistics(rewards_G, group_ids_G)
    advantages_G = counts_G / (counts_G - 1).clamp(min=1) * deviations_G
    return torch.where(constant_G | (counts_G < 2), torch.zeros_like(advantages_G), advantages_G)


def _check_token_inputs(**tensors_BT: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors_BT.items()}
    first_name, first_shape = next(iter(shapes.items()))
    if len(first_shape) != 2:
        raise ValueError(f"{first_name} must be [batch, tokens], got shape {first_shape}")
    mismatched = {name: s for name, s in shapes.items() if s != first_shape}
    if mismatched:
        raise ValueError(f"all token tensors must have the same [batch, tokens] shape, got {shapes}")


@torch.no_grad()
def gae_advantages(
    rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, *High-Dimensional Continuous
    Control Using Generalized Advantage Estimation*) over the sampled tokens of multi-turn
    trajectories.

    A row is one trajectory laid out as tokens: prompt, assistant turn, tool response, assistant
    turn, ... . The policy acted only at the positions where ``mask_BT`` is 1 (the tokens it
    sampled); prompt, tool-response and padding tokens (mask 0) are part of the environment, not
    decisions. The recursion therefore runs over the masked-in positions only, in order: if
    ``t_1 < t_2 < ... < t_n`` are a row's sampled positions,

        delta_k = r[t_k] + gamma * V[t_{k+1}] - V[t_k]        (V[t_{n+1}] = 0: the episode ended)
        A[t_k]  = delta_k + gamma * lam * A[t_{k+1}]
        R[t_k]  = A[t_k] + V[t_k]                              (the critic's regression target)

    so the "next value" of a turn's last token is the value of the first token the policy samples
    in its next turn, whatever tool-response tokens lie between; tool tokens neither receive an
    advantage nor break the chain, and ``gamma`` discounts per sampled token. The environment's
    dense turn rewards go on each assistant turn's last sampled token (a tool call's penalty
    reaches the advantages of the turn that made it and, discounted, of the turns before), and
    the final turn's last token carries the outcome. A trajectory cut short by a length or turn
    limit should be excluded from the loss (its row masked out), since it is treated here as
    ended.

    Args:
        rewards_BT: ``[B, T]`` rewards at the sampled positions that earned them, 0 elsewhere.
        values_BT: ``[B, T]`` the critic's value of each position (read at sampled positions only).
        mask_BT: ``[B, T]`` 1 (or True) at tokens the policy sampled, 0 at prompt, tool-response
            and padding tokens.
        gamma: discount per sampled token, in [0, 1].
        lam: GAE lambda in [0, 1] (1: Monte-Carlo returns minus values; 0: one-step TD errors).

    Returns:
        ``(advantages_BT, returns_BT)``, detached, 0 at every masked-out position (and in fully
        masked rows).

    Raises:
        ValueError: on mismatched shapes, ``gamma``/``lam`` outside [0, 1], or a nonzero reward on
            a masked-out position (it would be silently lost: put each turn's reward on that
            turn's last sampled token).
    """
    _check_token_inputs(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    mask_BT = mask_BT.bool()
    values_BT = values_BT.detach()
    if not values_BT.is_floating_point():
        values_BT = values_BT.to(torch.get_default_dtype())
    rewards_BT = rewards_BT.detach().to(values_BT.dtype)
    lost = (rewards_BT != 0) & ~mask_BT
    if lost.any():
        b, t = (int(i) for i in torch.nonzero(lost)[0])
        raise ValueError(
            f"reward {float(rewards_BT[b, t]):g} sits at row {b}, position {t}, where mask_BT is 0 "
            f"({int(lost.sum())} such position(s)): put each turn's reward on that turn's last sampled token"
        )

    # Pack each row's sampled positions to the front (stable sort keeps their order), so the
    # loop runs over the longest row's sampled tokens only (``L`` of them): a tool response full
    # of image tokens costs nothing.
    batch, _ = mask_BT.shape
    order_BT = torch.sort((~mask_BT).to(torch.int8), dim=1, stable=True).indices
    length = int(mask_BT.sum(dim=1).max()) if batch else 0
    order_BL = order_BT[:, :length]
    rewards_BL = rewards_BT.gather(1, order_BL)
    values_BL = values_BT.gather(1, order_BL)
    mask_BL = mask_BT.gather(1, order_BL)

    advantages_BL = torch.zeros_like(values_BL)
    next_value_B = values_BT.new_zeros(batch)
    next_advantage_B = values_BT.new_zeros(batch)
    for k in reversed(range(length)):
        # Packed rows are padded at the end, so a row's padding comes before its last sampled
        # token in this backward sweep and must leave the carried values at 0.
        delta_B = rewards_BL[:, k] + gamma * next_value_B - values_BL[:, k]
        advantage_B = torch.where(mask_BL[:, k], delta_B + gamma * lam * next_advantage_B, 0.0)
        advantages_BL[:, k] = advantage_B
        next_advantage_B = advantage_B
        next_value_B = torch.where(mask_BL[:, k], values_BL[:, k], 0.0)

    advantages_BT = torch.zeros_like(values_BT).scatter(1, order_BL, advantages_BL)
    returns_BT = (advantages_BT + values_BT) * mask_BT
    return advantages_BT, returns_BT


def whiten(values: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` to zero mean and unit variance over the entries where ``mask`` is 1.

    PPO implementations commonly whiten GAE advantages over the batch's sampled tokens.
    Statistics use the Bessel-corrected variance; ``(x - mean) / sqrt(var + eps)``.

    Args:
        values: tensor of any shape.
        mask: same shape, 1 (True) where an entry counts; ``None`` counts every entry.
        shift_mean: subtract the mean (``False`` only rescales, keeping the sign of each value).
        eps: added to the variance.

    Returns:
        Tensor like ``values`` (detached), 0 at masked-out entries. With fewer than two entries,
        or all entries equal, the variance is 0 and the result stays finite.
    """
    values = values.detach()
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != values.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but values has shape {tuple(values.shape)}")
    weights = mask.to(values.dtype)
    count = weights.sum()
    mean = (values * weights).sum() / count.clamp(min=1)
    variance = (((values - mean) * weights) ** 2).sum() / (count - 1).clamp(min=1)
    centred = values - mean
    whitened = (centred if shift_mean else values) * torch.rsqrt(variance + eps)
    return whitened * weights
