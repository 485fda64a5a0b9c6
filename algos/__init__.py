"""GRPO, PPO, SFT and evaluation entry points, and the pieces they share."""

from agents import _threads  # noqa: F401  (OpenMP wait policy, before torch loads)
