"""Seconds per GRPO step of the tiny CPU run, split into rollout / sandbox / update.

    python bench/bench_grpo.py [--steps 6] [override ...]      # e.g. rollout.n=8 env.max_turns=4

Runs `python -m algos.grpo +exp=tiny` (plus any Hydra overrides) in a temporary folder without
validation, checkpoints or W&B, then reads its metrics.jsonl and prints, per step and as the
median over steps after the first (which warms up kernels and sandbox workers):

    rollout   wall time of the rollouts (generation + env steps), `time/rollout`
    sandbox   wall time the rollouts waited for env steps (tool code in the sandbox) once a turn's
              generation had finished, `time/sandbox`; env steps that overlapped generation are
              hidden in `generate`
    generate  rollout - sandbox: generation, rendering and bookkeeping
    update    reference scoring + the clipped-surrogate updates, `time/update`
    step      the whole step, `time/step`
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from algos.config import load_config  # noqa: E402
from algos.grpo import run  # noqa: E402
from algos.tracking import read_metrics  # noqa: E402

COLUMNS = ("rollout", "sandbox", "generate", "update", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps to time (the first is warm-up)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of +exp=tiny")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: the first step is warm-up and is not in the median")
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config([
            "+exp=tiny", f"trainer.total_steps={args.steps}", "trainer.val_every=0", "trainer.val_before_train=false",
            f"trainer.save_every={args.steps}", "trainer.sample_table_every=0", "logger.mode=disabled",
            "logger.progress_bar=false", f"trainer.output_dir={out}", *args.overrides,
        ])
        start = time.perf_counter()
        run(cfg)
        total = time.perf_counter() - start
        records = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "time/step" in r]
    rows = []
    for r in records:
        rows.append({"rollout": r["time/rollout"], "sandbox": r["time/sandbox"],
                     "generate": r["time/rollout"] - r["time/sandbox"], "update": r["time/update"],
                     "step": r["time/step"], "episodes": r["throughput/episodes_per_s"] * r["time/rollout"],
                     "tokens_per_s": r["throughput/tokens_per_s"]})
    print(f"\nGRPO tiny run: {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.n} samples per step, "
          f"max {cfg.env.max_turns} turns, {cfg.rollout.max_new_tokens} new tokens per turn, "
          f"{cfg.env.sandbox.to_kwargs()['workers']} sandbox workers, {os.cpu_count()} CPUs")
    print(f"{'step':>4} " + " ".join(f"{c + '_s':>10}" for c in COLUMNS) + f" {'gen_tok/s':>10}")
    for i, row in enumerate(rows, 1):
        print(f"{i:>4} " + " ".join(f"{row[c]:>10.3f}" for c in COLUMNS) + f" {row['tokens_per_s']:>10.0f}")
    steady = rows[1:]
    print(f"{'med':>4} " + " ".join(f"{statistics.median(r[c] for r in steady):>10.3f}" for c in COLUMNS)
          + f" {statistics.median(r['tokens_per_s'] for r in steady):>10.0f}")
    print(f"whole run (model load, sandbox start, {args.steps} steps, final checkpoint): {total:.1f} s")


if __name__ == "__main__":
    main()
