"""CodeVision-Gym environment: `gym.make("CodeVision-v0")` after `import cv_env`.

This package never imports torch or transformers: the environment installs light.
"""

from cv_env.frames import Frame
from cv_env.task import Task

__all__ = ["Frame", "Task"]
