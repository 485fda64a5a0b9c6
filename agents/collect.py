"""Collect oracle demonstrations for SFT, token-exact, as JSONL + PNG images.

    python -m agents.collect --model tiny:qwen2_5_vl --tasks synthetic --split train \\
        --num-tasks 256 --out runs/demos/oracle.jsonl
    python -m agents.collect --num-tasks 64      # to outputs/collect/<date_time>/demos.jsonl

The oracle (`agents.scripted.OracleAgent`) plays each task through the real env and the rollout
engine (`ScriptedBackend`), so every record is a `Trajectory` exactly as a policy rollout would
produce it: the model's chat template, token ids with image placeholders, loss mask 1 on the
oracle's turns (what SFT trains on), rewards and components. Read them back with
`agents.jsonl.read_jsonl`; `Policy.collate` turns them into a training batch. Only episodes
that earn the task's ideal reward are kept (`--keep-all` to keep every one); with `--tool-rate`
below 1, an item the oracle answers without the tool earns the reward of that answer instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_out() -> str:
    """A new run folder per collection, as Hydra names its runs: outputs/collect/<date_time>/demos.jsonl."""
    return str(Path("outputs") / "collect" / time.strftime("%Y-%m-%d_%H-%M-%S") / "demos.jsonl")


def collect(model: str, tasks: str, split: str, num_tasks: int, out: str, max_turns: int = 4,
            max_pixels: int = 1024 * 28 * 28, max_total_tokens: int = 16384, batch: int = 64,
            workers: int = 2, seed: int = 0, keep_all: bool = False, prompt: str = "full",
            tool_rate: float = 1.0, progress: bool = True) -> dict:
    """Write oracle trajectories of the first `num_tasks` tasks of `tasks`/`split` to `out`; return counts.

    tool_rate < 1: the oracle skips the tool on that share of the tasks that need it and answers
    at once (`OracleAgent(tool_rate)`); such an episode is kept when it earns the reward of a
    correct answer without calls. progress: a console bar over the episodes (rate, ETA).
    """
    from tqdm.auto import tqdm

    from agents.generation import ScriptedBackend
    from agents.loading import load_processor
    from agents.rollout import RolloutEngine
    from agents.scripted import OracleAgent, ideal_reward
    from agents.jsonl import write_jsonl
    from cv_env.reward import RewardConfig
    from cv_env.sandbox import Sandbox
    from cv_env.tasks import load_tasks

    source = load_tasks(tasks, split=split, seed=seed)
    count = min(num_tasks, len(source))
    if count < 1:
        raise ValueError(f"the task source {tasks!r} ({split}) is empty: nothing to collect")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists: write_jsonl appends, so give a new path (or delete the old file)")
    agent = OracleAgent(tool_rate, seed=seed)
    backend = ScriptedBackend(load_processor(model), agent_factory=lambda: OracleAgent(tool_rate, seed=seed))
    reward = RewardConfig()  # the env's default, which the engine's envs use here
    kept = skipped = 0
    start = time.perf_counter()
    with Sandbox(workers=workers) as sandbox, RolloutEngine(
        backend, sandbox=sandbox, env_kwargs=dict(max_turns=max_turns, max_pixels=max_pixels, prompt=prompt),
        sampling=dict(max_new_tokens=4096), max_total_tokens=max_total_tokens,
    ) as engine, tqdm(total=count, desc="collect", unit="episode", dynamic_ncols=True, disable=not progress) as bar:
        for first in range(0, count, batch):
            chunk = [source[i] for i in range(first, min(count, first + batch))]
            trajectories = engine.rollout(chunk, n=1, seed=seed + first)
            good = [t for t, task in zip(trajectories, chunk)
                    if keep_all or abs(t.reward - ideal_reward(task, reward, agent.uses_tool(task))["total"]) < 1e-6]
            skipped += len(trajectories) - len(good)
            kept += len(good)
            write_jsonl(good, out)
            bar.update(len(chunk))
            bar.set_postfix(kept=kept)
    return {"kept": kept, "skipped": skipped, "seconds": time.perf_counter() - start, "out": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:qwen2_5_vl", help="whose chat template/tokenizer to use")
    parser.add_argument("--tasks", default="synthetic", help="task spec: synthetic, a category, a .parquet path")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num-tasks", type=int, default=256)
    parser.add_argument("--out", default=None,
                        help="the JSONL file to write, images beside it (default: a new outputs/collect/<date_time>/demos.jsonl)")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-pixels", type=int, default=1024 * 28 * 28)
    parser.add_argument("--max-total-tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=64, help="episodes per engine rollout")
    parser.add_argument("--workers", type=int, default=2, help="sandbox workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-all", action="store_true", help="keep episodes below the ideal reward too")
    parser.add_argument("--prompt", default="full", choices=["full", "compact"],
                        help="the env's prompt preset (cv_env.protocol.PROMPTS), as the RL runs will use")
    parser.add_argument("--tool-rate", type=float, default=1.0,
                        help="share of the tasks needing an op that the oracle solves with the tool; on the rest it "
                             "answers at once (a teacher that often skips the tool)")
    args = parser.parse_args(argv)
    result = collect(args.model, args.tasks, args.split, args.num_tasks, args.out or default_out(),
                     max_turns=args.max_turns, max_pixels=args.max_pixels, max_total_tokens=args.max_total_tokens,
                     batch=args.batch, workers=args.workers, seed=args.seed, keep_all=args.keep_all,
                     prompt=args.prompt, tool_rate=args.tool_rate)
    print(f"wrote {result['kept']} demonstrations to {result['out']} ({result['skipped']} below the reward of the "
          f"oracle's plan skipped) in {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
