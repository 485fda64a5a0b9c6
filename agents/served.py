"""A served model through the CodeVision tool loop: many episodes, and their endpoint figures.

    backend = OpenAIBackend(OpenAIConfig(url="http://127.0.0.1:8000/v1", model="my-vlm"))
    transcripts = run_served(backend, tasks, env_kwargs={"max_turns": 12}, sandbox=sandbox)
    transcripts[0]                      # agents.transcript.Transcript: what algos.evaluate reports
    chat_messages(transcripts[0].trajectory)   # agents.chat_records: the conversation, for SFT (agents.collect)
    transcripts[0].usage                # requests, attempts, unanswered, prompt/completion tokens, latency
    usage_metrics(transcripts)          # the served/* figures of the run

The episodes run through the one episode loop, `agents.rollout.RolloutEngine`, with the
`OpenAIBackend` as its chat backend: driven only through the Gym API, `max_concurrency` requests
in flight, each episode's env step starting as soon as its reply arrives.

Nothing the server does stops a run: a request that fails after its retries (or a reply that is
no chat completion) ends that episode, unanswered, with `error` set, and the others go on. An
exception inside the env's step (a bug: a model's mistakes are observations) ends its episode
likewise. Only a refusal of the run's settings (`EndpointConfigError`: 401/403/404, no tool
parser) or a batch in which every episode failed raises (`EndpointDown` when none was answered).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from agents.openai_backend import EndpointDown, OpenAIBackend
from agents.rollout import RolloutEngine, Unanswered
from agents.transcript import Transcript
from cv_env.sandbox import Sandbox
from cv_env.task import Task

__all__ = ["run_served", "usage_metrics"]


def run_served(backend: OpenAIBackend, tasks: Sequence[Task], env_kwargs: dict[str, Any], sandbox: Sandbox,
               samples: int = 1, seed: int = 0, name: str | None = None, batch: int | None = None,
               on_episode: Callable[[Transcript], None] | None = None) -> list[Transcript]:
    """Play `samples` episodes of every task with the served model; return their transcripts
    (agent: `name`, default the backend's), task by task, sample by sample.

    env_kwargs: the env's keyword arguments besides tasks and sandbox (max_turns, max_pixels,
    prompt, reward, judge, ...); one judge is shared by every env. batch: episodes played
    together in one engine rollout (default 8 x `max_concurrency`: enough that requests stay in
    flight while some episodes step; the next batch starts when the longest episode of this one
    ends). `on_episode` (e.g. a progress bar) sees each transcript as its batch finishes.
    Raises `EndpointConfigError` at the first refusal of the settings, `EndpointDown` when every
    episode of a batch ended unanswered (the endpoint is down or refuses every request), and
    `agents.rollout.EpisodesFailed` when every episode of a batch ended by an error.
    """
    if not tasks:
        raise ValueError("run_served needs at least one task")
    name = name or backend.name
    chunk = max(1, (batch or 8 * backend.config.max_concurrency) // samples)
    transcripts: list[Transcript] = []
    with RolloutEngine(backend, sandbox=sandbox, env_kwargs=env_kwargs) as engine:
        for start in range(0, len(tasks), chunk):
            part = list(tasks[start:start + chunk])
            try:
                trajectories = engine.rollout(part, n=samples, seed=seed + start * samples)
            except Unanswered as down:
                raise EndpointDown(
                    f"every episode ({len(down.trajectories)}) ended without an answer from the endpoint, so there is "
                    f"nothing to report; the first: {down.trajectories[0].error}. Check that the server is up and "
                    "answers a chat completion for this model (or raise served.timeout_s for a slow one)",
                    down.trajectories) from None
            for i, trajectory in enumerate(trajectories):
                transcripts.append(Transcript.of(trajectory, part[i // samples], name))
                if on_episode is not None:
                    on_episode(transcripts[-1])
    return transcripts


def usage_metrics(episodes: Sequence[Any]) -> dict[str, float]:
    """served/* figures of a run's episodes (trajectories or transcripts of `run_served`): requests
    and retries, episodes an error ended (of which the endpoint left unanswered), prompt and
    completion tokens per episode, and request latency (mean over answered requests, and max, s)."""
    n = max(1, len(episodes))

    def total(key: str) -> float:
        return float(sum(e.usage.get(key, 0.0) for e in episodes))

    requests, unanswered = total("requests"), total("unanswered")
    answered = requests - unanswered  # an unanswered episode's last request failed
    return {
        "served/requests": requests,
        "served/retries": total("attempts") - requests,
        "served/episode_errors": float(sum(bool(e.error) for e in episodes)),
        "served/unanswered": unanswered,
        "served/prompt_tokens_per_episode": total("prompt_tokens") / n,
        "served/completion_tokens_per_episode": total("completion_tokens") / n,
        "served/latency_s": total("latency_s") / answered if answered else 0.0,
        "served/latency_max_s": max((e.usage.get("latency_max_s", 0.0) for e in episodes), default=0.0),
    }
