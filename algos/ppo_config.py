"""Typed configuration of `python -m algos.ppo`: the Hydra structured config behind `conf/ppo.yaml`.

Same conventions as `algos.config`, whose blocks it is made of (`model`, `env`, `rollout`, the
clipped-surrogate fields of `algo`, `trainer`, `logger`, `reward`) and whose checks it calls; it
adds the `critic` block and GAE's fields. The dataclasses are the schema, `conf/ppo.yaml` and
`conf/exp/*ppo*.yaml` carry the values with a one-line comment per key, composition runs in
struct mode (a misspelt key is an error), and the value checks run when the composed config
becomes a `PPOConfig`.

    cfg = load_ppo_config(["+exp=tiny_ppo", "critic.lr=1e-4"])   # tests, notebooks
    python -m algos.ppo +exp=tiny_ppo                             # the entry point

What PPO adds to GRPO's settings: `algo.gamma` / `algo.lam` (GAE over the sampled tokens, with
the env's dense turn rewards), `algo.whiten_advantages`, and the `critic` group (where the value
function lives, its learning rate, value clipping and warm-up). Batch sizes count as in GRPO:
`rollout.prompts_per_step` and `algo.mini_batch_size` count prompts (of `rollout.n` trajectories
each; PPO needs no groups, so `rollout.n=1` is allowed), `algo.micro_batch_size` trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore

from algos.config import (EnvConfig, LoggerConfig, ModelConfig, OptimConfig, PolicyLossConfig, RLRun, RolloutConfig,
                          TrainerConfig, check_rl_run, default_reward, load_config, require)

__all__ = ["CRITIC_KINDS", "PPOAlgoConfig", "CriticConfig", "PPOConfig", "check_critic", "load_ppo_config",
           "register_ppo_configs"]

SCHEMA_NAME = "ppo_schema"
CRITIC_KINDS = ("shared", "separate")


@dataclass
class PPOAlgoConfig(PolicyLossConfig):
    """The PPO update of the policy: GAE advantages on top of the clipped surrogate."""

    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True


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


def default_ppo_trainer() -> TrainerConfig:
    """The RL trainer block with PPO's run folder."""
    return TrainerConfig(output_dir="outputs/ppo")


@dataclass
class PPOConfig(RLRun):
    """Everything `python -m algos.ppo` reads. Validated on construction (see module doc)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trainer: TrainerConfig = field(default_factory=default_ppo_trainer)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Plain values of a `conf/reward/` preset; `cv_env.reward.RewardConfig.from_dict` types them.
    reward: dict[str, Any] = field(default_factory=default_reward)

    def __post_init__(self) -> None:
        check_rl_run(self, min_group=1)  # PPO needs no groups: one trajectory per prompt is enough
        a = self.algo
        require(0.0 <= a.gamma <= 1.0, "algo.gamma", f"must lie in [0, 1], got {a.gamma}")
        require(0.0 <= a.lam <= 1.0, "algo.lam", f"must lie in [0, 1], got {a.lam}")
        check_critic(self.critic, self.trainer.total_steps)
        require(not self.trainer.fsdp, "trainer.fsdp",
                "FSDP2 sharding is implemented by algos.grpo only: PPO keeps a full policy and critic on every rank; "
                "set trainer.fsdp=false (or train with algos.grpo)")

    def critic_optim(self) -> OptimConfig:
        """The critic's optimiser settings as `algos.optim.build_optimizer` and `build_scheduler`
        read them: its own lr, weight decay and gradient clip; the policy's betas, warmup and schedule."""
        a, c = self.algo, self.critic
        return OptimConfig(lr=c.lr, warmup_steps=a.warmup_steps, weight_decay=c.weight_decay,
                           adam_betas=list(a.adam_betas), scheduler=a.scheduler, grad_clip=c.grad_clip)


def check_critic(c: CriticConfig, total_steps: int) -> None:
    """The `critic` block (its warm-up must leave steps to train the policy in `total_steps`)."""
    require(c.kind in CRITIC_KINDS, "critic.kind", f"{c.kind!r} is not one of {', '.join(map(repr, CRITIC_KINDS))}")
    require(c.path is None or bool(c.path.strip()), "critic.path",
            "is empty: give a model (tiny:<family>, hub id, folder) or null to start from model.path")
    require(c.kind == "separate" or c.path is None, "critic.path",
            f"is set ({c.path!r}) but critic.kind is 'shared', whose value head sits on the policy: "
            "set critic.kind=separate to load a critic model, or critic.path=null")
    require(c.lr > 0, "critic.lr", f"must be > 0, got {c.lr}")
    require(c.weight_decay >= 0, "critic.weight_decay", f"must be >= 0, got {c.weight_decay}")
    require(c.grad_clip > 0, "critic.grad_clip", f"must be > 0, got {c.grad_clip}")
    require(c.vf_coef > 0, "critic.vf_coef", f"must be > 0, got {c.vf_coef}")
    require(c.clip_range is None or c.clip_range > 0, "critic.clip_range",
            f"must be > 0, or null to disable value clipping, got {c.clip_range}")
    require(c.warmup_steps >= 0, "critic.warmup_steps", f"must be >= 0 (0 = none), got {c.warmup_steps}")
    require(c.warmup_steps < total_steps, "critic.warmup_steps",
            f"{c.warmup_steps} leaves no step to train the policy in trainer.total_steps={total_steps}")


def register_ppo_configs() -> None:
    """Store the schema in Hydra's ConfigStore as `ppo_schema` (idempotent); `conf/ppo.yaml` lists it first."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=PPOConfig)


register_ppo_configs()


def load_ppo_config(overrides: Sequence[str] = ()) -> PPOConfig:
    """Compose `conf/ppo.yaml` with command-line style overrides (`["+exp=tiny_ppo"]`); return the dataclass."""
    return load_config(overrides, config_name="ppo")
