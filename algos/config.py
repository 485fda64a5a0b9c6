"""Typed configuration of every entry point: Hydra structured configs, composed from `conf/`.

The dataclasses below are the schema's shared blocks (`model`, `env`, `rollout`, the `algo`
field sets, `trainer`, `logger`, `reward`), each defined once with one check function, and
GRPO's config made of them; `algos.ppo_config`, `algos.sft_config` and `algos.eval_config`
compose the same blocks (plus their own) and call the same checks. `conf/grpo.yaml` and its
groups (`model/`, `env/`, `rollout/`, `reward/`, `logger/`, `exp/`) carry the values, each key
with a one-line comment: read those files for what each field does, its default and the paper
it comes from. Composition runs in Hydra's struct mode against the schema, so a misspelt key
(`algo.lrr=1`) or a value of the wrong type (`algo.lr=fast`) is an error that names the key,
never a silently ignored setting. Value checks that types cannot express (ranges, choices,
batch divisibility) run when the composed config becomes a `GRPOConfig` (`__post_init__`).

Two ways in:

    cfg = load_config(["+exp=tiny", "algo.lr=1e-5"])          # tests, notebooks, scripts

    @hydra_main("grpo")                                         # entry points (algos.cli):
    def main(cfg: GRPOConfig) -> None: ...                      #   python -m algos.grpo +exp=tiny

Batch sizes follow verl's convention, which the CodeVision release uses: `rollout.prompts_per_step`
and `algo.mini_batch_size` count prompts (groups of `rollout.n` trajectories), while
`algo.micro_batch_size` counts trajectories per forward/backward pass (gradient accumulation).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from agents.templates import TOOL_RESPONSE_FORMATS
from cv_env.judge import JudgeConfig
from cv_env.protocol import PROMPTS
from cv_env.reward import RewardConfig
from cv_env.tasks import TASK_OPTIONS

__all__ = [
    "LoraConfig",
    "ModelConfig",
    "SandboxConfig",
    "EnvConfig",
    "RolloutConfig",
    "KLConfig",
    "OptimConfig",
    "PolicyLossConfig",
    "AlgoConfig",
    "TrainerConfig",
    "LoggerConfig",
    "RLRun",
    "GRPOConfig",
    "ADVANTAGE_ESTIMATORS",
    "ROLLOUT_BACKENDS",
    "SCHEDULERS",
    "DTYPES",
    "WANDB_MODES",
    "ConfigError",
    "require",
    "check_choice",
    "check_model",
    "check_episode",
    "check_sandbox",
    "check_env_options",
    "check_env",
    "check_sampling",
    "check_rollout",
    "check_optim",
    "check_policy_loss",
    "check_run",
    "check_trainer",
    "check_logger",
    "check_reward",
    "check_rl_run",
    "conf_dir",
    "default_judge",
    "default_reward",
    "default_task_options",
    "load_config",
    "to_config",
    "config_to_dict",
    "closest_key",
    "config_keys",
    "unknown_key_message",
    "register_configs",
]

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")
ROLLOUT_BACKENDS = ("hf", "vllm")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
SCHEMA_NAME = "grpo_schema"


class ConfigError(ValueError):
    """A configuration the user must change: an unknown key, a value out of range, a path that
    does not exist, a run folder whose checkpoint disagrees. The entry points print its message
    alone, without a traceback (`algos.cli`)."""


# --------------------------------------------------------------------------------------------
# Schema: the blocks, each defined once; every entry point's config is made of them
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al. 2021); when enabled only the adapters train and are checkpointed."""

    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def adapter_kwargs(self) -> dict[str, Any] | None:
        """`agents.policy.Policy.load`'s `lora` argument: the adapters' shape, or None when disabled."""
        if not self.enabled:
            return None
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}


@dataclass
class ModelConfig:
    """The policy: what to load (`agents.loading.load_model` spec) and how to train it. Trainers and
    evaluation share this block and its `conf/model/` presets; gradient_checkpointing and
    freeze_vision are how a trainer trains it, so they matter to training runs only."""

    path: str = "Qwen/Qwen3-VL-8B-Instruct"
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    freeze_vision: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    chat_template: Optional[str] = None  # None: the checkpoint's own; a built-in name or a .jinja path
    tool_response_format: str = "codevision"  # tool replies: codevision (CodeVision SFT layout) | default


@dataclass
class SandboxConfig:
    """Resources of the code sandbox that runs the policy's tool calls."""

    workers: int = 0
    timeout_s: float = 10.0
    memory_mb: int = 2048

    def to_kwargs(self) -> dict[str, Any]:
        """Arguments of `cv_env`'s sandbox, with `workers=0` resolved to one per CPU core."""
        workers = self.workers or max(1, os.cpu_count() or 1)
        return {"workers": workers, "timeout_s": self.timeout_s, "memory_mb": self.memory_mb}


def default_task_options() -> dict[str, Any]:
    """Every task-loader option (`cv_env.tasks.TASK_OPTIONS`) at None, the loader's default."""
    return {name: None for names in TASK_OPTIONS.values() for name in names}


def default_judge() -> dict[str, Any]:
    """The LLM judge's settings (`cv_env.judge.JudgeConfig`), off: `url` null means no judge."""
    return {"url": None, "model": None,
            **{f.name: f.default for f in dataclasses.fields(JudgeConfig) if f.name not in ("url", "model")}}


def default_reward() -> dict[str, Any]:
    """The default reward weights as a dict. Every key is present from the start, so in struct
    mode a misspelt reward key is an error at composition, like any other key."""
    return RewardConfig().to_dict()


@dataclass
class EnvConfig:
    """The CodeVision environment: which tasks, how long an episode may run, image budget."""

    tasks: Optional[str] = "synthetic"
    split: str = "train"
    max_turns: int = 12
    max_pixels: int = 1024 * 28 * 28
    prompt: str = "full"
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    val_tasks: Optional[str] = None
    val_split: str = "validation"
    # Task-loader options for tasks and val_tasks (every key present; None = the loader's default).
    tasks_options: dict[str, Any] = field(default_factory=default_task_options)
    # The LLM judge of answers the rules reject, `cv_env.judge.JudgeConfig` (url null = no judge).
    judge: dict[str, Any] = field(default_factory=default_judge)


@dataclass
class RolloutConfig:
    """Sampling of trajectories: engine, group size, decoding and length budgets (GRPO and PPO)."""

    backend: str = "hf"
    n: int = 8
    prompts_per_step: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 2048
    max_total_tokens: int = 16384
    val_temperature: float = 0.0
    gpu_memory_utilization: float = 0.6
    tensor_parallel_size: int = 1
    max_images: int = 16
    enable_prefix_caching: bool = True
    enforce_eager: bool = False


@dataclass
class KLConfig:
    """KL regularisation toward the frozen reference policy."""

    in_loss: bool = True
    coef: float = 0.001
    kind: str = "k3"


# The `algo` block of each trainer is one flat node (`algo.lr`, `algo.clip_ratio_low`, ...); the
# field sets they share are written once below and included by subclassing. No subclass changes
# the type of a field it includes.


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`algos.optim`): the fields every `algo` block starts with."""

    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "constant"
    grad_clip: float = 1.0


@dataclass
class PolicyLossConfig(OptimConfig):
    """The clipped-surrogate update of the policy, GRPO's and PPO's alike: clip ratios, KL, entropy,
    aggregation, epochs and batch sizes."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: Optional[float] = 10.0
    kl: KLConfig = field(default_factory=KLConfig)
    loss_agg: str = "token-mean"
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batch_size: int = 32
    micro_batch_size: int = 8
    mask_truncated: bool = True


@dataclass
class AlgoConfig(PolicyLossConfig):
    """The GRPO update: group-relative advantages on top of the clipped surrogate."""

    advantage_estimator: str = "grpo"
    dynamic_sampling: bool = False


@dataclass
class TrainerConfig:
    """Run length, validation, checkpoints and resume of an RL run (GRPO and PPO)."""

    total_steps: int = 200
    val_every: int = 10
    val_size: int = 256
    val_before_train: bool = True
    save_every: int = 10
    keep_last: int = 3
    output_dir: str = "outputs/grpo"
    seed: int = 0
    resume: str = "auto"
    sample_table_every: int = 10
    sample_table_rows: int = 8
    fsdp: bool = False  # FSDP2 sharding under torchrun: algos.grpo; PPO refuses it (`check_no_fsdp`)


@dataclass
class LoggerConfig:
    """Where metrics go: W&B (`mode`), a local metrics.jsonl, a console progress bar."""

    project: str = "codevision-gym"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"
    metrics_jsonl: Optional[str] = "metrics.jsonl"
    progress_bar: bool = True


class RLRun:
    """What the RL trainers' configs (`GRPOConfig`, `PPOConfig`) give the environment, from their
    `env` and `reward` blocks. Methods only: each config lists its own fields."""

    env: EnvConfig
    reward: dict[str, Any]

    def reward_config(self) -> RewardConfig:
        """The reward weights as the environment's typed `RewardConfig`."""
        return RewardConfig.from_dict(dict(self.reward))

    def env_kwargs(self, validation: bool = False) -> dict[str, Any]:
        """Keyword arguments of `gym.make("CodeVision-v0", ...)` for training or validation.

        Validation reads `env.val_tasks` (or `env.tasks` when null) on `env.val_split`.
        """
        e = self.env
        tasks, split = (e.val_tasks or e.tasks, e.val_split) if validation else (e.tasks, e.split)
        return {
            "tasks": tasks,
            "split": split,
            "max_turns": e.max_turns,
            "max_pixels": e.max_pixels,
            "prompt": e.prompt,
            "reward": self.reward_config(),
            "sandbox": e.sandbox.to_kwargs(),
            "judge": dict(e.judge),  # url null: no judge (cv_env.judge.make_judge)
        }


@dataclass
class GRPOConfig(RLRun):
    """Everything `python -m algos.grpo` reads. Validated on construction (see module doc)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Plain values of a `conf/reward/` preset; `cv_env.reward.RewardConfig.from_dict` types them.
    reward: dict[str, Any] = field(default_factory=default_reward)

    def __post_init__(self) -> None:
        estimator = self.algo.advantage_estimator
        check_choice(estimator, ADVANTAGE_ESTIMATORS, "algo.advantage_estimator")
        check_rl_run(self, min_group=2, why=f": {estimator} compares the rollouts of a prompt")


# --------------------------------------------------------------------------------------------
# Value checks, one per block (types are already enforced by OmegaConf; these are ranges and
# relations). Each entry point's config calls the checks of the blocks it is made of.
# --------------------------------------------------------------------------------------------


def require(ok: bool, key: str, message: str) -> None:
    """Raise `ConfigError("config <key>: <message>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"config {key}: {message}")


def check_choice(value: str, choices: Sequence[str], key: str) -> None:
    require(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def check_model(m: ModelConfig, extra_specs: str = "") -> None:
    """The `model` block: a spec to load, a dtype, a tool-reply layout, and LoRA's shape when enabled.
    extra_specs: what else `model.path` may name at this entry point (evaluation: scripted agents)."""
    require(bool(m.path.strip()), "model.path", f"is empty: give {extra_specs}tiny:<family>, a hub id or a local folder")
    check_choice(m.dtype, DTYPES, "model.dtype")
    check_choice(m.tool_response_format, TOOL_RESPONSE_FORMATS, "model.tool_response_format")
    lora = m.lora
    if lora.enabled:
        require(lora.r > 0, "model.lora.r", f"must be > 0, got {lora.r}")
        require(lora.alpha > 0, "model.lora.alpha", f"must be > 0, got {lora.alpha}")
        require(0.0 <= lora.dropout < 1.0, "model.lora.dropout", f"must lie in [0, 1), got {lora.dropout}")
        require(len(lora.target_modules) > 0, "model.lora.target_modules", "is empty: name the modules to adapt")


def check_episode(max_turns: int | None, max_pixels: int, prompt: str, prefix: str) -> None:
    """How an episode runs: its turn limit (None: set elsewhere), image budget and prompt preset
    (`<prefix>max_turns`, `<prefix>max_pixels`, `<prefix>prompt`)."""
    if max_turns is not None:
        require(max_turns >= 1, f"{prefix}max_turns", f"must be >= 1, got {max_turns}")
    require(max_pixels >= 28 * 28, f"{prefix}max_pixels", f"must be >= 784 (one 28x28 patch), got {max_pixels}")
    check_choice(prompt, tuple(PROMPTS), f"{prefix}prompt")


def check_sandbox(s: SandboxConfig, prefix: str) -> None:
    """The sandbox block (`<prefix>sandbox.workers`, ...)."""
    require(s.workers >= 0, f"{prefix}sandbox.workers", f"must be >= 0 (0 = one per CPU core), got {s.workers}")
    require(s.timeout_s > 0, f"{prefix}sandbox.timeout_s", f"must be > 0, got {s.timeout_s}")
    require(s.memory_mb > 0, f"{prefix}sandbox.memory_mb", f"must be > 0, got {s.memory_mb}")


def check_env_options(tasks_options: dict[str, Any], judge: dict[str, Any], prefix: str) -> None:
    """The task-loader options and the judge node (`<prefix>tasks_options`, `<prefix>judge`)."""
    known = default_task_options()
    unknown = sorted(set(tasks_options) - set(known))
    require(not unknown, f"{prefix}tasks_options",
            f"unknown option(s) {unknown}; the loaders take: {', '.join(known)}")
    if judge.get("url"):
        try:
            JudgeConfig.from_dict(judge)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config {prefix}judge: {err}") from err


def check_env(e: EnvConfig) -> None:
    """The trainers' `env` block."""
    require(e.tasks is not None and bool(e.tasks.strip()), "env.tasks",
            "is not set: give a task source, e.g. env.tasks=synthetic or env.tasks=/data/train.parquet")
    check_episode(e.max_turns, e.max_pixels, e.prompt, "env.")
    check_sandbox(e.sandbox, "env.")
    check_env_options(e.tasks_options, e.judge, "env.")


def check_sampling(top_p: float, top_k: int, max_new_tokens: int, max_total_tokens: int, prefix: str) -> None:
    """Decoding and length budgets shared by training rollouts and evaluation (`<prefix>top_p`, ...)."""
    require(0.0 < top_p <= 1.0, f"{prefix}top_p", f"must lie in (0, 1], got {top_p}")
    require(top_k >= 0, f"{prefix}top_k", f"must be >= 0 (0 = off), got {top_k}")
    require(max_new_tokens >= 1, f"{prefix}max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    require(max_total_tokens >= max_new_tokens, f"{prefix}max_total_tokens",
            f"{max_total_tokens} must be >= {prefix}max_new_tokens ({max_new_tokens})")


def check_rollout(r: RolloutConfig, e: EnvConfig, min_group: int, why: str) -> None:
    """The `rollout` block; `rollout.n` must be at least `min_group` (`why`: what needs the group)."""
    check_choice(r.backend, ROLLOUT_BACKENDS, "rollout.backend")
    require(r.n >= min_group, "rollout.n", f"must be >= {min_group}{why}, got {r.n}")
    require(r.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {r.prompts_per_step}")
    require(r.temperature > 0, "rollout.temperature", f"must be > 0 for training rollouts, got {r.temperature}")
    require(r.val_temperature >= 0, "rollout.val_temperature", f"must be >= 0 (0 = greedy), got {r.val_temperature}")
    check_sampling(r.top_p, r.top_k, r.max_new_tokens, r.max_total_tokens, "rollout.")
    require(0.0 < r.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization",
            f"must lie in (0, 1], got {r.gpu_memory_utilization}")
    require(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", f"must be >= 1, got {r.tensor_parallel_size}")
    require(r.backend != "vllm" or r.max_images >= e.max_turns, "rollout.max_images",
            f"{r.max_images} is fewer than an episode can show (the task's image and one per tool call over "
            f"env.max_turns={e.max_turns} turns): raise it to at least {e.max_turns}")


def check_optim(a: OptimConfig) -> None:
    """AdamW and its schedule (`algo.lr`, ...)."""
    require(a.lr > 0, "algo.lr", f"must be > 0, got {a.lr}")
    require(a.warmup_steps >= 0, "algo.warmup_steps", f"must be >= 0, got {a.warmup_steps}")
    require(a.weight_decay >= 0, "algo.weight_decay", f"must be >= 0, got {a.weight_decay}")
    require(len(a.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in a.adam_betas), "algo.adam_betas",
            f"must be two numbers in [0, 1), got {list(a.adam_betas)}")
    check_choice(a.scheduler, SCHEDULERS, "algo.scheduler")
    require(a.grad_clip > 0, "algo.grad_clip", f"must be > 0, got {a.grad_clip}")


def check_policy_loss(a: PolicyLossConfig, r: RolloutConfig) -> None:
    """The clipped-surrogate update and its batch sizes against the rollout's."""
    check_optim(a)
    require(0.0 <= a.clip_ratio_low < 1.0, "algo.clip_ratio_low", f"must lie in [0, 1), got {a.clip_ratio_low}")
    require(a.clip_ratio_high >= 0.0, "algo.clip_ratio_high", f"must be >= 0, got {a.clip_ratio_high}")
    require(a.clip_ratio_c is None or a.clip_ratio_c > 1.0, "algo.clip_ratio_c",
            f"must be > 1, or null to disable the dual clip, got {a.clip_ratio_c}")
    # The mode names live beside their math; imported here so that `algos.config` itself (which
    # the torch-free `algos.eval_config` builds on) never imports torch.
    from algos.losses import AGG_MODES, KL_KINDS

    check_choice(a.kl.kind, KL_KINDS, "algo.kl.kind")
    require(a.kl.coef >= 0.0, "algo.kl.coef", f"must be >= 0 (0 = no KL, no reference model), got {a.kl.coef}")
    check_choice(a.loss_agg, AGG_MODES, "algo.loss_agg")
    require(a.entropy_coef >= 0.0, "algo.entropy_coef", f"must be >= 0, got {a.entropy_coef}")
    require(a.ppo_epochs >= 1, "algo.ppo_epochs", f"must be >= 1, got {a.ppo_epochs}")
    require(a.mini_batch_size >= 1, "algo.mini_batch_size", f"must be >= 1, got {a.mini_batch_size}")
    require(a.micro_batch_size >= 1, "algo.micro_batch_size", f"must be >= 1, got {a.micro_batch_size}")
    require(r.prompts_per_step % a.mini_batch_size == 0, "algo.mini_batch_size",
            f"{a.mini_batch_size} prompts must divide rollout.prompts_per_step ({r.prompts_per_step})")
    trajectories_per_mini_batch = a.mini_batch_size * r.n
    require(trajectories_per_mini_batch % a.micro_batch_size == 0, "algo.micro_batch_size",
            f"{a.micro_batch_size} trajectories must divide a mini-batch of algo.mini_batch_size x rollout.n = "
            f"{trajectories_per_mini_batch} trajectories")


def check_run(t: Any, zero_means: str) -> None:
    """The run fields every trainer's `trainer` block has (`zero_means`: what val_every=0 and
    save_every=0 mean there); the run's length is the entry point's own check."""
    for key in ("val_every", "save_every"):
        value = getattr(t, key)
        require(value >= 0, f"trainer.{key}", f"must be >= 0 (0 = {zero_means}), got {value}")
    require(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}")
    require(bool(t.output_dir.strip()), "trainer.output_dir", "is empty")
    require(t.resume in ("auto", "never") or bool(t.resume.strip()), "trainer.resume",
            "must be 'auto', 'never' or a checkpoint path")


def check_trainer(t: TrainerConfig) -> None:
    """The RL trainers' `trainer` block."""
    require(t.total_steps >= 1, "trainer.total_steps", f"must be >= 1, got {t.total_steps}")
    check_run(t, "never")
    require(t.sample_table_every >= 0, "trainer.sample_table_every", f"must be >= 0 (0 = never), got {t.sample_table_every}")
    require(t.val_size >= 0, "trainer.val_size", f"must be >= 0, got {t.val_size}")
    require(t.sample_table_rows >= 1, "trainer.sample_table_rows", f"must be >= 1, got {t.sample_table_rows}")


def check_logger(lg: LoggerConfig) -> None:
    """The `logger` block."""
    check_choice(lg.mode, WANDB_MODES, "logger.mode")


def check_reward(reward: dict[str, Any]) -> None:
    """A `reward` node: the values of a `conf/reward/` preset, as `RewardConfig` reads them."""
    try:
        RewardConfig.from_dict(dict(reward))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config reward: {err}") from err


def check_rl_run(cfg: Any, min_group: int, why: str = "") -> None:
    """Every block GRPO and PPO share: model, env, rollout (at least `min_group` trajectories per
    prompt; `why`: what needs them), the clipped-surrogate part of `algo`, trainer, logger, reward."""
    check_model(cfg.model)
    check_env(cfg.env)
    check_rollout(cfg.rollout, cfg.env, min_group, why)
    check_policy_loss(cfg.algo, cfg.rollout)
    check_trainer(cfg.trainer)
    check_logger(cfg.logger)
    check_reward(cfg.reward)


# --------------------------------------------------------------------------------------------
# Hydra plumbing
# --------------------------------------------------------------------------------------------


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore as `grpo_schema` (idempotent).

    `conf/grpo.yaml` lists it first in its defaults, so every later value merges into the typed
    schema and is checked against it.
    """
    ConfigStore.instance().store(name=SCHEMA_NAME, node=GRPOConfig)


register_configs()


def conf_dir() -> Path:
    """The folder holding `grpo.yaml` and the config groups.

    A wheel installs `conf/` as the package `algos.conf` (see setup.py), next to this file; a
    source or editable checkout keeps it at the repository root.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "grpo.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Hydra config folder found: looked for grpo.yaml in {here / 'conf'} (wheel install) and "
        f"{here.parent / 'conf'} (source checkout); reinstall the package or restore conf/"
    )


def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The valid dotted key a misspelt or incomplete `key` most likely meant, or None.

    A key whose last part names exactly one valid key's last part gets that key (`output_dir`
    -> `trainer.output_dir`); otherwise the closest spelling (`trainer.totl_steps` ->
    `trainer.total_steps`), compared over whole keys, then over last parts.
    """
    known = sorted(set(known))
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    whole = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if whole:
        return whole[0]
    by_leaf = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[leaves[0]] if leaves else None


def unknown_key_message(key: str, known: Iterable[str], command: str = "") -> str:
    """`config <key>: unknown key; did you mean <closest>?` plus where every valid key is listed."""
    suggestion = closest_key(key, known)
    hint = f"did you mean {suggestion}?" if suggestion else "check the spelling"
    listing = f"`{command} --cfg job` prints every key" if command else "the schema in algos/*config.py lists every key"
    return f"config {key}: unknown key; {hint} ({listing})"


def config_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config down to its values (`trainer.total_steps`, `reward.alpha`)."""
    keys = []
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none() and len(child):
            keys.extend(config_keys(child, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _reject_unknown_keys(node: DictConfig, prefix: str = "", root: DictConfig | None = None) -> None:
    # Struct mode stops `algo.lrr=1`, but Hydra's `+algo.lrr=1` ("append") opens the node, and
    # OmegaConf.to_object would then silently drop the key: refuse it here instead.
    root = node if root is None else root
    schema = OmegaConf.get_type(node)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return
    known = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys():
        full_key = f"{prefix}{key}"
        if key not in known:
            valid = [k for k in config_keys(root) if k != full_key and not k.startswith(full_key + ".")]
            raise ConfigError(unknown_key_message(full_key, valid))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _reject_unknown_keys(child, f"{full_key}.", root)


def to_config(cfg: DictConfig) -> Any:
    """Turn a composed `DictConfig` into its schema's dataclass (runs the value checks).

    Raises:
        ConfigError: a key the schema does not know (even one added with Hydra's `+key=`), or a
            value out of range.
    """
    _reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)


def load_config(overrides: Sequence[str] = (), config_name: str = "grpo") -> GRPOConfig:
    """Compose `conf/<config_name>.yaml` with command-line style overrides; return the dataclass.

    Args:
        overrides: Hydra overrides, as on the command line: `["+exp=tiny", "algo.lr=1e-5"]`.
        config_name: the primary config (`grpo`).

    Raises:
        hydra.errors.ConfigCompositionException: unknown keys, wrong types or missing groups
            (the message names the key).
        ConfigError: a value out of range (`config algo.clip_ratio_low: must lie in [0, 1), ...`).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of strings like ['+exp=tiny'], got the string {overrides!r}")
    if GlobalHydra.instance().is_initialized():
        raise RuntimeError(
            "load_config cannot run inside a Hydra app (Hydra is already initialised); "
            "use the config your @hydra_main function received"
        )
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=config_name):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return to_config(cfg)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (for W&B's run config and checkpoint metadata)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    raise TypeError(f"expected a config dataclass or DictConfig, got {type(cfg).__name__}")
