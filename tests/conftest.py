"""Test-wide settings: nothing reaches a model hub or W&B's servers, whoever runs pytest; property
tests (hypothesis) are reproducible run to run and write no example database into the checkout."""

import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# Example counts are set per test (a small one by default, a large one under `-m slow`).
settings.register_profile(
    "codevision", deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("codevision")


@pytest.fixture
def env_bug(monkeypatch):
    """A stand-in for an env bug (real ones are fixed as they are found): `CodeVisionEnv.step`
    raises KeyError("an env bug") on a str turn that holds the returned trigger text, after
    recording the turn, as a failure deep inside a step would."""
    from cv_env.env import CodeVisionEnv

    trigger = "trigger the stand-in env bug"
    real_step = CodeVisionEnv.step

    def step(self, action):
        if isinstance(action, str) and trigger in action:
            self._episode.assistant_turns.append(action)
            raise KeyError("an env bug")
        return real_step(self, action)

    monkeypatch.setattr(CodeVisionEnv, "step", step)
    return trigger
