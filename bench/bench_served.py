"""Served-model throughput: episodes/s through an OpenAI-compatible endpoint on loopback.

    PYTHONPATH=. python bench/bench_served.py [--episodes 64] [--concurrency 1 8 32] [--model-ms 0 250] [--real]

The loopback server (tests/openai_stub.py) is a scripted model that takes `--model-ms` per
request (0: our own cost alone; 250: a served model's turn): each episode is one native tool
call (rotate the image) and one answer, so two requests and one sandbox run. For each
concurrency (`max_concurrency`: requests in flight) it prints episodes/s through the HTTP
endpoint (`agents.served.run_served`: `OpenAIBackend` as the chat backend of the rollout engine)
beside the same scripted turns played in process (the backend with `complete` answering without
HTTP, after the same model time), so the ratio is the cost of the endpoint round trips; and the
speed-up over concurrency 1. Each run includes making its envs, as an evaluation does.

--real also serves the tiny random Qwen2.5-VL with `transformers serve` (agents.serve_local) and
measures episodes/s through it (one CPU process generating: bound by the server, not by us).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback stub server

from openai_stub import StubChatServer  # noqa: E402

import cv_env  # noqa: E402,F401
from agents.openai_backend import OpenAIBackend, OpenAIConfig, ServedTurn, reply_action  # noqa: E402
from agents.served import run_served  # noqa: E402
from cv_env.protocol import TOOL_NAME  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402

CALL = {"role": "assistant", "content": "<think>Turn it upright.</think>",
        "tool_calls": [{"id": "call_0", "type": "function", "function": {
            "name": TOOL_NAME, "arguments": json.dumps({"code": "result = image.rotate(90, expand=True)"})}}]}
ANSWER = {"role": "assistant", "content": "<think>Now I can read it.</think>\n<answer>7</answer>"}


VARIED = {"on": False}  # --varied: episodes make 0 to 3 tool calls


def _calls(body: dict) -> int:
    """How many tool calls the episode makes: 1, or (--varied) 0 to 3, drawn from its input image."""
    if not VARIED["on"]:
        return 1
    url = next(part["image_url"]["url"] for part in body["messages"][1]["content"] if part["type"] == "image_url")
    return zlib.crc32(url.encode()) % 4


def scripted(body: dict, model_s: float = 0.0) -> dict:
    """The scripted model: tool calls (one; --varied: 0 to 3), then the answer, each turn after
    `model_s` seconds."""
    time.sleep(model_s)
    return CALL if sum(m["role"] == "assistant" for m in body["messages"]) < _calls(body) else ANSWER


class InProcess(OpenAIBackend):
    """The same scripted turns without HTTP: the baseline of the served loop's own cost (the
    backend's conversation building and image encoding included: only `complete` is replaced)."""

    def __init__(self, concurrency: int, model_s: float = 0.0):
        super().__init__(OpenAIConfig(url="http://in-process/v1", model="scripted", max_concurrency=concurrency))
        self.model_s = model_s

    def complete(self, messages, seed=None) -> ServedTurn:
        message = scripted({"messages": messages}, self.model_s)
        call_id = "call_0" if "tool_calls" in message else None
        history = {"role": "assistant", "content": message["content"], **({"tool_calls": message["tool_calls"]}
                                                                        if call_id else {})}
        return ServedTurn(reply_action(message), history, call_id, "stop", 0, 0, 0.0, 1)


def episodes_per_second(backend, tasks, sandbox, env_kwargs) -> tuple[float, int]:
    start = time.perf_counter()
    episodes = run_served(backend, tasks, env_kwargs, sandbox)
    elapsed = time.perf_counter() - start
    return len(episodes) / elapsed, sum(bool(e.error) for e in episodes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_server(episodes: int, concurrency: list[int], tasks, sandbox, env_kwargs) -> None:
    from agents.tiny import tiny_model_dir

    folder, port = str(tiny_model_dir("qwen2_5_vl")), _free_port()
    process = subprocess.Popen([sys.executable, "-m", "agents.serve_local", folder, "--host", "127.0.0.1", "--port",
                                str(port), "--device", "cpu", "--dtype", "float32"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        print("\ntransformers serve, tiny random Qwen2.5-VL on CPU (max_tokens 32; one turn per episode):")
        for c in concurrency:
            backend = OpenAIBackend(OpenAIConfig(url=f"http://127.0.0.1:{port}/v1", model=folder, max_tokens=32,
                                                 max_concurrency=c, timeout_s=300))
            rate, errors = episodes_per_second(backend, tasks[:episodes], sandbox, env_kwargs)
            print(f"  concurrency {c:3d}: {rate:6.2f} episodes/s  ({errors} unanswered)")
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64, help="episodes per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--model-ms", type=float, nargs="+", default=[0, 250], help="the stub model's time per request")
    parser.add_argument("--workers", type=int, default=2, help="sandbox workers")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per setting (the best is shown)")
    parser.add_argument("--real", action="store_true", help="also measure transformers serve with the tiny model")
    parser.add_argument("--varied", action="store_true",
                        help="episodes make 0 to 3 tool calls (by their image), so they end at different turns")
    args = parser.parse_args()
    VARIED["on"] = args.varied
    source = load_tasks("synthetic", split="test", seed=0)
    tasks = [source[i % len(source)] for i in range(args.episodes)]
    env_kwargs = {"max_turns": 4, "max_pixels": 1024 * 28 * 28}
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} episodes={args.episodes} sandbox workers={args.workers}"
          f" ({'1 to 4 requests and 0 to 3 sandbox runs' if args.varied else '2 requests + 1 sandbox run'} per episode)")
    model_s = {"s": 0.0}
    with Sandbox(workers=args.workers) as sandbox, \
            StubChatServer(lambda mode, body, nth: scripted(body, model_s["s"])) as stub:
        run_served(InProcess(2), tasks[:4], env_kwargs, sandbox)  # warm up the sandbox workers
        import gymnasium as gym

        t0 = time.perf_counter()
        gym.make("CodeVision-v0", tasks=tasks[:1], sandbox=sandbox, disable_env_checker=True, **env_kwargs).close()
        print(f"gym.make: {time.perf_counter() - t0:.3f} s per env (a run makes one env per episode of a batch)")
        for ms in args.model_ms:
            model_s["s"] = ms / 1000
            print(f"\nmodel time {ms:g} ms per request")
            print(f"{'concurrency':>11} | {'HTTP ep/s':>9} | {'in-process ep/s':>15} | {'HTTP / in-process':>17} | "
                  f"{'HTTP speed-up vs 1':>18}")
            first = None
            for c in args.concurrency:
                backend = OpenAIBackend(OpenAIConfig(url=stub.url("bench"), model="scripted", max_concurrency=c))
                http = max(episodes_per_second(backend, tasks, sandbox, env_kwargs)[0] for _ in range(args.rounds))
                local = max(episodes_per_second(InProcess(c, ms / 1000), tasks, sandbox, env_kwargs)[0]
                            for _ in range(args.rounds))
                first = first or http
                print(f"{c:>11} | {http:9.1f} | {local:15.1f} | {http / local:17.2f} | {http / first:18.2f}")
        if args.real:
            real_server(min(args.episodes, 16), args.concurrency, tasks, sandbox, env_kwargs)


if __name__ == "__main__":
    main()
