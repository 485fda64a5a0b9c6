"""Rollout throughput: env steps/s with the oracle, the engine's per-turn overhead, tiny-model sampling.

    python bench/bench_rollout.py [--batch 64] [--rounds 3] [--workers 2] [--family qwen2_5_vl]

Prints three figures:
1. env steps/s: `batch` CodeVision envs sharing one sandbox, stepped by the oracle on a thread
   pool as the engine does (reset excluded; goal >= 200 steps/s on 2 cores);
2. the rollout engine with the oracle as its "model" (`ScriptedBackend`: zero model time), so all
   of its time is engine overhead: rendering, tokenizing, image processing, env steps, bookkeeping;
   reported per turn (one turn = one batched generate call for all live episodes) and per step;
3. sampling tokens/s of the tiny model through `HFBackend` (log-probs recorded), for regressions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402

import cv_env  # noqa: E402,F401
from agents.generation import GenerationRequest, HFBackend, SamplingParams, ScriptedBackend  # noqa: E402
from agents.policy import Policy  # noqa: E402
from agents.rollout import RolloutEngine  # noqa: E402
from agents.scripted import OracleAgent  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402


def env_steps_per_second(sandbox, tasks, batch: int, rounds: int, max_pixels: int) -> tuple[float, float]:
    """(steps/s excluding resets, steps/s including resets) over `rounds` rounds of `batch` episodes."""
    envs = [gym.make("CodeVision-v0", tasks=tasks, sandbox=sandbox, max_pixels=max_pixels, disable_env_checker=True)
            for _ in range(batch)]
    pool = ThreadPoolExecutor(max_workers=4)
    step_time = total_time = 0.0
    steps = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        agents = []
        for i, env in enumerate(envs):
            env.reset(options={"index": r * batch + i})
            agent = OracleAgent()
            agent.reset(env.unwrapped.task)
            agents.append(agent)
        live = list(zip(envs, agents))
        while live:
            t1 = time.perf_counter()
            done = list(pool.map(lambda pair: _step(*pair), live))
            step_time += time.perf_counter() - t1
            steps += len(live)
            live = [pair for pair, finished in zip(live, done) if not finished]
        total_time += time.perf_counter() - t0
    pool.shutdown()
    for env in envs:
        env.close()
    return steps / step_time, steps / total_time


def _step(env, agent) -> bool:
    _, _, terminated, truncated, _ = env.step(agent.act())
    return terminated or truncated


def engine_overhead(sandbox, processor, tasks, batch: int, rounds: int, max_pixels: int) -> dict:
    engine = RolloutEngine(ScriptedBackend(processor), sandbox=sandbox,
                           env_kwargs=dict(max_turns=4, max_pixels=max_pixels), sampling=dict(max_new_tokens=2048),
                           max_total_tokens=32768)
    engine.rollout(tasks[:batch], n=1)  # creates the envs once
    per_turn, per_step, steps_per_s, tokens = [], [], [], 0
    for r in range(rounds):
        chunk = [tasks[(r * batch + i) % len(tasks)] for i in range(batch)]
        t0 = time.perf_counter()
        trajectories = engine.rollout(chunk, n=1, seed=r)
        wall = time.perf_counter() - t0
        timings = engine.last_timings
        per_turn.append(timings["overhead_per_turn_s"])
        per_step.append((wall - timings["generate_s"]) / timings["env_steps"])
        steps_per_s.append(timings["env_steps"] / wall)
        tokens += sum(len(t) for t in trajectories)
    engine.close()
    return {"per_turn_s": statistics.median(per_turn), "per_step_ms": 1000 * statistics.median(per_step),
            "steps_per_s": statistics.median(steps_per_s), "tokens_per_episode": tokens / (rounds * batch)}


def sampling_tokens_per_second(family: str, batch: int, new_tokens: int, repeats: int) -> float:
    policy = Policy.load(f"tiny:{family}", dtype="float32", device="cpu")
    backend = HFBackend(policy, stop_tokens=("<|endoftext|>",))  # a random model: don't stop early
    sandbox_free_tasks = load_tasks("synthetic", split="test")
    requests = []
    for i in range(batch):
        task = sandbox_free_tasks[i]
        messages = [{"role": "user", "content": [{"type": "image", "image": task.images[0]},
                                                 {"type": "text", "text": task.question}]}]
        state = policy.renderer.start(messages)
        requests.append(GenerationRequest(state.token_ids, state.images, state.all_pixel_values(),
                                          state.image_grid_thw, new_tokens))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    rates = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        results = backend.generate(requests, sampling, seed=r)
        if r:  # the first call warms up
            rates.append(sum(len(x.token_ids) for x in results) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="sandbox workers")
    parser.add_argument("--max-pixels", type=int, default=256 * 256, help="env max_pixels (model-side image size)")
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is faster on a busy shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"{args.workers} sandbox workers, batch {args.batch}")
    source = load_tasks("synthetic", split="train")
    tasks = [source[i] for i in range(args.batch * (args.rounds + 1))]
    with Sandbox(workers=args.workers) as sandbox:
        steps, with_resets = env_steps_per_second(sandbox, tasks, args.batch, args.rounds, args.max_pixels)
        print(f"env steps/s (oracle, batch {args.batch}):         {steps:8.1f}   (incl. resets: {with_resets:.1f})")
        policy_processor = Policy.load(f"tiny:{args.family}").processor
        overhead = engine_overhead(sandbox, policy_processor, tasks, args.batch, args.rounds, args.max_pixels)
        print(f"engine overhead per turn (batch {args.batch}, no model): {overhead['per_turn_s'] * 1000:8.1f} ms"
              f"   per env step: {overhead['per_step_ms']:.2f} ms   engine steps/s: {overhead['steps_per_s']:.1f}"
              f"   tokens/episode: {overhead['tokens_per_episode']:.0f}")
        # The engine's own share: its time per step minus the env's own (figure 1), i.e. rendering,
        # tokenizing, image processing and bookkeeping (resets count as the engine's).
        print(f"engine's own share per env step:                  {overhead['per_step_ms'] - 1000 / steps:8.2f} ms")
    rate = sampling_tokens_per_second(args.family, args.gen_batch, args.new_tokens, repeats=3)
    print(f"tiny {args.family} sampling tokens/s (HFBackend, batch {args.gen_batch}, {args.new_tokens} new): "
          f"{rate:8.1f}")


if __name__ == "__main__":
    main()
