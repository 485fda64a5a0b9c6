"""One place every trainer sends its figures: W&B, a local metrics.jsonl, a console progress bar.

    tracker = Tracker(cfg.logger, cfg.trainer.output_dir, run_config=config_to_dict(cfg),
                      total_steps=cfg.trainer.total_steps, resume_step=start_step_or_None)
    tracker.log({"reward/total": 0.42, "actor/kl": 0.003, "lr": 1e-6}, step=step)
    tracker.log_table("samples/train", rows, images, step=step)
    tracker.finish()

Only rank 0 logs: on other ranks a Tracker does nothing. Every algorithm (GRPO, PPO, SFT,
evaluation) uses the same names, so runs compare in one dashboard:

    reward/total                 mean shaped reward of an episode (sum of its step rewards)
    reward/<component>           mean of each term of `info["reward_components"]` (acc, fmt,
                                 mandatory, necessity, exact, emerge, usage_cost, spurious, exec_fail)
    val/acc                      validation accuracy (greedy), apart from the shaped reward
    val/acc/<category>           validation accuracy per task category
    val/reward/total             mean shaped reward on validation
    tool/exec_success            share of tool calls whose code ran without error
    tool/calls_per_episode       mean tool calls per episode
    tool/op/<name>               share of episodes whose successful code applied op <name>
    episode/turns                mean assistant turns per episode
    episode/response_length      mean sampled tokens per episode
    episode/truncated            share of episodes cut by the turn or length limit
    rollout/episode_errors       episodes of a step that an exception ended (left out of the loss)
    actor/loss, actor/pg_loss    policy loss (total, clipped surrogate part)
    actor/kl                     KL(policy || reference), the estimator of algo.kl.kind
    actor/entropy                mean entropy of the policy on sampled tokens
    actor/clipfrac               share of tokens where the ratio clip binds
    actor/approx_kl              k3 estimate of KL(old policy || policy) over an update
    actor/grad_norm              global gradient norm before clipping
    critic/*                     value loss and statistics (PPO)
    lr                           learning rate
    time/rollout, time/sandbox, time/update, time/step     seconds per step
    throughput/tokens_per_s, throughput/episodes_per_s     generation speed
    data/*                       batch bookkeeping: data/trajectories_in_loss, data/groups_with_signal
                                 (GRPO: share of groups whose advantages are not all 0), data/epoch, ...
    judge/*                      the LLM judge: calls, errors, cache_hits, agree_with_rules, latency_s,
                                 latency_max_s (`cv_env.judge.judge_metrics`; val/judge/* on validation)

A name must start with one of these namespaces (`lr` stands alone): a typo such as `actr/kl`
is an error, not a new chart.

Files in the run folder: `metrics.jsonl` (one JSON object per `log` call: {"step", "time",
metrics...}; non-finite values are written as null), `tables/<name>.jsonl` plus PNGs under
`tables/<name>/step_<n>/`, `wandb/` (W&B's run files) and `wandb_run_id` (so a resumed run
continues the same W&B run).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
from PIL import Image

__all__ = ["Tracker", "NAMESPACES", "PROGRESS_KEYS", "resolve_wandb_mode", "check_metric_name", "read_metrics",
           "print_run_summary", "say"]

NAMESPACES = ("reward", "val", "tool", "episode", "rollout", "actor", "critic", "time", "throughput", "data", "judge")
STANDALONE = ("lr",)
PROGRESS_KEYS = {"reward/total": "reward", "val/acc": "val_acc", "actor/kl": "kl", "actor/loss": "loss",
                 "val/loss": "val_loss"}
RESERVED = ("step", "time")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Besides the progress bar, the figures of each step as one line of the run's log file.
STEP_LOG_KEYS = ("reward/total", "val/acc", "actor/loss", "actor/kl", "val/loss", "tool/calls_per_episode", "time/step")

# Messages for the person running a job. The entry points' logging (conf/hydra/job_logging/)
# shows them on the console and keeps them in <run folder>/<job>.log; `codevision.steps` holds
# the per-step lines, which go to that file only.
_messages = logging.getLogger("codevision")
_messages.setLevel(logging.INFO)
_step_lines = logging.getLogger("codevision.steps")


def say(message: str, level: int = logging.INFO) -> None:
    """Tell the person running the job: through logging where it is configured (the entry points:
    console and run log; pytest), else printed (a plain script or notebook)."""
    if _messages.hasHandlers():
        _messages.log(level, message)
    else:
        import sys

        print(message, file=sys.stdout if level < logging.WARNING else sys.stderr, flush=True)


def check_metric_name(name: str) -> None:
    """Raise ValueError unless `name` is in the shared vocabulary (see the module docstring)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric names are non-empty strings, got {name!r}")
    if name in RESERVED:
        raise ValueError(f"{name!r} is written by the tracker itself; pass the step as log(..., step=)")
    head, sep, tail = name.partition("/")
    if name in STANDALONE or (sep and head in NAMESPACES and tail):
        return
    raise ValueError(
        f"metric {name!r} is outside the shared vocabulary: use 'lr' or '<namespace>/<name>' with namespace in "
        f"{', '.join(NAMESPACES)} (see algos/tracking.py)"
    )


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """The W&B mode a run will use for `logger.mode`.

    `auto`: the `WANDB_MODE` environment variable when set, else online with credentials
    (`WANDB_API_KEY` or a `wandb login` netrc entry) and offline without. An explicit `online`
    without credentials falls back to offline with a warning rather than failing at the first log.
    """
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.mode {mode!r} is not one of auto, online, offline, disabled")
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if env_mode in ("online", "offline", "disabled"):
            return env_mode
        if env_mode == "dryrun":
            return "offline"
        return "online" if _has_wandb_credentials() else "offline"
    if mode == "online" and not _has_wandb_credentials():
        warnings.warn("logger.mode=online but no W&B credentials (WANDB_API_KEY or `wandb login`): logging offline; "
                      "upload later with `wandb sync`", stacklevel=2)
        return "offline"
    return mode


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return float(value)
    # One-element torch tensors (numel()) and numpy arrays (size).
    numel = getattr(value, "numel", None)
    size = numel() if callable(numel) else getattr(value, "size", None)
    if size == 1 and hasattr(value, "item"):
        return float(value.item())
    raise TypeError(f"metric {name!r} must be a number (or a one-element tensor/array), got {type(value).__name__}")


def _to_image(image: Any, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image)
    raise TypeError(f"{where} must be a PIL image or a uint8 HxW / HxWxC numpy array, got {type(image).__name__}")


def _cell(value: Any) -> Any:
    # Table cells: scalars stay themselves, anything else becomes readable JSON text.
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return json.dumps(value, default=str, ensure_ascii=False)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, merged by step (later keys win), in step order."""
    merged: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                merged.setdefault(int(record["step"]), {}).update(record)
    return [merged[step] for step in sorted(merged)]


class Tracker:
    """Logs scalars and sample tables of one run (rank 0 only; a no-op elsewhere).

    Args:
        cfg: `algos.config.LoggerConfig` (project, entity, name, group, tags, mode, metrics_jsonl,
            progress_bar).
        output_dir: the run folder; metrics.jsonl, tables/ and W&B's files go there.
        run_config: the run's configuration as a plain dict, shown in W&B.
        total_steps: length of the progress bar.
        resume_step: None for a fresh run (metrics.jsonl and tables/ start empty, new W&B run); or
            the step of the checkpoint a resumed run continues from: records and tables of later
            steps, which the resumed run will redo, are dropped, and the same W&B run continues.
        enabled: log from this process; default: only global rank 0.
    """

    def __init__(
        self,
        cfg: Any,
        output_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        resume_step: int | None = None,
        enabled: bool | None = None,
    ):
        if enabled is None:
            from algos.distributed import is_main

            enabled = is_main()
        self.enabled = bool(enabled)
        self.output_dir = Path(output_dir)
        self.mode = resolve_wandb_mode(cfg.mode) if self.enabled else "disabled"
        self.metrics_path: Path | None = None
        self.run = None
        self._bar = None
        self._postfix: dict[str, str] = {}
        self._warned_nonfinite: set[str] = set()
        self._metrics_file = None
        self._total_steps = total_steps
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.metrics_jsonl:
            self.metrics_path = self.output_dir / cfg.metrics_jsonl
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._prepare_files(resume_step)
        if self.metrics_path is not None:
            self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        if cfg.mode == "auto" and self.mode == "offline" and not os.environ.get("WANDB_MODE"):
            say(f"W&B: no API key (WANDB_API_KEY or `wandb login`), so this run logs offline to {self.output_dir}/wandb; "
                "`wandb sync` uploads it later (logger.mode=offline says so up front, logger=local turns W&B off)")
        if self.mode != "disabled":
            self._start_wandb(cfg, run_config, resume_step)
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True, desc="train")

    # ---- setup ---------------------------------------------------------------------------

    @staticmethod
    def _truncate_jsonl(path: Path, resume_step: int | None) -> None:
        """Keep the records a checkpoint at `resume_step` covers (none for a fresh run)."""
        kept = []
        if resume_step is not None and path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if line.strip() and int(json.loads(line)["step"]) <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by the kill
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)

    def _prepare_files(self, resume_step: int | None) -> None:
        # The resumed run logs the steps after its checkpoint again; a fresh run starts over.
        if self.metrics_path is not None:
            self._truncate_jsonl(self.metrics_path, resume_step)
        tables = self.output_dir / "tables"
        if not tables.is_dir():
            return
        for table_file in tables.glob("*.jsonl"):
            self._truncate_jsonl(table_file, resume_step)
        for step_dir in tables.glob("*/step_*"):
            step = step_dir.name.removeprefix("step_")
            if step.isdigit() and (resume_step is None or int(step) > resume_step):
                shutil.rmtree(step_dir, ignore_errors=True)

    def _start_wandb(self, cfg: Any, run_config: Mapping[str, Any] | None, resume_step: int | None) -> None:
        import wandb

        id_file = self.output_dir / "wandb_run_id"
        if resume_step is not None and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or self.output_dir.resolve().name,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            config=dict(run_config or {}),
            dir=str(self.output_dir),
            mode=self.mode,
            id=run_id,
            resume="allow",
        )
        # A custom step axis: after a resume the run re-logs steps W&B has already seen, which
        # its internal step counter would refuse.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    # ---- logging -------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record scalars for `step` everywhere (W&B, metrics.jsonl, progress bar).

        Values may be Python numbers, numpy scalars or one-element tensors. Log a step's training
        and validation figures in one call, or in several: readers merge lines by step
        (`read_metrics`).
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        values = {}
        for name, value in metrics.items():
            check_metric_name(name)
            values[name] = _scalar(name, value)
        if not self.enabled:
            return
        step = int(step)
        shown = " ".join(f"{k}={values[k]:.4g}" for k in STEP_LOG_KEYS if k in values)
        of_total = f"/{self._total_steps}" if self._total_steps else ""
        _step_lines.debug(f"step {step}{of_total} {shown}".rstrip())
        if self._metrics_file is not None:
            record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
            # Strict JSON has no NaN/inf: write null, and say so once per metric.
            record.update({name: value if math.isfinite(value) else None for name, value in values.items()})
            new_bad = [n for n, v in values.items() if not math.isfinite(v) and n not in self._warned_nonfinite]
            if new_bad:
                self._warned_nonfinite.update(new_bad)
                shown = ", ".join(f"{n}={values[n]}" for n in new_bad)
                warnings.warn(f"non-finite metrics at step {step}: {shown} (written as null in metrics.jsonl)", stacklevel=2)
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        if self.run is not None:
            self.run.log({**values, "step": step})
        if self._bar is not None:
            for key, short in PROGRESS_KEYS.items():
                if key in values:
                    self._postfix[short] = f"{values[key]:.4g}"
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            self._bar.set_postfix(self._postfix, refresh=True)

    def log_table(
        self,
        name: str,
        rows: Sequence[Mapping[str, Any]],
        images: Sequence[Sequence[Any]] | None = None,
        step: int = 0,
        max_images: int = 8,
    ) -> None:
        """Record a table of sample trajectories with their images.

        Args:
            name: table name, e.g. "samples/train" or "samples/val".
            rows: one mapping per trajectory (question, answer, reward, the transcript, ...);
                columns are the union of their keys, in first-seen order.
            images: per row, the images of that trajectory (inputs, then tool outputs) as PIL
                images or uint8 arrays; None for none.
            step: the training step.
            max_images: images kept per row (columns image_0 ... in W&B).

        Locally writes `tables/<name>/step_<n>/row<i>_image<j>.png` and one line per row in
        `tables/<name>.jsonl` ({"step", "row", columns..., "images": [relative PNG paths]}).
        """
        if images is not None and len(images) != len(rows):
            raise ValueError(f"log_table got {len(rows)} rows but {len(images)} image lists: give one list per row")
        if not self.enabled:
            return
        columns: list[str] = []
        for row in rows:
            for key in row:
                if key not in columns:
                    if key in ("step", "row", "images") or str(key).startswith("image_"):
                        raise ValueError(f"table column {key!r} is reserved for the tracker; rename it")
                    columns.append(key)
        row_images = [[_to_image(im, f"image {j} of row {i}") for j, im in enumerate(list(imgs)[:max_images])]
                      for i, imgs in enumerate(images or [[] for _ in rows])]
        safe = _SAFE.sub("_", name).strip("_") or "table"
        table_dir = self.output_dir / "tables"
        step_dir = table_dir / safe / f"step_{int(step):08d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        with open(table_dir / f"{safe}.jsonl", "a", encoding="utf-8") as f:
            for i, (row, imgs) in enumerate(zip(rows, row_images)):
                paths = []
                for j, image in enumerate(imgs):
                    png = step_dir / f"row{i}_image{j}.png"
                    image.save(png)
                    paths.append(str(png.relative_to(self.output_dir)))
                record = {"step": int(step), "row": i, **{c: _cell(row.get(c)) for c in columns}, "images": paths}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.run is not None:
            import wandb

            n_images = max((len(imgs) for imgs in row_images), default=0)
            table = wandb.Table(columns=columns + [f"image_{j}" for j in range(n_images)])
            for row, imgs in zip(rows, row_images):
                cells = [_cell(row.get(c)) for c in columns]
                cells += [wandb.Image(imgs[j]) if j < len(imgs) else None for j in range(n_images)]
                table.add_data(*cells)
            self.run.log({name: table, "step": int(step)})

    def finish(self) -> None:
        """Close the progress bar and files and end the W&B run (offline runs stay on disk)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def print_run_summary(algorithm: str, summary: Mapping[str, Any], figures: Sequence[str], checkpoint_note: str,
                      extra_lines: Sequence[str] = ()) -> None:
    """The report at the end of a training run, on the console and in the run log (rank 0 only,
    by the caller; see `say`).

    summary: the trainer's summary (steps, resumed_from, output_dir, metrics_path, checkpoint,
    wandb_mode, last_metrics). figures: the metric names to show from its last metrics (missing
    or non-finite ones are left out). checkpoint_note: how to continue from the checkpoint.
    extra_lines: lines of the trainer's own, after the metrics line.
    """
    m = summary["last_metrics"]
    shown = ", ".join(f"{k}={m[k]:.4g}" for k in figures
                      if isinstance(m.get(k), (int, float)) and math.isfinite(m[k]))
    resumed = f" (resumed from {summary['resumed_from']})" if summary["resumed_from"] else ""
    wandb_note = (f" (files in {summary['output_dir']}/wandb; `wandb sync` uploads)"
                  if summary["wandb_mode"] == "offline" else "")
    lines = [
        f"{algorithm} finished at step {summary['steps']}{resumed}",
        f"  last figures:  {shown or 'none'}",
        f"  run folder:    {summary['output_dir']}",
        f"  metrics:       {summary['metrics_path'] or 'off (logger.metrics_jsonl=null)'}",
        *extra_lines,
        f"  checkpoint:    {summary['checkpoint'] or 'none'}  ({checkpoint_note})",
        f"  W&B:           {summary['wandb_mode']}{wandb_note}",
    ]
    say("\n".join(lines))
