"""Policy-gradient, value, KL and entropy terms shared by the GRPO and PPO trainers.

Pure functions on torch tensors, free of trainer state. ``B`` = batch rows (trajectories), ``T``
= token positions, ``V`` = vocabulary; ``mask_BT`` is 1 (or True) at the tokens the policy
sampled and 0 at prompt, tool-response and padding tokens. Metrics come back as detached 0-dim
tensors under plain names (``clipfrac``, ``approx_kl``, ...); trainers prefix them (``actor/``)
and call ``float()`` when they log, so nothing here forces a device sync.

* :func:`policy_loss` -- PPO clipped surrogate (Schulman et al. 2017) with asymmetric clip range
  (DAPO clip-higher, Yu et al. 2025) and dual clip (Ye et al. 2020).
* :func:`aggregate` -- token-mean / seq-mean-token-sum / seq-mean-token-mean /
  seq-mean-token-sum-norm (Dr.GRPO) reduction of a per-token loss.
* :func:`kl_penalty` -- k1 / k2 / k3 per-token KL estimators (Schulman 2020, *Approximating KL
  Divergence*), for the loss; :func:`kl_in_reward` to put it in the reward instead.
* :func:`entropy_from_logits` -- per-token entropy for the entropy bonus and logging.
* :func:`value_loss` -- PPO2-style clipped value loss for the critic.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "aggregate",
    "policy_loss",
    "kl_penalty",
    "kl_in_reward",
    "entropy_from_logits",
    "value_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")

# exp(20) ~ 4.9e8 is far outside any trust region yet finite in fp16/bf16/fp32; a log-ratio beyond
# it only comes from a token the policy has all but stopped producing, and exp() would give inf.
_MAX_LOG_RATIO = 20.0


def _check_shapes(**tensors_BT: Tensor) -> torch.Size:
    shapes = {name: tuple(t.shape) for name, t in tensors_BT.items()}
    first_name, first_shape = next(iter(shapes.items()))
    if len(first_shape) != 2:
        raise ValueError(f"{first_name} must be [batch, tokens], got shape {first_shape}")
    if any(s != first_shape for s in shapes.values()):
        raise ValueError(f"all token tensors must have the same [batch, tokens] shape, got {shapes}")
    return torch.Size(first_shape)


def _masked_mean(x_BT: Tensor, weights_BT: Tensor) -> Tensor:
    """Mean over masked-in entries; 0 (not NaN) when there are none."""
    return (x_BT * weights_BT).sum() / weights_BT.sum().clamp(min=1)


def aggregate(loss_BT: Tensor, mask_BT: Tensor, mode: str = "token-mean", max_len: int | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar over the masked-in tokens.

    Modes (the names verl and TRL use):

    * ``"token-mean"``: sum over all masked-in tokens / their number. Every token weighs the same,
      so long trajectories weigh more (DAPO, Yu et al. 2025, argues for this; the CodeVision
      default).
    * ``"seq-mean-token-sum"``: each sequence's token sum, averaged over sequences.
    * ``"seq-mean-token-mean"``: each sequence's token mean, averaged over sequences: the
      original GRPO objective (Shao et al. 2024), whose 1/|o_i| favours short correct answers
      and long wrong ones (the length bias Dr.GRPO points out).
    * ``"seq-mean-token-sum-norm"``: each sequence's token sum divided by the constant
      ``max_len``, averaged over sequences: Dr.GRPO (Liu et al. 2025, *Understanding R1-Zero-Like
      Training*), whose normaliser does not depend on the sequence's length.

    A sequence here is a row with at least one masked-in token: fully masked rows (a truncated
    trajectory excluded from the loss, padding rows) count in no denominator. With nothing
    masked in, the result is a 0 that still belongs to the autograd graph, so ``backward()``
    works on every rank.

    When a mini-batch is split into micro-batches for gradient accumulation, each call
    normalises by its own micro-batch; scale each micro-batch's loss by its share of the
    mini-batch's tokens (or sequences) to get the mini-batch's exact token-mean.

    Args:
        loss_BT: ``[B, T]`` per-token loss.
        mask_BT: ``[B, T]`` 1 at tokens in the loss.
        mode: one of :data:`AGG_MODES`.
        max_len: the constant length normaliser, required by ``"seq-mean-token-sum-norm"`` (the
            maximum response length of the run, not of this batch).
    """
    _check_shapes(loss_BT=loss_BT, mask_BT=mask_BT)
    weights_BT = mask_BT.to(loss_BT.dtype)
    if mode == "token-mean":
        return _masked_mean(loss_BT, weights_BT)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}: use one of {', '.join(AGG_MODES)}")
    tokens_B = weights_BT.sum(dim=1)
    sums_B = (loss_BT * weights_BT).sum(dim=1)
    if mode == "seq-mean-token-sum":
        per_sequence_B = sums_B
    elif mode == "seq-mean-token-mean":
        per_sequence_B = sums_B / tokens_B.clamp(min=1)
    else:
        if max_len is None or max_len <= 0:
            raise ValueError(
                f"mode 'seq-mean-token-sum-norm' (Dr.GRPO) divides by a constant max_len > 0, got max_len={max_len}: "
                "pass the run's maximum response length"
            )
        per_sequence_B = sums_B / max_len
    present_B = (tokens_B > 0).to(loss_BT.dtype)
    return (per_sequence_B * present_B).sum() / present_B.sum().clamp(min=1)


def policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss with clip-higher and dual clip, aggregated over sampled tokens.

    With ``ratio = exp(logprobs - old_logprobs)`` and advantage ``A`` per token:

        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))

    (PPO, Schulman et al. 2017). ``clip_ratio_high > clip_ratio_low`` is DAPO's *clip-higher*
    (Yu et al. 2025): more room to raise the probability of unlikely tokens, against entropy
    collapse. For ``A < 0`` the dual clip (Ye et al. 2020, *Mastering Complex Control in MOBA
    Games with Deep Reinforcement Learning*) also bounds the loss by ``-A * clip_ratio_c``, so a
    token whose ratio has exploded cannot dominate the batch; ``clip_ratio_c=None`` disables it.
    Tokens where a clip binds get no gradient.

    Args:
        logprobs_BT: ``[B, T]`` log-probabilities of the sampled tokens under the current policy
            (with gradient).
        old_logprobs_BT: ``[B, T]`` the same under the policy that sampled them (the rollout).
        advantages_BT: ``[B, T]`` per-token advantages (PPO / GAE), or ``[B]`` one per sequence
            (GRPO), broadcast over its tokens. Treated as constants.
        mask_BT: ``[B, T]`` 1 at tokens in the loss.
        clip_ratio_low: the ratio may fall to ``1 - clip_ratio_low``; in [0, 1).
        clip_ratio_high: the ratio may rise to ``1 + clip_ratio_high``; >= 0.
        clip_ratio_c: dual-clip bound, > 1, or ``None``.
        agg: aggregation mode, see :func:`aggregate`.
        max_len: normaliser for ``agg="seq-mean-token-sum-norm"``.

    Returns:
        ``(loss, metrics)``: the scalar loss, and detached 0-dim metrics over the masked-in
        tokens (0 when there are none):

        * ``clipfrac``: share of tokens where the ratio clip binds (the clipped term is chosen);
        * ``dual_clipfrac``: share of tokens where the dual clip binds;
        * ``approx_kl``: mean of the k3 estimator of KL(old || current),
          ``(ratio - 1) - log(ratio)`` -- unbiased and never negative (Schulman 2020), the
          estimator CleanRL logs under this name;
        * ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    shape = _check_shapes(logprobs_BT=logprobs_BT, old_logprobs_BT=old_logprobs_BT, mask_BT=mask_BT)
    if advantages_BT.dim() == 1 and advantages_BT.shape[0] == shape[0]:
        advantages_BT = advantages_BT[:, None].expand(shape)
    elif advantages_BT.shape != shape:
        raise ValueError(
            f"advantages must be [B] (one per sequence) or [B, T] like logprobs {tuple(shape)}, "
            f"got {tuple(advantages_BT.shape)}"
        )
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low must lie in [0, 1), got {clip_ratio_low}")
    if clip_ratio_high < 0.0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1 or None to disable it, got {clip_ratio_c}")

    advantages_BT = advantages_BT.detach().to(logprobs_BT.dtype)
    log_ratio_BT = (logprobs_BT - old_logprobs_BT.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * ratio_BT.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    clip_binds_BT = clipped_BT > unclipped_BT
    if clip_ratio_c is not None:
        dual_bound_BT = -advantages_BT * clip_ratio_c
        dual_binds_BT = (advantages_BT < 0) & (loss_BT > dual_bound_BT)
        loss_BT = torch.where(dual_binds_BT, dual_bound_BT, loss_BT)
    else:
        dual_binds_BT = torch.zeros_like(clip_binds_BT)
    loss = aggregate(loss_BT, mask_BT, agg, max_len)

    with torch.no_grad():
        mask_BT = mask_BT.bool()
        weights_BT = mask_BT.to(ratio_BT.dtype)
        any_token = mask_BT.any()
        ratio_BT = ratio_BT.detach()
        metrics = {
            "clipfrac": _masked_mean(clip_binds_BT.to(weights_BT.dtype), weights_BT),
            "dual_clipfrac": _masked_mean(dual_binds_BT.to(weights_BT.dtype), weights_BT),
            "approx_kl": _masked_mean((ratio_BT - 1.0) - log_ratio_BT.detach(), weights_BT),
            "ratio_mean": _masked_mean(ratio_BT, weights_BT),
            "ratio_min": torch.where(any_token, ratio_BT.masked_fill(~mask_BT, float("inf")).min(), 0.0),
            "ratio_max": torch.where(any_token, ratio_BT.masked_fill(~mask_BT, float("-inf")).max(), 0.0),
        }
    return loss, metrics


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    With ``log_r = ref_logprobs - logprobs`` (Schulman 2020, *Approximating KL Divergence*):

    * ``"k1"``: ``-log_r``; unbiased, high variance, can be negative. Its gradient as a loss is
      0 in expectation, so use it in the reward (:func:`kl_in_reward`), not in the loss.
    * ``"k2"``: ``log_r**2 / 2``; biased (low bias near the reference), never negative. As a loss
      on tokens sampled from the current policy, its expected gradient is exactly the gradient
      of KL(policy || reference).
    * ``"k3"``: ``exp(log_r) - 1 - log_r``; unbiased and never negative: the GRPO estimator
      (Shao et al. 2024) and the CodeVision default (coefficient 0.001, in the loss). As a loss
      on tokens sampled from the current policy, its expected gradient is that of the *forward*
      KL(reference || policy), which also pulls the policy toward the reference.

    ``log_r`` is clamped to +-20 so a token the policy has nearly stopped producing cannot turn
    k3 into ``inf``.

    Args:
        logprobs: log-probabilities of the sampled tokens under the policy (any shape).
        ref_logprobs: the same under the frozen reference policy (treated as constant).
        kind: one of :data:`KL_KINDS`.

    Returns:
        Per-token KL estimates, same shape; aggregate them with :func:`aggregate`.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs has shape {tuple(logprobs.shape)} but ref_logprobs has shape {tuple(ref_logprobs.shape)}"
        )
    log_r = (ref_logprobs.detach() - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(f"unknown KL estimator {kind!r}: use one of {', '.join(KL_KINDS)}")


def kl_in_reward(rewards_BT: Tensor, kl_BT: Tensor, mask_BT: Tensor, coef: float) -> Tensor:
    """Subtract ``coef * KL`` from the per-token rewards (the InstructGPT-style KL penalty).

    The alternative to a KL term in the loss: the penalty becomes part of the return and reaches
    the advantages through GAE. Use the ``"k1"`` estimator here (unbiased; its sign matters in a
    reward). Only sampled tokens (mask 1) are penalised; the KL is detached, as rewards are not
    differentiated.

    Args:
        rewards_BT: ``[B, T]`` environment rewards (on each turn's last sampled token).
        kl_BT: ``[B, T]`` per-token KL estimates, from :func:`kl_penalty`.
        mask_BT: ``[B, T]`` 1 at sampled tokens.
        coef: KL coefficient, >= 0.

    Returns:
        ``[B, T]`` rewards with the penalty on every sampled token.
    """
    _check_shapes(rewards_BT=rewards_BT, kl_BT=kl_BT, mask_BT=mask_BT)
    if coef < 0:
        raise ValueError(f"the KL coefficient must be >= 0, got {coef}")
    kl_BT = kl_BT.detach()
    return rewards_BT - coef * kl_BT * mask_BT.to(kl_BT.dtype)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` of the softmax over the last dimension.

    Computed from ``log_softmax`` (no overflow for large logits) and safe for ``-inf`` logits
    (tokens masked out of the vocabulary): their ``0 * -inf`` terms count as 0, in the value and in
    the gradient. Runs in the logits' dtype; pass float32 logits for an accurate figure.

    Args:
        logits: ``[..., V]`` unnormalised log-probabilities.

    Returns:
        ``[...]`` entropies in nats.
    """
    logp = torch.log_softmax(logits, dim=-1)
    # where() before the product: 0 * -inf would be NaN in the value and in the backward pass.
    finite_logp = torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp)
    return -(logp.exp() * finite_logp).sum(dim=-1)


def value_loss(
    values_BT: Tensor,
    old_values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    clip_range: float | None = 0.2,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO2 (OpenAI baselines; as in CleanRL's ``ppo.py``).

    The new value may move at most ``clip_range`` from the rollout's value, and the loss takes the
    worse of the clipped and unclipped squared errors:

        v_clipped = old_values + clip(values - old_values, -clip_range, clip_range)
        loss = 0.5 * max((values - returns)**2, (v_clipped - returns)**2)

    ``clip_range=None`` gives the plain ``0.5 * (values - returns)**2``.

    Args:
        values_BT: ``[B, T]`` the critic's current values (with gradient).
        old_values_BT: ``[B, T]`` the values at rollout time (the ones GAE used).
        returns_BT: ``[B, T]`` regression targets, from :func:`algos.advantages.gae_advantages`.
        mask_BT: ``[B, T]`` 1 at sampled tokens.
        clip_range: largest change of a value per update (in reward units), > 0, or ``None``.
        agg, max_len: aggregation, see :func:`aggregate`.

    Returns:
        ``(loss, metrics)`` with detached ``vf_clipfrac`` (share of tokens where the clipped
        error is the larger one, i.e. the clip binds) and ``values_mean`` over masked-in tokens.
    """
    _check_shapes(values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, mask_BT=mask_BT)
    if clip_range is not None and clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 or None to disable value clipping, got {clip_range}")
    returns_BT = returns_BT.detach()
    unclipped_BT = (values_BT - returns_BT) ** 2
    if clip_range is None:
        loss_BT = unclipped_BT
        binds_BT = torch.zeros_like(unclipped_BT, dtype=torch.bool)
    else:
        old_values_BT = old_values_BT.detach()
        clipped_values_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip_range, clip_range)
        clipped_BT = (clipped_values_BT - returns_BT) ** 2
        loss_BT = torch.maximum(unclipped_BT, clipped_BT)
        binds_BT = clipped_BT > unclipped_BT
    loss = 0.5 * aggregate(loss_BT, mask_BT, agg, max_len)
    with torch.no_grad():
        weights_BT = mask_BT.to(values_BT.dtype)
        metrics = {
            "vf_clipfrac": _masked_mean(binds_BT.to(weights_BT.dtype), weights_BT),
            "values_mean": _masked_mean(values_BT.detach(), weights_BT),
        }
    return loss, metrics
