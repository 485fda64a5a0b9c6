"""Typed configuration of `python -m algos.sft`: the Hydra structured config behind `conf/sft.yaml`.

Same conventions as `algos.config`, whose blocks (`model`, `logger`, the optimiser fields of
`algo`) and checks this reuses; it adds the `data` block and SFT's batches and run length. The
dataclasses are the schema, `conf/sft.yaml` and `conf/exp/*sft*.yaml` carry the values with a
one-line comment per key, composition runs in struct mode (a misspelt key is an error), and the
value checks run when the composed config becomes an `SFTConfig`.

    cfg = load_sft_config(["+exp=tiny_sft", "algo.lr=1e-4"])     # tests, notebooks
    python -m algos.sft +exp=tiny_sft                             # the entry point

Batch sizes count examples (conversations): `algo.batch_size` per optimizer step, split into
micro-batches of `algo.micro_batch_size` (or, with `algo.packing`, bins of at most
`algo.max_tokens_per_micro_batch` padded tokens) for gradient accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore

from algos.config import (LoggerConfig, ModelConfig, OptimConfig, check_choice, check_episode, check_logger, check_model,
                          check_optim, check_run, load_config, require)

__all__ = ["OracleDemoConfig", "SFTDataConfig", "SFTAlgoConfig", "SFTTrainerConfig", "SFTConfig",
           "load_sft_config", "register_sft_configs"]

SCHEMA_NAME = "sft_schema"
SYSTEM_PROMPT_MODES = ("env", "keep")
ON_INVALID_MODES = ("raise", "skip")


@dataclass
class OracleDemoConfig:
    """Oracle demonstrations collected before training (`agents.collect`) when `tasks` is set."""

    tasks: Optional[str] = None
    split: str = "train"
    num_tasks: int = 256
    max_turns: int = 4
    workers: int = 2
    tool_rate: float = 1.0


@dataclass
class SFTDataConfig:
    """Where the demonstrations come from and how they are rendered (see algos/sft_data.py)."""

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    val_size: int = 256
    oracle: OracleDemoConfig = field(default_factory=OracleDemoConfig)
    max_tokens: int = 16384
    max_pixels: int = 1024 * 28 * 28
    system_prompt: str = "env"
    prompt: str = "full"
    on_invalid: str = "raise"


@dataclass
class SFTAlgoConfig(OptimConfig):
    """The optimisation: token-mean cross-entropy on assistant tokens, AdamW, LR schedule, batches."""

    lr: float = 1e-5  # SFT's defaults for the optimiser fields it shares with RL
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    batch_size: int = 32
    micro_batch_size: int = 2
    packing: bool = False
    max_tokens_per_micro_batch: int = 16384


@dataclass
class SFTTrainerConfig:
    """Run length, validation loss, checkpoints and resume."""

    epochs: int = 3
    total_steps: int = 0
    val_every: int = 50
    val_before_train: bool = True
    save_every: int = 200
    keep_last: int = 2
    output_dir: str = "outputs/sft"
    seed: int = 0
    resume: str = "auto"


@dataclass
class SFTConfig:
    """Everything `python -m algos.sft` reads. Validated on construction."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    algo: SFTAlgoConfig = field(default_factory=SFTAlgoConfig)
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: SFTConfig) -> None:
    m, d, a, t = cfg.model, cfg.data, cfg.algo, cfg.trainer
    check_model(m)

    require(bool(d.train_files) or bool(d.oracle.tasks), "data.train_files",
            "is empty and data.oracle.tasks is not set: give demonstration files (data.train_files=[a.jsonl]) "
            "or let the oracle record some (data.oracle.tasks=synthetic)")
    require(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must lie in [0, 1), got {d.val_fraction}")
    require(d.val_size >= 0, "data.val_size", f"must be >= 0, got {d.val_size}")
    require(d.oracle.num_tasks >= 1, "data.oracle.num_tasks", f"must be >= 1, got {d.oracle.num_tasks}")
    require(d.oracle.max_turns >= 1, "data.oracle.max_turns", f"must be >= 1, got {d.oracle.max_turns}")
    require(d.oracle.workers >= 1, "data.oracle.workers", f"must be >= 1, got {d.oracle.workers}")
    require(0.0 <= d.oracle.tool_rate <= 1.0, "data.oracle.tool_rate",
            f"must be within [0, 1] (the share of tasks the oracle solves with the tool), got {d.oracle.tool_rate}")
    require(d.max_tokens >= 16, "data.max_tokens", f"must be >= 16, got {d.max_tokens}")
    check_episode(None, d.max_pixels, d.prompt, "data.")  # the turn limit is data.oracle.max_turns, above
    check_choice(d.system_prompt, SYSTEM_PROMPT_MODES, "data.system_prompt")
    check_choice(d.on_invalid, ON_INVALID_MODES, "data.on_invalid")

    check_optim(a)
    require(a.batch_size >= 1, "algo.batch_size", f"must be >= 1, got {a.batch_size}")
    require(a.micro_batch_size >= 1, "algo.micro_batch_size", f"must be >= 1, got {a.micro_batch_size}")
    require(a.max_tokens_per_micro_batch >= 1, "algo.max_tokens_per_micro_batch",
            f"must be >= 1, got {a.max_tokens_per_micro_batch}")

    require(t.epochs >= 1 or t.total_steps >= 1, "trainer.epochs", "and trainer.total_steps are both 0: set one")
    require(t.total_steps >= 0, "trainer.total_steps", f"must be >= 0 (0 = from trainer.epochs), got {t.total_steps}")
    check_run(t, "only at the end")
    check_logger(cfg.logger)


def register_sft_configs() -> None:
    """Store the schema in Hydra's ConfigStore as `sft_schema` (idempotent); `conf/sft.yaml` lists it first."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SFTConfig)


register_sft_configs()


def load_sft_config(overrides: Sequence[str] = ()) -> SFTConfig:
    """Compose `conf/sft.yaml` with command-line style overrides (`["+exp=tiny_sft"]`); return the dataclass."""
    return load_config(overrides, config_name="sft")
