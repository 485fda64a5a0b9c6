"""Typed configuration of `python -m algos.sft`: the Hydra structured config behind `conf/sft.yaml`.

Same conventions as `algos.config` (which this reuses for `model` and `logger`): the dataclasses
are the schema, `conf/sft.yaml` and `conf/exp/*sft*.yaml` carry the values with a one-line
comment per key, composition runs in struct mode (a misspelt key is an error), and the value
checks run when the composed config becomes an `SFTConfig`.

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

from algos.config import DTYPES, SCHEDULERS, WANDB_MODES, ConfigError, LoggerConfig, ModelConfig, load_config
from agents.templates import TOOL_RESPONSE_FORMATS
from cv_env.protocol import PROMPTS

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
class SFTAlgoConfig:
    """The optimisation: token-mean cross-entropy on assistant tokens, AdamW, LR schedule."""

    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"
    grad_clip: float = 1.0
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


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}: {message}")


def _choice(value: str, choices: Sequence[str], key: str) -> None:
    _require(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def _validate(cfg: SFTConfig) -> None:
    m, d, a, t = cfg.model, cfg.data, cfg.algo, cfg.trainer
    _require(bool(m.path.strip()), "model.path", "is empty: give tiny:<family>, a hub id or a local folder")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(m.tool_response_format, TOOL_RESPONSE_FORMATS, "model.tool_response_format")
    if m.lora.enabled:
        _require(m.lora.r > 0, "model.lora.r", f"must be > 0, got {m.lora.r}")
        _require(m.lora.alpha > 0, "model.lora.alpha", f"must be > 0, got {m.lora.alpha}")
        _require(0.0 <= m.lora.dropout < 1.0, "model.lora.dropout", f"must lie in [0, 1), got {m.lora.dropout}")

    _require(bool(d.train_files) or bool(d.oracle.tasks), "data.train_files",
             "is empty and data.oracle.tasks is not set: give demonstration files (data.train_files=[a.jsonl]) "
             "or let the oracle record some (data.oracle.tasks=synthetic)")
    _require(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must lie in [0, 1), got {d.val_fraction}")
    _require(d.val_size >= 0, "data.val_size", f"must be >= 0, got {d.val_size}")
    _require(d.oracle.num_tasks >= 1, "data.oracle.num_tasks", f"must be >= 1, got {d.oracle.num_tasks}")
    _require(d.oracle.max_turns >= 1, "data.oracle.max_turns", f"must be >= 1, got {d.oracle.max_turns}")
    _require(d.oracle.workers >= 1, "data.oracle.workers", f"must be >= 1, got {d.oracle.workers}")
    _require(0.0 <= d.oracle.tool_rate <= 1.0, "data.oracle.tool_rate",
             f"must be within [0, 1] (the share of tasks the oracle solves with the tool), got {d.oracle.tool_rate}")
    _require(d.max_tokens >= 16, "data.max_tokens", f"must be >= 16, got {d.max_tokens}")
    _require(d.max_pixels >= 28 * 28, "data.max_pixels", f"must be >= 784 (one 28x28 patch), got {d.max_pixels}")
    _choice(d.system_prompt, SYSTEM_PROMPT_MODES, "data.system_prompt")
    _choice(d.prompt, tuple(PROMPTS), "data.prompt")
    _choice(d.on_invalid, ON_INVALID_MODES, "data.on_invalid")

    _require(a.lr > 0, "algo.lr", f"must be > 0, got {a.lr}")
    _require(a.warmup_steps >= 0, "algo.warmup_steps", f"must be >= 0, got {a.warmup_steps}")
    _require(a.weight_decay >= 0, "algo.weight_decay", f"must be >= 0, got {a.weight_decay}")
    _require(len(a.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in a.adam_betas), "algo.adam_betas",
             f"must be two numbers in [0, 1), got {list(a.adam_betas)}")
    _choice(a.scheduler, SCHEDULERS, "algo.scheduler")
    _require(a.grad_clip > 0, "algo.grad_clip", f"must be > 0, got {a.grad_clip}")
    _require(a.batch_size >= 1, "algo.batch_size", f"must be >= 1, got {a.batch_size}")
    _require(a.micro_batch_size >= 1, "algo.micro_batch_size", f"must be >= 1, got {a.micro_batch_size}")
    _require(a.max_tokens_per_micro_batch >= 1, "algo.max_tokens_per_micro_batch",
             f"must be >= 1, got {a.max_tokens_per_micro_batch}")

    _require(t.epochs >= 1 or t.total_steps >= 1, "trainer.epochs", "and trainer.total_steps are both 0: set one")
    _require(t.total_steps >= 0, "trainer.total_steps", f"must be >= 0 (0 = from trainer.epochs), got {t.total_steps}")
    _require(t.val_every >= 0, "trainer.val_every", f"must be >= 0 (0 = only at the end), got {t.val_every}")
    _require(t.save_every >= 0, "trainer.save_every", f"must be >= 0 (0 = only at the end), got {t.save_every}")
    _require(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}")
    _require(bool(t.output_dir.strip()), "trainer.output_dir", "is empty")
    _require(t.resume in ("auto", "never") or bool(t.resume.strip()), "trainer.resume",
             "must be 'auto', 'never' or a checkpoint path")
    _choice(cfg.logger.mode, WANDB_MODES, "logger.mode")


def register_sft_configs() -> None:
    """Store the schema in Hydra's ConfigStore as `sft_schema` (idempotent); `conf/sft.yaml` lists it first."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SFTConfig)


register_sft_configs()


def load_sft_config(overrides: Sequence[str] = ()) -> SFTConfig:
    """Compose `conf/sft.yaml` with command-line style overrides (`["+exp=tiny_sft"]`); return the dataclass."""
    return load_config(overrides, config_name="sft")
