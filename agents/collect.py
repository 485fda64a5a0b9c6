"""Collect demonstrations for SFT: from the oracle (token-exact) or a served teacher, as JSONL + PNG images.

    python -m agents.collect --model tiny:qwen2_5_vl --tasks synthetic --split train \\
        --num-tasks 256 --out runs/demos/oracle.jsonl
    python -m agents.collect --num-tasks 64      # to outputs/collect/<date_time>/demos.jsonl
    python -m agents.collect --endpoint http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-72B-Instruct \\
        --api-key-env OPENAI_API_KEY --num-tasks 256     # a served teacher (agents.served)

The oracle (`agents.scripted.OracleAgent`) plays each task through the real env and the rollout
engine (`ScriptedBackend`), so every record is a `Trajectory` exactly as a policy rollout would
produce it: the model's chat template, token ids with image placeholders, loss mask 1 on the
oracle's turns (what SFT trains on), rewards and components. Read them back with
`agents.jsonl.read_jsonl`; `Policy.collate` turns them into a training batch. Only episodes
that earn the task's ideal reward are kept (`--keep-all` to keep every one); with `--tool-rate`
below 1, an item the oracle answers without the tool earns the reward of that answer instead.

With `--endpoint`, `--model` names the model the endpoint serves, and the teacher's episodes are
written as chat records (`agents.chat_records`: messages and PNG images, no token ids), which
`algos.sft` renders with the student's own chat template, whatever the student. The same filter
applies: only correct, well-formed episodes are kept (`good_demo`; `--keep-all` keeps every one).
No token-exactness is claimed for the teacher (its server applies its own template).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tasks_to_collect(tasks: str, split: str, seed: int, num_tasks: int, out: str) -> list:
    """The first `num_tasks` tasks of the source; raises when there are none or `out` exists
    (demonstrations are appended to it)."""
    from cv_env.tasks import load_tasks

    source = load_tasks(tasks, split=split, seed=seed)
    count = min(num_tasks, len(source))
    if count < 1:
        raise ValueError(f"the task source {tasks!r} ({split}) is empty: nothing to collect")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists: collect appends demonstrations to it, so give a new path (or delete the old file)")
    return [source[i] for i in range(count)]


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
    selected = _tasks_to_collect(tasks, split, seed, num_tasks, out)
    count = len(selected)
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
            chunk = selected[first: first + batch]
            trajectories = engine.rollout(chunk, n=1, seed=seed + first)
            good = [t for t, task in zip(trajectories, chunk)
                    if keep_all or abs(t.reward - ideal_reward(task, reward, agent.uses_tool(task))["total"]) < 1e-6]
            skipped += len(trajectories) - len(good)
            kept += len(good)
            write_jsonl(good, out)
            bar.update(len(chunk))
            bar.set_postfix(kept=kept)
    return {"kept": kept, "skipped": skipped, "seconds": time.perf_counter() - start, "out": out}


def good_demo(transcript) -> bool:
    """A served teacher's episode worth learning from: answered correctly, every turn a readable tool
    call or answer in the think/answer format (fmt 1), every tool call ran, and nothing cut short."""
    return (bool(transcript.success) and not transcript.truncated
            and transcript.reward_components.get("fmt", 1.0) == 1.0
            and all(t.kind != "invalid" and t.tool_ok is not False for t in transcript.turns))


def collect_served(endpoint: str, model: str, tasks: str, split: str, num_tasks: int, out: str,
                   api_key_env: str | None = None, tool_mode: str = "native", temperature: float = 0.0,
                   max_new_tokens: int = 1024, max_concurrency: int = 8, max_turns: int = 4,
                   max_pixels: int = 1024 * 28 * 28, workers: int = 2, seed: int = 0, keep_all: bool = False,
                   prompt: str = "full", progress: bool = True) -> dict:
    """Write a served teacher's good episodes (`good_demo`) of the first `num_tasks` tasks to `out`
    as chat records; return counts (kept, skipped, unanswered: episodes the endpoint left unanswered)."""
    from tqdm.auto import tqdm

    from agents.chat_records import chat_messages, write_chat_records
    from agents.openai_backend import OpenAIBackend, OpenAIConfig
    from agents.served import run_served
    from cv_env.sandbox import Sandbox
    selected = _tasks_to_collect(tasks, split, seed, num_tasks, out)
    count = len(selected)
    backend = OpenAIBackend(OpenAIConfig(url=endpoint, model=model, api_key_env=api_key_env, tool_mode=tool_mode,
                                         temperature=temperature, max_tokens=max_new_tokens,
                                         max_concurrency=max_concurrency))
    start = time.perf_counter()
    with Sandbox(workers=workers) as sandbox, \
            tqdm(total=count, desc="collect", unit="episode", dynamic_ncols=True, disable=not progress) as bar:
        episodes = run_served(backend, selected,
                              dict(max_turns=max_turns, max_pixels=max_pixels, prompt=prompt), sandbox, seed=seed,
                              on_episode=lambda episode: bar.update(1))
    good = [e for e in episodes if keep_all or good_demo(e)]
    write_chat_records(((chat_messages(e.trajectory), {"task_id": e.task_id, "category": e.category, "answer": e.answer,
                                                       "reward": e.reward, "success": e.success,
                                                       "teacher": backend.name})
                        for e in good), out)
    return {"kept": len(good), "skipped": len(episodes) - len(good),
            "unanswered": int(sum(e.usage.get("unanswered", 0.0) for e in episodes)),
            "seconds": time.perf_counter() - start, "out": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="the oracle's records: whose chat template/tokenizer to use (default tiny:qwen2_5_vl); "
                             "with --endpoint: the model the endpoint serves")
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
    parser.add_argument("--endpoint", default=None,
                        help="a served teacher: the OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key-env", default=None, help="with --endpoint: the environment variable of its API key")
    parser.add_argument("--tool-mode", default="native", choices=["native", "prompt"],
                        help="with --endpoint: tool schema and calls as `tools`/`tool_calls` (native) or as text")
    parser.add_argument("--temperature", type=float, default=0.0, help="with --endpoint: sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="with --endpoint: the longest turn")
    parser.add_argument("--max-concurrency", type=int, default=8, help="with --endpoint: requests in flight at once")
    args = parser.parse_args(argv)
    if args.endpoint:
        if not args.model:
            parser.error("--endpoint needs --model: the name of the model the endpoint serves")
        result = collect_served(args.endpoint, args.model, args.tasks, args.split, args.num_tasks,
                                args.out or default_out(), api_key_env=args.api_key_env, tool_mode=args.tool_mode,
                                temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                max_concurrency=args.max_concurrency, max_turns=args.max_turns,
                                max_pixels=args.max_pixels, workers=args.workers, seed=args.seed,
                                keep_all=args.keep_all, prompt=args.prompt)
        print(f"wrote {result['kept']} demonstrations of {args.model} to {result['out']} ({result['skipped']} not "
              f"correct and well-formed skipped, {result['unanswered']} left unanswered by the endpoint) in "
              f"{result['seconds']:.1f} s")
        return 0
    result = collect(args.model or "tiny:qwen2_5_vl", args.tasks, args.split, args.num_tasks, args.out or default_out(),
                     max_turns=args.max_turns, max_pixels=args.max_pixels, max_total_tokens=args.max_total_tokens,
                     batch=args.batch, workers=args.workers, seed=args.seed, keep_all=args.keep_all,
                     prompt=args.prompt, tool_rate=args.tool_rate)
    print(f"wrote {result['kept']} demonstrations to {result['out']} ({result['skipped']} below the reward of the "
          f"oracle's plan skipped) in {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
