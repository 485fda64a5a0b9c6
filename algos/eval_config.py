"""Typed configuration of `python -m algos.evaluate`: a Hydra structured config over `conf/evaluate.yaml`.

`conf/evaluate.yaml` carries the values, each key with a one-line comment; the dataclasses here
are the schema (struct mode: a misspelt key or a wrong type is an error that names the key) and
`__post_init__` checks ranges. The `model`, `reward` and `logger` nodes are composed from the
same groups as the trainers' (`conf/model/`, `conf/reward/`, `conf/logger/`).

`model` also takes a spec directly: `model=tiny:qwen2_5_vl`, `model=/path/to/checkpoint`,
`model=oracle` or `model=random` (scripted agents, no torch needed) or `model=openai:<name>` (a
model an OpenAI-compatible `endpoint` serves; no torch needed) name no file of `conf/model/`, so
`normalize_overrides` turns them into `model.path=<spec>`.

The model, sandbox and logger blocks and every check are the trainers' own (`algos.config`, which
imports no torch), so evaluating scripted agents needs only the environment's dependencies plus Hydra.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore

from agents.openai_backend import MODEL_PREFIX, TOOL_MODES, OpenAIConfig
from algos.config import (ConfigError, LoggerConfig, ModelConfig, SandboxConfig, check_env_options, check_episode,
                          check_logger, check_model, check_reward, check_sampling, check_sandbox, conf_dir,
                          default_judge, default_reward, default_task_options, load_config, require)
from cv_env.reward import RewardConfig

__all__ = ["EvalConfig", "EvalModelConfig", "SCRIPTED_AGENTS", "normalize_overrides", "load_eval_config"]

SCRIPTED_AGENTS = ("oracle", "random")
SCHEMA_NAME = "evaluate_schema"
# How requests to a served model go (agents.openai_backend.OpenAIConfig); the rest of its
# settings come from the keys every model shares (temperature, max_new_tokens, ...).
SERVED_TRANSPORT = ("timeout_s", "retries", "backoff_s", "max_concurrency")


def default_served() -> dict[str, Any]:
    """The served model's transport settings, at `OpenAIConfig`'s defaults."""
    return {f.name: f.default for f in dataclasses.fields(OpenAIConfig) if f.name in SERVED_TRANSPORT}


@dataclass
class EvalModelConfig(ModelConfig):
    """What is evaluated: the trainers' `model` block (same `conf/model/` presets, same checks),
    whose `path` may also name a scripted agent (oracle | random) or `openai:<name>` (a served
    model, at the config's `endpoint`). `lora` (with `enabled: true`) rebuilds the adapters a
    checkpoint was trained with."""

    tool_mode: str = "native"  # served models: native (schema as `tools`, `tool_calls` replies) | prompt (as text)

    @property
    def scripted(self) -> bool:
        return self.path in SCRIPTED_AGENTS

    @property
    def served(self) -> bool:
        """A model behind an OpenAI-compatible endpoint (`openai:<name>`)."""
        return self.path.startswith(MODEL_PREFIX)


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
    # A served model (model=openai:<name>): the endpoint's base URL, its API key's variable, transport.
    endpoint: Optional[str] = None
    api_key_env: Optional[str] = None
    served: dict[str, Any] = field(default_factory=default_served)

    def __post_init__(self) -> None:
        check_model(self.model, extra_specs="oracle, random, openai:<name>, ")
        require(self.model.tool_mode in TOOL_MODES, "model.tool_mode",
                f"{self.model.tool_mode!r} is not one of {', '.join(TOOL_MODES)}")
        require(self.checkpoint is None or not self.model.served, "checkpoint",
                f"a served model ({self.model.path}) has its weights on the server: drop checkpoint")
        require(self.endpoint is None or self.model.served, "endpoint",
                f"is set but model={self.model.path} is not served: give model=openai:<name the endpoint serves>")
        require(self.endpoint is not None or not self.model.served, "endpoint",
                f"model={self.model.path} is served: give its base URL, e.g. endpoint=http://127.0.0.1:8000/v1")
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
        unknown = sorted(set(self.served) - set(SERVED_TRANSPORT))
        require(not unknown, "served", f"unknown key(s) {unknown}; it takes {', '.join(SERVED_TRANSPORT)}")
        if self.model.served:
            try:
                self.openai_config()
            except (TypeError, ValueError) as err:
                raise ConfigError(f"config served model: {err}") from err

    def openai_config(self) -> OpenAIConfig:
        """The served model's settings (model=openai:<name>): endpoint, sampling, transport."""
        return OpenAIConfig(url=str(self.endpoint), model=self.model.path[len(MODEL_PREFIX):],
                            api_key_env=self.api_key_env, tool_mode=self.model.tool_mode,
                            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                            max_tokens=self.max_new_tokens, **dict(self.served))

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
