"""Supervised fine-tuning, CodeVision's stage 1: `python -m algos.sft +exp=tiny_sft` (CPU, a minute).

The policy learns to imitate demonstrations of the tool protocol: multi-turn conversations in
which the assistant thinks, calls `code_image_tool`, reads the tool's images and answers. The
loss is the token-mean cross-entropy on the assistant's tokens only (each turn's text and its
end-of-turn token); prompts, tool replies and images only condition. One step:

    1. draw `algo.batch_size` examples (a seeded permutation per epoch; each rank its share)
    2. split them into micro-batches (fixed size, or by padded tokens with `algo.packing`)
    3. gradient accumulation with exact token-mean weights (`algos.update.update_step`),
       grad clip, AdamW, LR schedule
    4. log; every `val_every` steps the validation loss; every `save_every` steps a resumable
       checkpoint plus a Hugging Face folder `<output_dir>/hf/step_<n>/` that GRPO starts from:

           python -m algos.grpo +exp=qwen3vl model.path=outputs/sft-qwen3vl/hf/step_00000600

Data (chat records in OpenAI/Qwen or ShareGPT form, or `agents.collect` trajectories; the schema
is in `algos/sft_data.py`) comes from `data.train_files`, and/or is recorded by the scripted
oracle before training when `data.oracle.tasks` is set. Configuration: `conf/sft.yaml`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from agents.policy import Policy
from agents.trajectory import Trajectory
from algos.cli import hydra_main
from algos.distributed import all_reduce_mean, barrier, is_main
from algos.optim import build_optimizer, build_scheduler
from algos.prompt_sampler import PromptSampler
from algos.run import due, finish, finished, load_policy, open_tracker, resume, save, start_run, timed
from algos.sft_config import SFTConfig
from algos.sft_data import SFTExamples, build_examples, micro_batches, read_records
from algos.tracking import say
from algos.update import update_step
from cv_env.protocol import get_prompt

__all__ = ["run", "main", "prepare_data", "sft_loss", "validation_loss", "export_hf",
           "HF_DIR"]

HF_DIR = "hf"  # <output_dir>/hf/step_<n>/: the Hugging Face folders GRPO and evaluation load


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _oracle_demos(cfg: SFTConfig, output_dir: Path) -> Path:
    """Record (once per run folder and settings) the oracle's demonstrations; return their JSONL path."""
    from agents.collect import collect

    o = cfg.data.oracle
    final = output_dir / "demos"
    demos = final / "oracle.jsonl"
    settings = dict(model=cfg.model.path, tasks=o.tasks, split=o.split, num_tasks=o.num_tasks, max_turns=o.max_turns,
                    max_pixels=cfg.data.max_pixels, max_total_tokens=cfg.data.max_tokens, seed=cfg.trainer.seed,
                    prompt=cfg.data.prompt, tool_rate=o.tool_rate)
    recorded = final / "settings.json"
    same = demos.is_file() and recorded.is_file() and json.loads(recorded.read_text()) == settings
    if is_main() and not same:
        if demos.is_file():
            say(f"the demonstrations in {final} were recorded with other data.oracle settings: recording them again")
        # Recorded in a side folder and renamed, so a killed collection is never read as complete.
        tmp = output_dir / ".tmp-demos"
        shutil.rmtree(tmp, ignore_errors=True)
        result = collect(out=str(tmp / "oracle.jsonl"), workers=o.workers, **settings)
        if result["kept"] == 0:
            raise RuntimeError(f"the oracle earned the ideal reward on none of the {o.num_tasks} tasks of "
                               f"{o.tasks!r}: no demonstrations to train on (check data.oracle.max_turns)")
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        say(f"recorded {result['kept']} oracle demonstrations in {demos} ({result['skipped']} below the reward "
            f"of the oracle's plan left out)")
    barrier()
    return demos


def prepare_data(cfg: SFTConfig, policy: Policy,
                 output_dir: str | Path) -> tuple[SFTExamples, SFTExamples | None, dict[str, float]]:
    """(train examples, validation examples, data/* figures) as `cfg.data` says.

    Without `data.val_files`, a seeded `data.val_fraction` of the training records is held out
    (at least one when the fraction is positive and there are two records or more).
    """
    d = cfg.data
    files = list(d.train_files)
    if d.oracle.tasks:
        files.append(str(_oracle_demos(cfg, Path(output_dir))))
    records = read_records(files)
    if not records:
        raise ValueError(f"the training files {files} hold no record")
    if d.val_files:
        val_records = read_records(d.val_files)
    else:
        order = np.random.default_rng([cfg.trainer.seed, 7]).permutation(len(records))
        held = 0 if d.val_fraction == 0 or len(records) < 2 else max(1, round(d.val_fraction * len(records)))
        val_records = [records[i] for i in sorted(order[:held])]
        records = [records[i] for i in sorted(order[held:])]
    renderer = policy.renderer.with_tools(list(get_prompt(d.prompt).tools))  # as the RL envs render
    options = dict(max_tokens=d.max_tokens, max_pixels=d.max_pixels, system_prompt=d.system_prompt,
                   prompt=renderer.prompt_for(d.prompt), on_invalid=d.on_invalid)
    train, train_stats = build_examples(renderer, records, **options)
    val, val_stats = build_examples(renderer, val_records[:d.val_size], **options) if val_records else (None, {})
    for name, stats in (("training", train_stats), ("validation", val_stats)):
        if stats.get("invalid") or stats.get("too_long"):
            say(f"{name} data: kept {stats['kept']}, left out {stats['invalid']} invalid and {stats['too_long']} "
                f"longer than data.max_tokens={d.max_tokens}; first errors: {stats['errors']}")
    if not train:
        raise ValueError(f"no usable training example in {files}: {train_stats['invalid']} invalid, "
                         f"{train_stats['too_long']} longer than data.max_tokens={d.max_tokens}")
    figures = {
        "data/train_examples": float(len(train)),
        "data/val_examples": float(len(val) if val else 0),
        "data/invalid": float(train_stats["invalid"] + val_stats.get("invalid", 0)),
        "data/too_long": float(train_stats["too_long"] + val_stats.get("too_long", 0)),
        "data/assistant_tokens": float(train.assistant_tokens),
    }
    return train, val, figures


# --------------------------------------------------------------------------------------------
# Loss and validation
# --------------------------------------------------------------------------------------------


def sft_loss(policy: Policy, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood of the assistant tokens (`loss_mask`) of one micro-batch.

    Scored at temperature 1 with the sampler's conventions (vision placeholders excluded from the
    softmax), so what SFT raises is exactly what the rollout samples.
    """
    logprobs_BT, entropy_BT = policy.logprobs(batch, temperature=1.0)
    mask_BT = batch["loss_mask"]
    tokens = mask_BT.sum().clamp(min=1.0)
    loss = -(logprobs_BT * mask_BT).sum() / tokens
    return loss, {"loss": loss.detach(), "entropy": ((entropy_BT * mask_BT).sum() / tokens).detach()}


def _micro_batches(examples: SFTExamples | Sequence[Trajectory], indices: Sequence[int],
                   cfg: SFTConfig) -> list[list[int]]:
    lengths = examples.lengths if isinstance(examples, SFTExamples) else [len(e.token_ids) for e in examples]
    budget = cfg.algo.max_tokens_per_micro_batch if cfg.algo.packing else 0
    return micro_batches(list(indices), lengths, cfg.algo.micro_batch_size, budget)


def validation_loss(policy: Policy, examples: SFTExamples | Sequence[Trajectory] | None, cfg: SFTConfig, rank: int = 0,
                    world: int = 1) -> dict[str, float]:
    """val/loss (token-mean NLL of the assistant tokens over all validation examples) and val/perplexity."""
    if not examples:
        return {}
    mine = list(range(rank, len(examples), world))
    nll_sum = tokens = 0.0
    was_training = policy.model.training
    policy.eval()
    try:
        with torch.no_grad():
            for chunk in _micro_batches(examples, mine, cfg):
                batch = policy.collate([examples[i] for i in chunk])
                logprobs_BT, _ = policy.logprobs(batch, temperature=1.0)
                nll_sum -= float((logprobs_BT * batch["loss_mask"]).sum())
                tokens += float(batch["loss_mask"].sum())
    finally:
        policy.train(was_training)
    # Means of the per-rank sums keep their ratio: the token-mean over every rank's examples.
    totals = all_reduce_mean({"nll": nll_sum, "tokens": tokens})
    loss = totals["nll"] / max(totals["tokens"], 1.0)
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}


# --------------------------------------------------------------------------------------------
# The Hugging Face export
# --------------------------------------------------------------------------------------------


def _core(model):
    """The `...ForConditionalGeneration` inside a peft wrapper (LoRA layers sit in it, in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's weights with the merged LoRA deltas, under the base model's own names."""
    state = {}
    for name, tensor in _core(model).state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor.detach()  # no copy: saved before the unmerge
    return state


def export_hf(policy: Policy, path: str | Path) -> Path:
    """Write `policy` as a plain Hugging Face folder (model + processor) that `Policy.load(path)`,
    `agents.loading.load_model(path)` and `algos.grpo` (`model.path=<path>`) read.

    LoRA adapters are merged into the weights (the live model keeps its separate adapters);
    the folder is written beside `path` and renamed into place, so it is complete or absent.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    core = _core(policy.model)
    # Gradient checkpointing turns the KV cache off in the config; the saved model generates, so on.
    use_cache = getattr(core.config, "use_cache", None)
    if use_cache is not None:
        core.config.use_cache = True
    try:
        if policy.is_peft:
            policy.model.merge_adapter()
            try:
                core.save_pretrained(tmp, state_dict=_merged_state_dict(policy.model))
            finally:
                policy.model.unmerge_adapter()
        else:
            core.save_pretrained(tmp)
    finally:
        if use_cache is not None:
            core.config.use_cache = use_cache
    policy.processor.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _prune_exports(root: Path, step: int, keep_last: int) -> None:
    """Keep the last `keep_last` exports up to `step`; later ones are an older run's (as checkpoints)."""
    exports = sorted(p for p in root.glob("step_*") if p.is_dir())
    current = [p for p in exports if int(p.name.split("_")[1]) <= step]
    for old in set(exports) - set(current[-keep_last:]):
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def run(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns a summary (steps, paths of the checkpoint and the HF folder,
    last metrics)."""
    a, t = cfg.algo, cfg.trainer
    start = start_run(cfg, None)  # the run's length is known once the data is read
    rank, world = start.rank, start.world
    output_dir = start.output_dir

    policy = load_policy(cfg, start.device)
    train, val, data_figures = prepare_data(cfg, policy, output_dir)
    steps_per_epoch = math.ceil(len(train) / a.batch_size)
    total_steps = t.total_steps or t.epochs * steps_per_epoch
    if start.point.checkpoint is not None and start.point.step >= total_steps:
        return finished(start, "SFT")
    optimizer = build_optimizer(policy.named_parameters(), a)
    scheduler = build_scheduler(optimizer, a, total_steps)
    sampler = PromptSampler(len(train), seed=t.seed)
    start_step = resume(start, policy.model, optimizer, scheduler, sampler)

    params = list(policy.parameters())
    last_metrics: dict[str, float] = {}
    hf_path: Path | None = None
    step = start_step
    with contextlib.ExitStack() as cleanup:  # closes the tracker, however the run ends
        tracker = open_tracker(cfg, start, cleanup, total_steps, start_step)
        if is_main():
            say(f"SFT on {len(train)} examples ({int(data_figures['data/assistant_tokens'])} assistant tokens), "
                f"{len(val) if val else 0} for validation; {total_steps} steps of {a.batch_size}")
        if t.val_before_train and start_step == 0 and val:
            first = {**validation_loss(policy, val, cfg, rank, world), **data_figures}
            tracker.log(first, step=0)
            last_metrics.update(first)
        policy.train()
        for step in range(start_step + 1, total_steps + 1):
            step_start = time.perf_counter()
            mine = sampler.draw(a.batch_size)[rank::world]
            chunks = [policy.collate([train[i] for i in chunk]) for chunk in _micro_batches(train, mine, cfg)]
            stats = update_step(chunks, lambda batch: sft_loss(policy, batch), params, optimizer, scheduler,
                                grad_clip=a.grad_clip, agg="token-mean")
            seconds = time.perf_counter() - step_start
            tokens = sum(float(c["attention_mask"].sum()) for c in chunks)
            metrics = {f"actor/{k}": v for k, v in (stats or {}).items() if k != "lr"}
            metrics["lr"] = (stats or {}).get("lr", optimizer.param_groups[0]["lr"])
            metrics.update(all_reduce_mean({
                "data/assistant_tokens": sum(float(c["loss_mask"].sum()) for c in chunks),
                "throughput/tokens_per_s": tokens / max(seconds, 1e-9),
                "time/step": seconds,
            }))
            metrics["data/epoch"] = float(sampler.epoch) + sampler.position / len(train)
            if val and due(step, t.val_every, total_steps):  # val_every 0: only at the end
                metrics.update(timed("time/validation", lambda: validation_loss(policy, val, cfg, rank, world)))
            tracker.log(metrics, step=step)
            last_metrics.update(metrics)
            if due(step, t.save_every, total_steps):
                save(cfg, step, policy.model, optimizer, scheduler, sampler)
                if is_main():
                    hf_path = export_hf(policy, output_dir / HF_DIR / f"step_{step:08d}")
                    _prune_exports(output_dir / HF_DIR, step, t.keep_last)
                barrier()

    exports = sorted(p for p in (output_dir / HF_DIR).glob("step_*") if p.is_dir())
    hf_model = str(hf_path or (exports[-1] if exports else "")) or None
    return finish(start, "SFT", tracker, step, last_metrics, ("actor/loss", "val/loss"),
                  "run the same command again to continue",
                  [f"  HF model:      {hf_model or 'none'}  (GRPO from it: python -m algos.grpo ... "
                   f"model.path={hf_model} output_dir=<a new run folder>)"],
                  total_steps=total_steps, hf_model=hf_model)


@hydra_main("sft")
def main(cfg: SFTConfig) -> dict[str, Any]:
    """Entry point: `python -m algos.sft +exp=tiny_sft [key=value ...]` (Hydra overrides)."""
    return run(cfg)


if __name__ == "__main__":
    main()
