"""Qwen-VL policies, the token-exact rollout engine and scripted agents (imports `cv_env` only)."""

from agents import _threads  # noqa: F401  (OpenMP wait policy, before torch loads)
