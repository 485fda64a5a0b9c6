"""CodeVision-Gym environment: `gym.make("CodeVision-v0")` after `import cv_env`.

This package never imports torch or transformers: the environment installs light.
"""

import gymnasium as gym

from cv_env.frames import Frame
from cv_env.protocol import EndEpisode
from cv_env.task import Task

ENV_ID = "CodeVision-v0"

if ENV_ID not in gym.registry:
    # No TimeLimit wrapper: the env truncates at its own `max_turns`.
    gym.register(id=ENV_ID, entry_point="cv_env.env:CodeVisionEnv")

__all__ = ["ENV_ID", "EndEpisode", "Frame", "Task"]


def __getattr__(name):
    # Lazy: `cv_env.CodeVisionEnv` without importing the sandbox and task suite at `import cv_env`.
    if name == "CodeVisionEnv":
        from cv_env.env import CodeVisionEnv

        return CodeVisionEnv
    raise AttributeError(f"module 'cv_env' has no attribute {name!r}")
