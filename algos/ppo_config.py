"""Typed configuration of `python -m algos.ppo`: the Hydra structured config behind `conf/ppo.yaml`.

Same conventions as `algos.config`, whose pieces it reuses (`model`, `env`, `rollout`, `trainer`,
`logger`, `reward`): the dataclasses are the schema, `conf/ppo.yaml` and `conf/exp/*ppo*.yaml`
carry the values with a one-line comment per key, composition runs in struct mode (a misspelt
key is an error), and the value checks run when the composed config becomes a `PPOConfig`.

    cfg = load_ppo_config(["+exp=tiny_ppo", "critic.lr=1e-4"])   # tests, notebooks
    python -m algos.ppo +exp=tiny_ppo                             # the entry point

What PPO adds to GRPO's settings: `algo.gamma` / `algo.lam` (GAE over the sampled tokens, with
the env's dense turn rewards), `algo.whiten_advantages`, and the `critic` group (where the value
function lives, its learning rate, value clipping and warm-up). Batch sizes count as in GRPO:
`rollout.prompts_per_step` and `algo.mini_batch_size` count prompts (of `rollout.n` trajectories
each; PPO needs no groups, so `rollout.n=1` is allowed), `algo.micro_batch_size` trajectories.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore

from algos.config import AlgoConfig, ConfigError, GRPOConfig, KLConfig, load_config

__all__ = ["CRITIC_KINDS", "PPOAlgoConfig", "CriticConfig", "PPOConfig", "load_ppo_config", "register_ppo_configs"]

SCHEMA_NAME = "ppo_schema"
CRITIC_KINDS = ("shared", "separate")


@dataclass
class PPOAlgoConfig:
    """The PPO update: GAE advantages, clipped surrogate, KL, optimisation of the policy."""

    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: Optional[float] = 10.0
    kl: KLConfig = field(default_factory=KLConfig)
    loss_agg: str = "token-mean"
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batch_size: int = 32
    micro_batch_size: int = 8
    grad_clip: float = 1.0
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "constant"
    mask_truncated: bool = True


@dataclass
class CriticConfig:
    """The value function V(s) that GAE reads and its optimisation."""

    kind: str = "shared"
    path: Optional[str] = None
    value_grad_to_trunk: bool = True
    freeze_vision: bool = True
    lr: float = 1e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    vf_coef: float = 0.5
    clip_range: Optional[float] = 0.5
    warmup_steps: int = 0


@dataclass
class PPOConfig(GRPOConfig):
    """Everything `python -m algos.ppo` reads. Validated on construction (see module doc)."""

    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)

    def __post_init__(self) -> None:
        _validate(self)

    def critic_algo(self) -> AlgoConfig:
        """The critic's optimiser settings in the shape `algos.train_step.build_optimizer` and
        `build_scheduler` read (its own lr and weight decay; the policy's betas and schedule)."""
        return dataclasses.replace(self._shared_algo(), lr=self.critic.lr, weight_decay=self.critic.weight_decay)

    def _shared_algo(self) -> AlgoConfig:
        a = self.algo
        shared = {f.name: getattr(a, f.name) for f in dataclasses.fields(AlgoConfig) if hasattr(a, f.name)}
        return AlgoConfig(**shared)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}: {message}")


def _validate(cfg: PPOConfig) -> None:
    r, a, c = cfg.rollout, cfg.algo, cfg.critic
    _require(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}")
    _require(a.micro_batch_size >= 1, "algo.micro_batch_size", f"must be >= 1, got {a.micro_batch_size}")
    _require(a.mini_batch_size >= 1, "algo.mini_batch_size", f"must be >= 1, got {a.mini_batch_size}")
    trajectories_per_mini_batch = a.mini_batch_size * r.n
    _require(
        trajectories_per_mini_batch % a.micro_batch_size == 0,
        "algo.micro_batch_size",
        f"{a.micro_batch_size} trajectories must divide a mini-batch of algo.mini_batch_size x rollout.n = "
        f"{trajectories_per_mini_batch} trajectories",
    )
    # Every other key means what it means for GRPO: its checks run on a GRPOConfig made of the same
    # values. Group size and micro-batch are set apart there, since GRPO's need for groups (n >= 2)
    # does not apply to PPO and the divisibility was checked above with the real n.
    GRPOConfig(
        model=cfg.model, env=cfg.env, rollout=dataclasses.replace(r, n=max(2, r.n)),
        algo=dataclasses.replace(cfg._shared_algo(), micro_batch_size=1), trainer=cfg.trainer,
        logger=cfg.logger, reward=cfg.reward,
    )
    _require(0.0 <= a.gamma <= 1.0, "algo.gamma", f"must lie in [0, 1], got {a.gamma}")
    _require(0.0 <= a.lam <= 1.0, "algo.lam", f"must lie in [0, 1], got {a.lam}")

    _require(c.kind in CRITIC_KINDS, "critic.kind", f"{c.kind!r} is not one of {', '.join(map(repr, CRITIC_KINDS))}")
    _require(c.path is None or bool(c.path.strip()), "critic.path",
             "is empty: give a model (tiny:<family>, hub id, folder) or null to start from model.path")
    _require(c.kind == "separate" or c.path is None, "critic.path",
             f"is set ({c.path!r}) but critic.kind is 'shared', whose value head sits on the policy: "
             "set critic.kind=separate to load a critic model, or critic.path=null")
    _require(c.lr > 0, "critic.lr", f"must be > 0, got {c.lr}")
    _require(c.weight_decay >= 0, "critic.weight_decay", f"must be >= 0, got {c.weight_decay}")
    _require(c.grad_clip > 0, "critic.grad_clip", f"must be > 0, got {c.grad_clip}")
    _require(c.vf_coef > 0, "critic.vf_coef", f"must be > 0, got {c.vf_coef}")
    _require(c.clip_range is None or c.clip_range > 0, "critic.clip_range",
             f"must be > 0, or null to disable value clipping, got {c.clip_range}")
    _require(c.warmup_steps >= 0, "critic.warmup_steps", f"must be >= 0 (0 = none), got {c.warmup_steps}")
    _require(c.warmup_steps < cfg.trainer.total_steps, "critic.warmup_steps",
             f"{c.warmup_steps} leaves no step to train the policy in trainer.total_steps={cfg.trainer.total_steps}")


def register_ppo_configs() -> None:
    """Store the schema in Hydra's ConfigStore as `ppo_schema` (idempotent); `conf/ppo.yaml` lists it first."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=PPOConfig)


register_ppo_configs()


def load_ppo_config(overrides: Sequence[str] = ()) -> PPOConfig:
    """Compose `conf/ppo.yaml` with command-line style overrides (`["+exp=tiny_ppo"]`); return the dataclass."""
    return load_config(overrides, config_name="ppo")
