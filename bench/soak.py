"""Soak: episodes of a scripted agent that mixes good and bad code, envs on threads sharing one Sandbox.

    python bench/soak.py [--episodes 1000] [--threads 4] [--workers 2] [--timeout-s 1.0] [--json out.json]

The agent (`agents.scripted.RandomAgent`) writes good calls, useless ones, code that fails to
compile or raises, code that assigns no `result`, huge prints with control characters and lone
surrogates, odd images (modes F / I;16 / RGBA / P / 1, 1x1, extreme aspect, large), hostile
snippets, malformed and over-long turns, answers, and now and then a loop the sandbox's wall
clock must stop. Every step is checked: no exception, an observation inside
`observation_space`, a finite reward, step rewards summing to the episode's total.

Printed: throughput, then host RSS, open file descriptors and descendant processes (children
and grandchildren, from /proc) sampled along the run, their growth between the first and the
second half of the run (after a warm-up), and the processes left once everything is closed.
`tests/test_soak.py` runs this script and asserts on the figures it writes with --json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym  # noqa: E402

import cv_env  # noqa: E402,F401  (registers CodeVision-v0)
from agents.scripted import RandomAgent  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402

WARMUP_SHARE = 0.2  # samples before this share of the run are left out of the growth figures


# -- what the host holds ------------------------------------------------------------------------


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below `pid` (default: this one): children, grandchildren, ... (from /proc)."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # it ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim), so RSS shows live memory and
    not the high-water mark of whichever thread's arena last held a large image."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps some freed memory, the figures are noisier
        pass


def rss_mb() -> float:
    """This process's resident memory in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def growth(samples: list[dict], key: str) -> float:
    """Median of `key` over the second half of the run minus its median over the first half
    (samples of the warm-up left out): a trend, not the noise of one sample."""
    start = next((i for i, s in enumerate(samples) if s["episodes"] >= WARMUP_SHARE * samples[-1]["episodes"]), 0)
    kept = samples[start:]
    half = len(kept) // 2
    if half == 0:
        return 0.0
    return statistics.median(s[key] for s in kept[half:]) - statistics.median(s[key] for s in kept[:half])


# -- the soak -----------------------------------------------------------------------------------


def _play(env, agent: RandomAgent, seed: int, stats: dict) -> None:
    """One episode, every step checked; raises AssertionError on a broken property."""
    obs, _ = env.reset(seed=seed)
    agent.reset(env.unwrapped.task)
    assert env.observation_space.contains(obs), "reset observation outside observation_space"
    paid, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(agent.act(obs))
        assert env.observation_space.contains(obs), f"observation outside observation_space: {obs['text'][:200]!r}"
        assert math.isfinite(reward), f"reward {reward}"
        paid += reward
        done = terminated or truncated
        stats["steps"] += 1
        if "tool_ok" in info:
            stats["calls"] += 1
            stats["failed"] += not info["tool_ok"]
            stats["no_image"] += info["tool_ok"] and not obs["images"]
            stats["timeouts"] += "TimeoutError" in obs["text"]
    assert abs(paid - info["reward_components"]["total"]) < 1e-6, "step rewards do not sum to the total"


def soak(episodes: int = 1000, threads: int = 4, workers: int = 2, timeout_s: float = 1.0,
         endless_prob: float = 0.01, samples: int = 40, seed: int = 0) -> dict:
    """Run the soak; return its figures (see the module docstring) as a JSON-safe dict."""
    before = set(descendants())
    errors: list[str] = []
    stats = {"steps": 0, "calls": 0, "failed": 0, "no_image": 0, "timeouts": 0}
    trace: list[dict] = []
    lock = threading.Lock()
    done = [0]
    sample_every = max(1, episodes // samples)
    next_seed = iter(range(seed, seed + episodes))

    def sample() -> None:
        gc.collect()
        _release_free_heap()
        trace.append({"episodes": done[0], "rss_mb": rss_mb(), "fds": open_fds(),
                      "children": len(set(descendants()) - before), "time_s": time.perf_counter() - start})

    def work(env) -> None:
        local = dict.fromkeys(stats, 0)
        while True:
            with lock:
                episode_seed = next(next_seed, None)
            if episode_seed is None:
                break
            agent = RandomAgent(seed=episode_seed, endless_prob=endless_prob)
            try:
                _play(env, agent, episode_seed, local)
            except Exception as exc:  # noqa: BLE001 - counted and reported: the soak asserts there is none
                with lock:
                    errors.append(f"episode {episode_seed}: {type(exc).__name__}: {exc}"[:500])
            with lock:
                done[0] += 1
                if done[0] % sample_every == 0:
                    sample()
        with lock:
            for key, value in local.items():
                stats[key] += value

    start = time.perf_counter()
    sandbox = Sandbox(workers=workers, timeout_s=timeout_s)
    envs = [gym.make("CodeVision-v0", tasks="synthetic", sandbox=sandbox, max_turns=4, max_pixels=256 * 256)
            for _ in range(threads)]
    sample()
    pool = [threading.Thread(target=work, args=(env,)) for env in envs]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - start
    sample()
    for env in envs:
        env.close()
    sandbox.close()
    deadline = time.monotonic() + 10.0  # processes that were told to exit get a moment to go
    while (left := sorted(set(descendants()) - before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {
        "episodes": done[0], "threads": threads, "workers": workers, "timeout_s": timeout_s,
        "elapsed_s": elapsed, "episodes_per_s": done[0] / elapsed, **stats,
        "errors": errors, "samples": trace,
        "growth": {key: growth(trace, key) for key in ("rss_mb", "fds", "children")},
        "max_children": max(s["children"] for s in trace),
        "left_after_close": left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4, help="envs, one per thread, sharing the sandbox")
    parser.add_argument("--workers", type=int, default=2, help="sandbox worker processes")
    parser.add_argument("--timeout-s", type=float, default=1.0, help="the sandbox's wall clock per call")
    parser.add_argument("--endless-prob", type=float, default=0.01, help="share of calls that loop until stopped")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} episodes={args.episodes} threads={args.threads} "
          f"workers={args.workers} timeout_s={args.timeout_s}", flush=True)
    figures = soak(args.episodes, args.threads, args.workers, args.timeout_s, args.endless_prob)
    print(f"{figures['episodes']} episodes in {figures['elapsed_s']:.1f} s ({figures['episodes_per_s']:.1f}/s): "
          f"{figures['steps']} steps, {figures['calls']} tool calls ({figures['failed']} failed, "
          f"{figures['no_image']} ran without an image, {figures['timeouts']} stopped by the timeout), "
          f"{len(figures['errors'])} exceptions")
    for error in figures["errors"][:5]:
        print("  ", error)
    print(f"{'episodes':>8} {'time s':>7} {'RSS MiB':>8} {'fds':>4} {'children':>8}")
    for s in figures["samples"][:: max(1, len(figures["samples"]) // 10)] + figures["samples"][-1:]:
        print(f"{s['episodes']:8d} {s['time_s']:7.1f} {s['rss_mb']:8.1f} {s['fds']:4d} {s['children']:8d}")
    g = figures["growth"]
    print(f"growth, second half vs first half (medians, after {WARMUP_SHARE:.0%} warm-up): RSS {g['rss_mb']:+.1f} MiB, "
          f"fds {g['fds']:+.1f}, children {g['children']:+.1f}; most children at once {figures['max_children']}")
    print(f"processes left after close(): {len(figures['left_after_close'])} {figures['left_after_close']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
