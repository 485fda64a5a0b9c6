"""A served model through the CodeVision tool loop: the agent, one episode, and many at once.

    backend = OpenAIBackend(OpenAIConfig(url="http://127.0.0.1:8000/v1", model="my-vlm"))
    episodes = run_served(backend, tasks, env_kwargs={"max_turns": 12}, sandbox=sandbox)
    episodes[0].transcript      # agents.transcript.Transcript: what algos.evaluate reports
    episodes[0].messages        # the conversation, for SFT chat records (agents.collect)
    episodes[0].usage           # requests, attempts, prompt/completion tokens, latency_s

`ServedAgent` is the served model as an agent (`reset()`, then `act(observation) -> action`):
it keeps the chat-completions conversation, built only from what the env's observations say.
`play_served` drives one episode only through the Gym API (`env.reset` / `env.step` observations
and `info`), so it runs on any wrapped env. `run_served` plays many episodes concurrently
(`max_concurrency` of the backend), one env per thread over one shared sandbox.

Nothing the server does stops a run: a request that fails after its retries (or a reply that is
no chat completion) ends that episode, unanswered, with `error` set, and the others go on. An
exception inside the env's step (a bug: a model's mistakes are observations) ends its episode
likewise. Only a refusal of the run's settings (`EndpointConfigError`: 401/403/404) or a run in
which every episode failed raises.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from PIL import Image

import cv_env  # noqa: F401  (registers CodeVision-v0)
from agents.openai_backend import (EndpointDown, EndpointError, OpenAIBackend, ServedTurn, tool_reply_messages,
                                   user_message)
from agents.trajectory import Trajectory, Turn
from agents.transcript import Transcript
from cv_env.judge import make_judge
from cv_env.protocol import TOOL_SCHEMA, get_prompt
from cv_env.sandbox import Sandbox
from cv_env.task import Task

__all__ = ["ServedAgent", "ServedEpisode", "play_served", "run_served", "usage_metrics"]


class ServedAgent:
    """A served model as an agent of the Gym loop.

    system_prompt / tools: what the model is told before the task (the env's prompt preset:
    `cv_env.protocol.get_prompt(name)`); in native tool mode the backend sends the tool schema
    as `tools` whatever the preset lists. seed: sent with every request (plus the turn number),
    so sampled episodes differ from one another and repeat run to run where the server honours it.
    """

    def __init__(self, backend: OpenAIBackend, system_prompt: str, tools: Sequence[dict] = (TOOL_SCHEMA,)):
        self.backend = backend
        self.system_prompt, self.tools = system_prompt, list(tools)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Start a new conversation."""
        self.seed = seed
        self.wire: list[dict[str, Any]] = self.backend.system_messages(self.system_prompt, self.tools)
        self.turns: list[ServedTurn] = []
        self.failed_requests = self.failed_attempts = 0

    def act(self, observation: dict[str, Any]) -> str:
        """The model's next turn (the env action) after `observation` (what reset or step returned).

        Raises `EndpointError` when the endpoint gave no usable reply (after its retries).
        """
        text, images = str(observation.get("text", "")), list(observation.get("images", ()))
        if observation.get("role") == "tool":
            last = self.turns[-1] if self.turns else None
            self.wire.extend(tool_reply_messages(text, images, last.call_id if last else None))
        else:
            self.wire.append(user_message(text, images))
        seed = None if self.seed is None else self.seed * 1000 + len(self.turns)
        try:
            turn = self.backend.complete(self.wire, seed=seed)
        except EndpointError as error:
            self.failed_requests, self.failed_attempts = self.failed_requests + 1, self.failed_attempts + error.attempts
            raise
        self.turns.append(turn)
        self.wire.append(turn.message)
        return turn.action

    @property
    def usage(self) -> dict[str, float]:
        """This conversation's requests and attempts (failed ones included), the prompt and
        completion tokens the server reported, and the answered requests' latency (sum and max, s)."""
        return {"requests": float(len(self.turns) + self.failed_requests),
                "attempts": float(sum(t.attempts for t in self.turns) + self.failed_attempts),
                "prompt_tokens": float(sum(t.prompt_tokens for t in self.turns)),
                "completion_tokens": float(sum(t.completion_tokens for t in self.turns)),
                "latency_s": sum(t.latency_s for t in self.turns),
                "latency_max_s": max((t.latency_s for t in self.turns), default=0.0)}


@dataclass(frozen=True)
class ServedEpisode:
    """One episode of a served model.

    transcript: the episode turn by turn (`agents.transcript.Transcript`), for reports.
    messages: the conversation as the env showed it (system, user with the input images, then
    assistant turns and tool replies with their images, PIL): a chat record for SFT.
    usage: `ServedAgent.usage`. error: what ended the episode early ("" when nothing did): the
    endpoint gave no usable reply (`unanswered`), or the env's step raised.
    """

    transcript: Transcript
    messages: list[dict[str, Any]]
    usage: dict[str, float] = field(default_factory=dict)
    error: str = ""
    unanswered: bool = False


def _images(observation: dict[str, Any]) -> list[Image.Image]:
    return [Image.fromarray(np.asarray(a)) for a in observation.get("images", ())]


def _message(role: str, text: str, images: Sequence[Image.Image]) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]}


def play_served(env: gym.Env, agent: ServedAgent, task: Task, seed: int | None = None, sample_index: int = 0,
                agent_name: str = "") -> ServedEpisode:
    """Play one episode of `task` with `agent`, through `env`'s Gym API only.

    Each step's reward, execution result and ops come from its `info`; the env's replies (text
    and images) from its observations. When the endpoint gives no usable reply the episode ends
    where it is (`ServedEpisode.error`, truncation "error"): no turn is made up for the model. An
    exception in the env's step ends the episode after that turn, the same way.
    """
    observation, _ = env.reset(seed=seed, options={"task": task})
    agent.reset(seed)
    question, inputs = str(observation["text"]), _images(observation)
    messages = [{"role": "system", "content": [{"type": "text", "text": agent.system_prompt}]},
                _message("user", question, inputs)]
    turns: list[Turn] = []
    info: dict[str, Any] = {}
    error, truncation, tool_calls, unanswered = "", "", 0, False
    while True:
        try:
            action = agent.act(observation)
        except EndpointError as exc:
            error, truncation, unanswered = str(exc), "error", True
            break
        messages.append({"role": "assistant", "content": action})
        try:
            observation, reward, terminated, truncated, info = env.step(action)
        except Exception as exc:  # noqa: BLE001 - an env bug ends this episode, not the run
            error, truncation = f"the env's step raised {type(exc).__name__}: {exc}"[:2000], "error"
            turns.append(Turn(action=action, reward=0.0))
            break
        done = terminated or truncated
        turn = Turn(action=action, reward=float(reward))
        if "tool_ok" in info:
            tool_calls += 1
            tool_ok = bool(info["tool_ok"])
            turn = Turn(action=action, reward=float(reward), reply_text=str(observation["text"]),
                        reply_images=tuple(_images(observation)), reply_shown=not done, tool_ok=tool_ok,
                        ops=tuple(info.get("ops", [])) if tool_ok else ())
            messages.append(_message("tool", turn.reply_text, turn.reply_images))
        turns.append(turn)
        if done:
            truncation = "max_turns" if truncated else ""
            break
    trajectory = Trajectory(
        task_id=task.id, group_id=task.id, category=task.category, prompt_text=question,
        prompt_images=tuple(inputs), turns=tuple(turns), success=bool(info.get("correct", False)),
        answer=info.get("answer"), reward_components={k: float(v) for k, v in info.get("reward_components", {}).items()},
        used_ops=tuple(info.get("used_ops", ())), num_tool_calls=tool_calls,
        num_failed_calls=sum(t.tool_ok is False for t in turns), truncation=truncation, error=error,
        judge=dict(info.get("judge", {})), sample_index=sample_index)
    return ServedEpisode(Transcript.of(trajectory, task, agent_name), messages, agent.usage, error, unanswered)


def run_served(backend: OpenAIBackend, tasks: Sequence[Task], env_kwargs: dict[str, Any], sandbox: Sandbox,
               samples: int = 1, seed: int = 0, name: str | None = None,
               on_episode: Callable[[ServedEpisode], None] | None = None) -> list[ServedEpisode]:
    """Play `samples` episodes of every task with the served model, `max_concurrency` at a time.

    env_kwargs: the env's keyword arguments besides tasks and sandbox (max_turns, max_pixels,
    prompt, reward, judge, ...); one judge is shared by every env. Results come back task by task,
    sample by sample; `on_episode` (e.g. a progress bar) sees each as it finishes.
    Raises `EndpointConfigError` at the first refusal of the settings, and `EndpointDown` when
    every episode ended unanswered (the endpoint is down or refuses every request).
    """
    if not tasks:
        raise ValueError("run_served needs at least one task")
    env_kwargs = dict(env_kwargs)
    env_kwargs["judge"] = make_judge(env_kwargs.get("judge"))  # one judge, one cache, one limit
    preset = get_prompt(env_kwargs.get("prompt", "full"))
    name = name or backend.name
    jobs = [(i, s) for i in range(len(tasks)) for s in range(samples)]
    workers = max(1, min(len(jobs), backend.config.max_concurrency))
    envs: queue.Queue = queue.Queue()
    for _ in range(workers):
        envs.put(gym.make("CodeVision-v0", tasks=[tasks[0]], sandbox=sandbox, disable_env_checker=True, **env_kwargs))
    stop = threading.Event()  # set by a refusal of the settings: the jobs not started yet are skipped

    def play(job: tuple[int, int]) -> ServedEpisode | None:
        if stop.is_set():
            return None
        index, sample = job
        env = envs.get()
        try:
            episode = play_served(env, ServedAgent(backend, preset.system, preset.tools), tasks[index],
                                  seed=seed + index * samples + sample, sample_index=sample, agent_name=name)
        except Exception:
            stop.set()
            raise
        finally:
            envs.put(env)
        if on_episode is not None:
            on_episode(episode)
        return episode

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            episodes = list(pool.map(play, jobs))
    finally:
        while not envs.empty():
            envs.get().close()
    failed = [e for e in episodes if e.error]
    if len(failed) == len(episodes) and not all(e.unanswered for e in failed):
        raise RuntimeError(f"every episode ({len(episodes)}) ended by an error, so there is nothing to report; "
                           f"the first: {failed[0].error}")
    if len(failed) == len(episodes):
        raise EndpointDown(f"every episode ({len(episodes)}) ended without an answer from the endpoint, so there is "
                           f"nothing to report; the first: {failed[0].error}. Check that the server is up and "
                           "answers a chat completion for this model (or raise served.timeout_s for a slow one)")
    return episodes


def usage_metrics(episodes: Sequence[ServedEpisode]) -> dict[str, float]:
    """served/* figures of a run: requests and retries, episodes an error ended (of which the endpoint
    left unanswered),
    prompt and completion tokens per episode, and request latency (mean and max, seconds)."""
    n = max(1, len(episodes))
    requests = sum(e.usage.get("requests", 0.0) for e in episodes)
    attempts = sum(e.usage.get("attempts", 0.0) for e in episodes)
    answered = requests - sum(e.unanswered for e in episodes)  # an unanswered episode's last request failed
    latency = sum(e.usage.get("latency_s", 0.0) for e in episodes)
    return {
        "served/requests": requests,
        "served/retries": attempts - requests,
        "served/episode_errors": float(sum(bool(e.error) for e in episodes)),
        "served/unanswered": float(sum(e.unanswered for e in episodes)),
        "served/prompt_tokens_per_episode": sum(e.usage.get("prompt_tokens", 0.0) for e in episodes) / n,
        "served/completion_tokens_per_episode": sum(e.usage.get("completion_tokens", 0.0) for e in episodes) / n,
        "served/latency_s": latency / answered if answered else 0.0,
        "served/latency_max_s": max((e.usage.get("latency_max_s", 0.0) for e in episodes), default=0.0),
    }
