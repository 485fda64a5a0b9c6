"""Typed configuration of `python -m algos.evaluate`: a Hydra structured config over `conf/evaluate.yaml`.

`conf/evaluate.yaml` carries the values, each key with a one-line comment; the dataclasses here
are the schema (struct mode: a misspelt key or a wrong type is an error that names the key) and
`__post_init__` checks ranges. The `model`, `reward` and `logger` nodes are composed from the
same groups as the trainers' (`conf/model/`, `conf/reward/`, `conf/logger/`).

`model` also takes a spec directly: `model=tiny:qwen2_5_vl`, `model=/path/to/checkpoint`,
`model=oracle` or `model=random` (scripted agents, no torch needed) name no file of
`conf/model/`, so `normalize_overrides` turns them into `model.path=<spec>`.

The model, sandbox and logger blocks and every check are the trainers' own (`algos.config`, which
imports no torch), so evaluating scripted agents needs only the environment's dependencies plus Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore

from algos.config import (LoggerConfig, ModelConfig, SandboxConfig, check_env_options, check_episode, check_logger,
                          check_model, check_reward, check_sampling, check_sandbox, conf_dir, default_judge,
                          default_reward, default_task_options, load_config, require)
from cv_env.reward import RewardConfig

__all__ = ["EvalConfig", "EvalModelConfig", "SCRIPTED_AGENTS", "normalize_overrides", "load_eval_config"]

SCRIPTED_AGENTS = ("oracle", "random")
SCHEMA_NAME = "evaluate_schema"


@dataclass
class EvalModelConfig(ModelConfig):
    """What is evaluated: the trainers' `model` block (same `conf/model/` presets, same checks),
    whose `path` may also name a scripted agent (oracle | random). `lora` (with `enabled: true`)
    rebuilds the adapters a checkpoint was trained with."""

    @property
    def scripted(self) -> bool:
        return self.path in SCRIPTED_AGENTS


def default_eval_model() -> EvalModelConfig:
    """The tiny CPU model, as `conf/model/tiny.yaml` gives it."""
    return EvalModelConfig(path="tiny:qwen2_5_vl", dtype="float32", gradient_checkpointing=False)


@dataclass
class EvalConfig:
    """Everything `python -m algos.evaluate` reads (see conf/evaluate.yaml for each key). A new
    setting is a field here, its line in conf/evaluate.yaml, and its check in `__post_init__`."""

    model: EvalModelConfig = field(default_factory=default_eval_model)
    checkpoint: Optional[str] = None
    tasks: str = "synthetic"
    split: str = "test"
    n: int = 64
    seed: int = 0
    robustness: bool = True
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    max_total_tokens: int = 16384
    batch_size: int = 32
    max_turns: int = 12
    max_pixels: int = 1024 * 28 * 28
    prompt: str = "full"
    device: str = "auto"
    oracle: bool = True
    cases: int = 4
    write_transcripts: bool = True
    output_dir: str = "outputs/eval"
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    reward: dict[str, Any] = field(default_factory=default_reward)
    # Task-loader options, as the trainers' env.tasks_options (None = the loader's default).
    tasks_options: dict[str, Any] = field(default_factory=default_task_options)
    # The LLM judge of answers the rules reject, as the trainers' env.judge (url null = none).
    judge: dict[str, Any] = field(default_factory=default_judge)

    def __post_init__(self) -> None:
        check_model(self.model, extra_specs="oracle, random, ")
        require(self.checkpoint is None or not self.model.scripted, "checkpoint",
                f"a scripted agent ({self.model.path}) has no weights to load: drop checkpoint or set model")
        require(self.checkpoint not in ("auto", "never", ""), "checkpoint",
                f"{self.checkpoint!r} is not a path: give a checkpoints/step_<n>/ folder or a run folder, or null")
        require(bool(self.tasks.strip()), "tasks", "is empty: give synthetic, a category or a .parquet path")
        require(self.n >= 0, "n", f"must be >= 0 (0 = every task of the source), got {self.n}")
        require(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")
        require(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        require(self.samples == 1 or self.temperature > 0 or self.model.scripted, "samples",
                f"{self.samples} samples of greedy decoding would all be the same: set temperature > 0 "
                "(e.g. temperature=1.0) or samples=1")
        check_sampling(self.top_p, self.top_k, self.max_new_tokens, self.max_total_tokens, "")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check_episode(self.max_turns, self.max_pixels, self.prompt, "")
        require(self.cases >= 0, "cases", f"must be >= 0 (0 = no viewer pages), got {self.cases}")
        check_sandbox(self.sandbox, "")
        check_logger(self.logger)
        require(bool(self.output_dir.strip()), "output_dir", "is empty")
        check_reward(self.reward)
        check_env_options(self.tasks_options, self.judge, "")

    def reward_config(self) -> RewardConfig:
        return RewardConfig.from_dict(dict(self.reward))

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the env (besides tasks and sandbox)."""
        return {"max_turns": self.max_turns, "max_pixels": self.max_pixels, "prompt": self.prompt,
                "reward": self.reward_config(), "judge": dict(self.judge)}


ConfigStore.instance().store(name=SCHEMA_NAME, node=EvalConfig)


def normalize_overrides(overrides: Sequence[str]) -> list[str]:
    """Read `model=<spec>` as `model.path=<spec>` when <spec> is not a preset of `conf/model/`."""
    presets = {p.stem for p in (conf_dir() / "model").glob("*.yaml")}
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key == "model" and value not in presets:
            item = f"model.path={value}"
        out.append(item)
    return out


def load_eval_config(overrides: Sequence[str] = ()) -> EvalConfig:
    """Compose `conf/evaluate.yaml` with command-line style overrides (tests, notebooks)."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of strings like ['model=oracle'], got the string {overrides!r}")
    return load_config(normalize_overrides(overrides), config_name="evaluate")
