"""GRPO, PPO, SFT and evaluation entry points, and the pieces they share."""

import importlib.util

from agents import _threads  # noqa: F401  (OpenMP wait policy, before torch loads)

# The environment installs alone (`pip install -e .`); everything here needs the [train] extra.
_missing = [name for name in ("hydra", "omegaconf") if importlib.util.find_spec(name) is None]
if _missing:
    raise ModuleNotFoundError(
        f"algos (trainers and evaluation) needs the [train] extra, and {' and '.join(_missing)} "
        f"{'is' if len(_missing) == 1 else 'are'} missing: "
        "pip install -e '.[train]' (the environment alone, cv_env and agents.scripted, needs none of it)",
        name=_missing[0])
