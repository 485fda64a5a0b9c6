"""Hand-made trajectories for tests: a flat token layout (ids, loss mask, per-token rewards) as a `Trajectory`."""

from __future__ import annotations

from typing import Any, Sequence

from agents.trajectory import Trajectory, Turn


def from_tokens(ids: Sequence[int], mask: Sequence[int], rewards: Sequence[float] | None = None,
                logprobs: Sequence[float] | None = None, task_id: str = "toy", group_id: str = "g",
                category: str = "toy", **fields: Any) -> Trajectory:
    """The trajectory whose `token_ids`, `loss_mask`, `token_rewards` and `sampler_logprobs` are
    the given ones: the tokens before the first sampled one are the prompt, each run of sampled
    tokens a turn, the unsampled tokens after it its context. A reward must sit on a turn's last
    sampled token (where an env step's reward goes)."""
    n = len(ids)
    rewards = list(rewards) if rewards is not None else [0.0] * n
    logprobs = list(logprobs) if logprobs is not None else [0.0] * n
    starts = [i for i in range(n) if mask[i] and (i == 0 or not mask[i - 1])]
    ends = [i for i in range(n) if mask[i] and (i + 1 == n or not mask[i + 1])]
    bounds = starts[1:] + [n]
    for i, r in enumerate(rewards):
        if r and i not in ends:
            raise ValueError(f"reward {r} at token {i} is not on a turn's last sampled token {ends}")
    turns = tuple(Turn(action="", reward=float(rewards[end]), sampled_ids=tuple(ids[start:end + 1]),
                       logprobs=tuple(logprobs[start:end + 1]), context_ids=tuple(ids[end + 1:after]))
                  for start, end, after in zip(starts, ends, bounds))
    prompt = starts[0] if starts else n
    return Trajectory(task_id=task_id, group_id=group_id, category=category, prompt_text="", prompt_images=(),
                      turns=turns, prompt_ids=tuple(ids[:prompt]), **fields)
