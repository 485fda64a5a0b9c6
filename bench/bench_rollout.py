"""Rollout throughput: env steps/s with the oracle, the engine's per-turn overhead, tiny-model sampling.

    python bench/bench_rollout.py [--batch 64] [--samples 1] [--rounds 3] [--workers 2] [--family qwen2_5_vl]
    python bench/bench_rollout.py --against /path/to/other/checkout [--repeats 3]   # side by side

Prints three figures:
1. env steps/s: `batch` CodeVision envs sharing one sandbox, reset and stepped by the oracle on a
   thread pool as the engine does (excluding resets; and including them, as a rollout must do them
   too; goal >= 200 steps/s on 2 cores);
2. the rollout engine with the oracle as its "model" (`ScriptedBackend`: zero model time), so all
   of its time is engine overhead: rendering, tokenizing, image processing, env steps, bookkeeping;
   reported per turn (one turn = one batched generate call for all live episodes) and per step,
   and the engine's own share per step: its time per step less the env's (figure 1), counted
   both ways (the env's steps only, so resets count as the engine's; and the env's steps and
   resets); and the same in CPU time of the bench process (steadier on a busy machine);
3. sampling tokens/s of the tiny model through `HFBackend` (log-probs recorded), for regressions.

--samples n plays batch/n tasks n times each, as a GRPO group does. --against runs the engine
figures (1, 2) in this process's tree and in another checkout's (its packages on PYTHONPATH)
alternately, `--repeats` times each, and prints the medians side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def env_steps_per_second(sandbox, tasks, batch: int, rounds: int, max_pixels: int,
                         samples: int = 1) -> tuple[float, float, float]:
    """(steps/s excluding resets, steps/s including resets, this process's CPU ms per step including
    resets) over `rounds` rounds of `batch` episodes (batch/samples tasks, each played `samples` times)."""
    envs = [gym.make("CodeVision-v0", tasks=tasks, sandbox=sandbox, max_pixels=max_pixels, disable_env_checker=True)
            for _ in range(batch)]
    pool = ThreadPoolExecutor(max_workers=4)
    step_time = total_time = cpu_time = 0.0
    steps = 0
    for r in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        live = list(pool.map(lambda i: _reset(envs[i], tasks[(r * batch + i) // samples]), range(batch)))
        while live:
            t1 = time.perf_counter()
            done = list(pool.map(lambda pair: _step(*pair), live))
            step_time += time.perf_counter() - t1
            steps += len(live)
            live = [pair for pair, finished in zip(live, done) if not finished]
        total_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0
    pool.shutdown()
    for env in envs:
        env.close()
    return steps / step_time, steps / total_time, 1000 * cpu_time / steps


def _reset(env, task):
    """Reset `env` to `task` (on the pool, as the engine resets) and pair it with a fresh oracle."""
    env.reset(options={"task": task})
    agent = OracleAgent()
    agent.reset(task)
    return env, agent


def _step(env, agent) -> bool:
    _, _, terminated, truncated, _ = env.step(agent.act())
    return terminated or truncated


def engine_overhead(sandbox, processor, tasks, batch: int, rounds: int, max_pixels: int, samples: int = 1) -> dict:
    engine = RolloutEngine(ScriptedBackend(processor), sandbox=sandbox,
                           env_kwargs=dict(max_turns=4, max_pixels=max_pixels), sampling=dict(max_new_tokens=2048),
                           max_total_tokens=32768)
    engine.rollout(tasks[-batch:], n=1)  # creates the envs once (tasks the rounds do not play)
    per_turn, per_step, steps_per_s, cpu_per_step, tokens = [], [], [], [], 0
    for r in range(rounds):
        chunk = [tasks[(r * batch + i * samples) // samples % len(tasks)] for i in range(batch // samples)]
        t0, c0 = time.perf_counter(), time.process_time()
        trajectories = engine.rollout(chunk, n=samples, seed=r)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        timings = engine.last_timings
        per_turn.append(timings["overhead_per_turn_s"])
        per_step.append((wall - timings["generate_s"]) / timings["env_steps"])
        steps_per_s.append(timings["env_steps"] / wall)
        cpu_per_step.append(1000 * cpu / timings["env_steps"])
        tokens += sum(len(t) for t in trajectories)
    engine.close()
    return {"per_turn_s": statistics.median(per_turn), "per_step_ms": 1000 * statistics.median(per_step),
            "steps_per_s": statistics.median(steps_per_s), "cpu_ms_per_step": statistics.median(cpu_per_step),
            "tokens_per_episode": tokens / (rounds * batch)}


def engine_figures(args) -> dict:
    """Figures 1 and 2 in this process's tree: env steps/s, the engine's time per step and its own share."""
    source = load_tasks("synthetic", split="train")
    # Each figure plays its own tasks: a task's input is downscaled once per process (cv_env.shown).
    tasks = [source[i] for i in range(args.batch * (2 * args.rounds + 1))]
    env_tasks, engine_tasks = tasks[:args.batch * args.rounds], tasks[args.batch * args.rounds:]
    with Sandbox(workers=args.workers) as sandbox:
        steps, with_resets, env_cpu = env_steps_per_second(sandbox, env_tasks, args.batch, args.rounds,
                                                           args.max_pixels, args.samples)
        processor = Policy.load(f"tiny:{args.family}").processor
        overhead = engine_overhead(sandbox, processor, engine_tasks, args.batch, args.rounds, args.max_pixels,
                                   args.samples)
    # The engine's own share: its time per step less the env's (rendering, tokenizing, image
    # processing, bookkeeping), with resets counted as the engine's, and as the env's.
    # And in CPU time of this process (sandbox workers excluded, the same in both), which a busy
    # machine disturbs far less than wall time: the engine's CPU per step less the env's, resets
    # included (the scripted "model"'s own tokenizing counts as the engine's here).
    return {"env_steps_per_s": steps, "env_steps_per_s_with_resets": with_resets, **overhead,
            "own_ms": overhead["per_step_ms"] - 1000 / steps,
            "own_ms_resets_as_env": overhead["per_step_ms"] - 1000 / with_resets,
            "env_cpu_ms_per_step": env_cpu, "own_cpu_ms": overhead["cpu_ms_per_step"] - env_cpu}


def print_engine_figures(figures: dict, batch: int) -> None:
    print(f"env steps/s (oracle, batch {batch}):         {figures['env_steps_per_s']:8.1f}   "
          f"(incl. resets: {figures['env_steps_per_s_with_resets']:.1f})")
    print(f"engine overhead per turn (batch {batch}, no model): {figures['per_turn_s'] * 1000:8.1f} ms"
          f"   per env step: {figures['per_step_ms']:.2f} ms   engine steps/s: {figures['steps_per_s']:.1f}"
          f"   tokens/episode: {figures['tokens_per_episode']:.0f}")
    print(f"engine's own share per env step:                  {figures['own_ms']:8.2f} ms"
          f"   (resets counted as the env's: {figures['own_ms_resets_as_env']:.2f} ms)")
    print(f"CPU of this process per env step: env {figures['env_cpu_ms_per_step']:.2f} ms, engine "
          f"{figures['cpu_ms_per_step']:.2f} ms, the engine's own {figures['own_cpu_ms']:.2f} ms")


def side_by_side(args) -> None:
    """Figures 1-2 of this tree and of `args.against`, alternately, `args.repeats` times each."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, "against": os.path.abspath(args.against)}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    passed = ["--batch", str(args.batch), "--samples", str(args.samples), "--rounds", str(args.rounds),
              "--workers", str(args.workers), "--max-pixels", str(args.max_pixels), "--family", args.family]
    passed += ["--threads", str(args.threads)] if args.threads else []
    for _ in range(args.repeats):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", *passed], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    keys = ("env_steps_per_s", "env_steps_per_s_with_resets", "per_turn_s", "per_step_ms", "own_ms",
            "own_ms_resets_as_env", "env_cpu_ms_per_step", "cpu_ms_per_step", "own_cpu_ms")
    print(f"medians of {args.repeats} alternating runs; this tree = {here}, against = {trees['against']}")
    print(f"{'figure':30s} {'this tree':>12s} {'against':>12s} {'ratio':>8s}   range (this tree | against)")
    for key in keys:
        a, b = (statistics.median(run[key] for run in runs[name]) for name in trees)
        spread = " | ".join(f"{min(run[key] for run in runs[name]):.2f}-{max(run[key] for run in runs[name]):.2f}"
                            for name in trees)
        print(f"{key:30s} {a:12.3f} {b:12.3f} {a / b if b else float('nan'):8.2f}   {spread}")


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
    parser.add_argument("--samples", type=int, default=1, help="episodes per task (a GRPO group's n)")
    parser.add_argument("--against", default=None, help="another checkout: figures 1-2 side by side with it")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per tree with --against")
    parser.add_argument("--json", action="store_true", help="print figures 1-2 as one JSON line and stop")
    args = parser.parse_args()
    if args.batch % args.samples:
        parser.error(f"--batch {args.batch} is not a multiple of --samples {args.samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.against:
        side_by_side(args)
        return
    if args.json:
        print(json.dumps(engine_figures(args)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"{args.workers} sandbox workers, batch {args.batch} ({args.batch // args.samples} tasks x {args.samples})")
    print_engine_figures(engine_figures(args), args.batch)
    rate = sampling_tokens_per_second(args.family, args.gen_batch, args.new_tokens, repeats=3)
    print(f"tiny {args.family} sampling tokens/s (HFBackend, batch {args.gen_batch}, {args.new_tokens} new): "
          f"{rate:8.1f}")


if __name__ == "__main__":
    main()
