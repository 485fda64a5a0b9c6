"""Checkpoints that let a killed run continue exactly where it stopped.

A checkpoint is a folder `<output_dir>/checkpoints/step_00000012/` holding

    model.safetensors     the policy's weights (only the trainable ones, i.e. the adapter, under PEFT)
    optimizer.pt          optimizer state, keyed by parameter name (survives re-sharding)
    scheduler.pt          LR scheduler state
    rng_rank<r>.pt        python / numpy / torch (and CUDA) RNG states of each rank
    trainer_state.json    step, data position (the sampler's state dict), extra metadata
    COMPLETE              written last: a folder without it is never resumed from

It is written into `.tmp-step_00000012/` and renamed into place, so a crash mid-save leaves the
previous checkpoint as the latest; the oldest complete checkpoints beyond `keep_last` are deleted.

    point = plan_resume(cfg.trainer.resume, output_dir, config_to_dict(cfg), cfg.trainer.total_steps)
    if point.finished:                                                  # nothing left to do: say so
        return finished_run("GRPO", point, output_dir)
    if point.checkpoint is not None:
        state = load_checkpoint(point.checkpoint, model, optimizer, scheduler)   # restores RNG too
        start_step, sampler_state = state.step, state.data_state
    ...
    save_checkpoint(output_dir, step, model, optimizer, scheduler, data_state=sampler.state_dict(),
                    extra={"config": config_to_dict(cfg)})

`trainer.resume=auto` continues the run in `output_dir` only when its checkpoint was written
under the same settings: a checkpoint whose config differs in what it trains (model, data,
algorithm, reward; `config_changes`) stops the run with a `ResumeConflict` naming the keys and
the ways on, so a changed `model.path` is never silently ignored.

Weights and optimizer state go through `torch.distributed.checkpoint.state_dict`, which gathers
full tensors from FSDP2 shards (and works unchanged on a plain module), so every rank must call
`save_checkpoint` / `load_checkpoint` together. Several nodes need a shared filesystem.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from algos.config import ConfigError
from algos.distributed import barrier, get_rank, get_world_size, is_distributed, is_main, unwrap_model

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "ResumePoint",
    "ResumeConflict",
    "plan_resume",
    "config_changes",
    "finished_run",
    "RESUME_FREE_KEYS",
    "is_complete",
    "rng_state",
    "set_rng_state",
    "COMPLETE_MARKER",
]

COMPLETE_MARKER = "COMPLETE"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """What `load_checkpoint` restored besides the tensors: where the run stood."""

    path: Path
    step: int
    data_state: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The python, numpy (global) and torch (CPU and every CUDA device) RNG states.

    Stored as tensors, lists and ints only, so `torch.load(weights_only=True)` reads it back.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by `rng_state` (CUDA ones only if this machine has GPUs)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": int(np_state["pos"])},
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def is_complete(path: str | Path) -> bool:
    """True for a checkpoint folder whose save finished (it holds the completion marker)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def _checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (partial ones are skipped)."""
    root = _checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str, output_dir: str | Path, key: str = "trainer.resume") -> Path | None:
    """Which checkpoint `trainer.resume` asks for.

    * ``"never"``: None (start fresh).
    * ``"auto"``: the latest complete checkpoint in `output_dir`, or None when there is none, so
      re-running the same command continues a killed run and starts a new one otherwise.
    * a path: that checkpoint folder, or the latest checkpoint of that run folder.

    key: the config key that holds `resume`, for the error messages (evaluate's `checkpoint`).

    Raises:
        FileNotFoundError: a path that is neither a complete checkpoint nor a run folder holding one.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume).expanduser()
    if (path / "trainer_state.json").is_file() or _STEP_DIR.match(path.name):
        if not is_complete(path):
            raise FileNotFoundError(
                f"{key}={resume!r} is not a complete checkpoint (no {COMPLETE_MARKER} marker: the save "
                f"was interrupted); pick another one from {path.parent}"
                + (", or trainer.resume=auto" if key == "trainer.resume" else "")
            )
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"{key}={resume!r}: no complete checkpoint there (expected a checkpoints/step_<n>/ folder "
            "or a run folder containing checkpoints/)"
            + ("; use trainer.resume=auto or trainer.resume=never" if key == "trainer.resume" else "")
        )
    return latest


# --------------------------------------------------------------------------------------------
# Resuming under the same settings
# --------------------------------------------------------------------------------------------

# Keys a run may change when it resumes: its length, its validation, saving and logging, and
# resources that do not change what is computed (memory knobs, workers, kernels, engines).
# Every other key (model, data, algorithm, reward, seed) decides what the run trains.
RESUME_FREE_KEYS = (
    "trainer.total_steps", "trainer.epochs", "trainer.val_every", "trainer.val_size", "trainer.val_before_train",
    "trainer.save_every", "trainer.keep_last", "trainer.output_dir", "trainer.resume", "trainer.sample_table_every",
    "trainer.sample_table_rows", "trainer.fsdp", "logger", "env.sandbox", "env.val_tasks", "env.val_split",
    "rollout.val_temperature", "rollout.backend", "rollout.gpu_memory_utilization", "rollout.tensor_parallel_size",
    "algo.micro_batch_size", "algo.packing", "algo.max_tokens_per_micro_batch", "model.gradient_checkpointing",
    "model.attn_implementation", "data.oracle.workers", "data.val_size",
)


class ResumeConflict(ConfigError):
    """`trainer.resume=auto` found a checkpoint written under other settings than this run's."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: from `checkpoint` at `step` (None and 0: from scratch); `finished` when
    that checkpoint already reached the run's last step."""

    checkpoint: Path | None
    step: int
    finished: bool


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                   free: tuple[str, ...] = RESUME_FREE_KEYS) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every key whose value differs between two
    nested config dicts, sorted by key; keys at or under a `free` prefix are left out, and so are
    keys only one side has (a setting added to or dropped from the schema since the save)."""
    a, b = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(set(a) & set(b)):
        if any(key == f or key.startswith(f + ".") for f in free):
            continue
        if a[key] != b[key]:
            changes.append((key, a[key], b[key]))
    return changes


def _shown(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _conflict_message(output_dir: Path, checkpoint: Path, step: int, changes: list[tuple[str, Any, Any]]) -> str:
    shown = [f"  {key}: {_shown(old)} in the checkpoint, {_shown(new)} now" for key, old, new in changes[:12]]
    if len(changes) > 12:
        shown.append(f"  ... and {len(changes) - 12} more")
    return "\n".join([
        f"{output_dir} holds a checkpoint (step {step}) of a run with other settings, which trainer.resume=auto "
        "would continue as it was, ignoring these changes:",
        *shown,
        "Either start a new run in its own folder: trainer.output_dir=<new folder> (output_dir= works too),",
        f"or start over in {output_dir}: trainer.resume=never (its checkpoints are replaced as the new run saves).",
        f"(To continue that run with the new settings anyway, name its checkpoint: trainer.resume={checkpoint}.)",
    ])


def plan_resume(resume: str, output_dir: str | Path, config: Mapping[str, Any], total_steps: int | None) -> ResumePoint:
    """Where a run of `total_steps` (None: not known yet) with settings `config` (a plain dict,
    as checkpoints store it) starts.

    `resolve_resume`'s checkpoint, checked against the config saved with it: under
    `resume="auto"` a difference outside `RESUME_FREE_KEYS` raises `ResumeConflict`; a
    checkpoint named explicitly (`resume=<path>`) is the user's choice, so the differences are
    only reported. Reads files only: call it before loading any weights.
    """
    checkpoint = resolve_resume(resume, output_dir)
    if checkpoint is None:
        return ResumePoint(None, 0, False)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = int(state["step"])
    saved = (state.get("extra") or {}).get("config")
    changes = config_changes(saved, config) if isinstance(saved, Mapping) else []
    if changes and resume == "auto":
        raise ResumeConflict(_conflict_message(Path(output_dir), checkpoint, step, changes))
    if changes and is_main():
        from algos.tracking import say

        say(f"resuming {checkpoint} with changed settings: " + "; ".join(
            f"{key} {_shown(old, 30)} -> {_shown(new, 30)}" for key, old, new in changes))
    return ResumePoint(checkpoint, step, total_steps is not None and step >= total_steps)


def finished_run(algorithm: str, point: ResumePoint, output_dir: str | Path) -> dict[str, Any]:
    """Say that the run in `output_dir` already reached its last step and how to go on; return
    the trainer's summary of it (`already_finished: True`, nothing trained)."""
    if is_main():
        from algos.tracking import say

        say(f"{algorithm}: the run in {output_dir} already finished at step {point.step}: nothing to train. To train on "
            f"from its checkpoint, raise trainer.total_steps (e.g. trainer.total_steps={2 * point.step}); to start "
            "again, trainer.resume=never or another trainer.output_dir=.")
    return {"output_dir": str(output_dir), "steps": point.step, "resumed_from": None, "already_finished": True,
            "checkpoint": str(point.checkpoint), "last_metrics": {}}


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model), "peft_config")


def _is_sharded(model: nn.Module) -> bool:
    # FSDP2 parameters are DTensors; anything else (plain, DDP, PEFT) already holds full tensors.
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _unshared(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings); store a copy of each.
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model state {key!r} is a {type(value).__name__}, not a tensor; cannot store it in safetensors")
        value = value.detach()
        ident = value.untyped_storage().data_ptr() if value.numel() else id(value)
        if ident in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        seen.add(ident)
        out[key] = value
    return out


def _json_ready(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable (dicts, lists, numbers, strings): {err}") from None
    return value


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data_state: Any = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int = 3,
    trainable_only: bool | None = None,
) -> Path:
    """Write a complete checkpoint for `step` atomically; call on every rank.

    Args:
        output_dir: the run folder (`trainer.output_dir`); checkpoints go to its `checkpoints/`.
        step: training steps completed; names the folder and is what `load_checkpoint` returns.
        model: the policy (plain, DDP, FSDP2 or PEFT-wrapped).
        optimizer, scheduler: saved when given.
        data_state: the data position, e.g. the prompt sampler's `state_dict()` (JSON-serialisable).
        extra: any other JSON-serialisable metadata (e.g. the config as a dict).
        keep_last: complete checkpoints to keep; older ones are deleted after this one is in place,
            and so are checkpoints of later steps (left by an older run in the same folder).
        trainable_only: store only parameters with `requires_grad` (default: True under PEFT, so
            only the adapter is stored; the frozen base comes from `model.path` on resume).

    Returns:
        The checkpoint folder.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if trainable_only is None:
        trainable_only = _is_peft(model)
    data_state = _json_ready(data_state, "data_state")
    extra = _json_ready(dict(extra or {}), "extra")
    root = _checkpoints_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    main = is_main()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        tmp.mkdir(parents=True)
    barrier()

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    inner = unwrap_model(model)
    model_state = get_model_state_dict(inner, options=options)  # a collective under FSDP2
    if trainable_only:
        # ignore_frozen_params misses a frozen weight reached under a second, tied name.
        trainable = {name for name, p in inner.named_parameters(remove_duplicate=False) if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    optim_state = get_optimizer_state_dict(inner, optimizer, options=options) if optimizer is not None else None
    torch.save(rng_state(), tmp / f"rng_rank{get_rank()}.pt")

    if main:
        save_file(_unshared(model_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if optim_state is not None:
            torch.save(optim_state, tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        trainer_state = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "data_state": data_state,
            "extra": extra,
            "world_size": get_world_size(),
            "trainable_only": bool(trainable_only),
            "saved_at": time.time(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    barrier()  # every rank's RNG file is in place before the folder becomes visible
    if main:
        (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
        if final.exists():
            # Saving the same step again (e.g. after a resume): swap, never leave a gap.
            stale = root / f".old-step_{step:08d}"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(final)
        # Checkpoints of later steps are from an older run in this folder (resume=never, or a
        # resume from an earlier checkpoint): stale, and `resume=auto` would pick them next.
        kept = [path for path in list_checkpoints(output_dir) if int(path.name.split("_")[1]) <= step]
        for old in set(list_checkpoints(output_dir)) - set(kept[-keep_last:]):
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> Checkpoint:
    """Restore a checkpoint written by `save_checkpoint` into live objects; call on every rank.

    The model must already be built (from `model.path`, wrapped the same way: PEFT, DDP or FSDP2)
    and the optimizer created over its parameters. Restores this rank's RNG states when
    `restore_rng` (if the run had fewer ranks than now, new ranks keep their own seeding).

    Returns:
        The step, data position and extra metadata.

    Raises:
        FileNotFoundError: not a complete checkpoint.
        RuntimeError: weights that do not fit the model (the message lists the keys).
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker); use latest_checkpoint() to find one"
        )
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    trainable_only = bool(trainer_state.get("trainable_only", False))
    inner = unwrap_model(model)
    sharded = _is_sharded(inner)
    # FSDP2: only rank 0 reads the files and broadcasts, each rank keeping its shard, so host
    # memory holds one full copy per node, not one per GPU. Unsharded models read it as it is.
    broadcast = sharded and is_distributed()
    reads = is_main() or not broadcast
    model_state = load_file(str(path / "model.safetensors"), device="cpu") if reads else {}
    options = StateDictOptions(full_state_dict=sharded, strict=not trainable_only, broadcast_from_rank0=broadcast)
    result = set_model_state_dict(inner, model_state, options=options)
    if trainable_only and getattr(result, "unexpected_keys", None):
        raise RuntimeError(
            f"checkpoint {path} holds weights the model does not have: {sorted(result.unexpected_keys)[:10]}; "
            "build the model with the same LoRA settings as the run that saved it"
        )
    if optimizer is not None:
        optimizer_file = path / "optimizer.pt"
        if not optimizer_file.is_file():
            raise FileNotFoundError(f"{path} has no optimizer state; pass optimizer=None to load the weights only")
        optim_state = torch.load(optimizer_file, map_location="cpu", weights_only=True) if reads else {}
        set_optimizer_state_dict(inner, optimizer, optim_state_dict=optim_state, options=options)
    if scheduler is not None:
        scheduler_file = path / "scheduler.pt"
        if not scheduler_file.is_file():
            raise FileNotFoundError(f"{path} has no scheduler state; pass scheduler=None to skip it")
        scheduler.load_state_dict(torch.load(scheduler_file, map_location="cpu", weights_only=True))
    if restore_rng:
        rng_file = path / f"rng_rank{get_rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return Checkpoint(
        path=path,
        step=int(trainer_state["step"]),
        data_state=trainer_state.get("data_state"),
        extra=dict(trainer_state.get("extra") or {}),
    )
