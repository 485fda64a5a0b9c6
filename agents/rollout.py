"""The episode loop: B tasks x n samples through `CodeVision-v0`, driven only through the Gym API.

    engine = RolloutEngine(policy, sandbox=sandbox, env_kwargs=dict(max_turns=4, max_pixels=128 * 128),
                           sampling=dict(temperature=1.0, max_new_tokens=256), max_total_tokens=4096)
    trajectories = engine.rollout(tasks, n=8, seed=0)      # len == len(tasks) * 8, task by task
    engine = RolloutEngine(ScriptedAgents(OracleAgent), sandbox=sandbox)   # scripted agents: no tokens

The conversation is built from what `reset` and `step` return (the observations, and reset's
`system_prompt`), never read from inside the env; an episode the engine must stop (the token
budget, an error) ends with the public action `cv_env.EndEpisode(reason)`. Two kinds of policy
run through the same loop:

* a token backend (`agents.generation`: HF, vLLM, `ScriptedBackend`): prompts are token ids.
  Each turn makes one batched generation call for all live episodes; as soon as a row's turn is
  complete its env step starts on a thread pool, so sandbox executions overlap the rest of the
  generation and each other. Sampled ids are appended verbatim; each env reply adds only its
  template delta (`agents.conversation`). An episode also ends when the next reply would not
  fit in `max_total_tokens` (a reply with an image is appended whole or not at all).
* a chat backend (`agents.scripted.ScriptedAgents`, `agents.openai_backend.OpenAIBackend` for
  an OpenAI-compatible server): each turn makes one `respond(requests, sampling, seed,
  on_finish)` call with a `ChatRequest` per live episode (the conversation as chat messages)
  and steps each episode as soon as `on_finish(i, reply)` reports its reply. A reply is the
  turn (a str, or a dict action), or an `Exception` instance: the backend could not answer
  that request (after its own retries), so that episode ends there, unanswered, with no turn
  made up for the model (truncated "error", the exception in `Trajectory.error`). An exception
  that `respond` raises (a refusal of the run's settings) stops the rollout. Its trajectories
  have no token ids; what the backend counted per episode (`ChatRequest.usage`) becomes
  `Trajectory.usage`.

A rollout survives any one episode: an exception while one episode's turn is stepped or
rendered, or a request the backend could not answer, ends that episode only, truncated
("error"), with the error in `Trajectory.error`; the others go on. Only a systemic failure
raises, after the batch: every episode of the rollout failed (`EpisodesFailed`; `Unanswered`
when every one ended without an answer from the backend), or the shared sandbox no longer
runs code.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import gymnasium as gym
import numpy as np
from PIL import Image

import cv_env  # noqa: F401  (registers CodeVision-v0)
from agents.trajectory import Trajectory, Turn
from cv_env.judge import make_judge
from cv_env.protocol import TOOL_NAME, EndEpisode, action_text, assistant_message, get_prompt
from cv_env.sandbox import Sandbox
from cv_env.task import Task

__all__ = ["RolloutEngine", "ChatRequest", "ChatReply", "EpisodesFailed", "Unanswered", "observation_message",
           "play"]


@dataclass(frozen=True)
class ChatRequest:
    """One episode's next turn, for a chat backend.

    messages: the conversation so far in chat format (system, user, assistant, tool; images as
    PIL), built from the env's observations. tools: the function schemas of the env's prompt
    preset. observation: the newest observation as the env returned it. key / task: which
    episode asks (a model ignores them; scripted agents play the task).
    state: the backend's own notes on this episode (e.g. its wire conversation): empty at the
    episode's first request, the same dict at every later one; the engine never reads it.
    usage: figures the backend counts for this episode (requests, tokens, ...): the same dict
    at every request, kept as the episode's `Trajectory.usage`.
    """

    messages: list[dict]
    tools: list[dict]
    observation: dict
    key: str
    task: Task
    state: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)


# What a chat backend answers to one request: the turn (a str, or a dict action), or the
# exception that kept it from answering (the episode ends unanswered; the others go on).
ChatReply = Union[str, dict, Exception]


class EpisodesFailed(RuntimeError):
    """Every episode of a rollout ended by an error, so a run cannot go on.

    trajectories: the rollout's episodes as they ended, each with its error (a caller that
    played a single item, e.g. `agents.harness`, reports it as that item's outcome).
    """

    def __init__(self, message: str, trajectories: Sequence[Trajectory] = ()):
        super().__init__(message)
        self.trajectories = list(trajectories)


class Unanswered(EpisodesFailed):
    """Every episode of a rollout ended because the chat backend could not answer its request."""


def observation_message(observation: dict) -> dict:
    """The chat message of an env observation: its role, images (as PIL) and text."""
    content: list[dict] = [{"type": "image", "image": Image.fromarray(np.asarray(image))}
                           for image in observation["images"]]
    content.append({"type": "text", "text": observation["text"]})
    message = {"role": observation["role"], "content": content}
    if observation["role"] == "tool":
        message["name"] = TOOL_NAME
    return message


@dataclass
class _Episode:
    """The running state of one episode (private to the loop)."""

    env: Any
    task: Task
    group_id: str
    sample_index: int
    index: int  # position in this rollout
    observation: dict
    messages: list[dict]
    tools: list[dict]
    state: Any = None  # agents.conversation.TokenState, for a token backend
    backend_state: dict = field(default_factory=dict)  # ChatRequest.state, for a chat backend
    usage: dict = field(default_factory=dict)  # ChatRequest.usage
    turns: list[dict] = field(default_factory=list)  # Turn fields as the steps found them
    done: bool = False
    truncation: str = ""
    error: str = ""
    unanswered: bool = False  # the chat backend could not answer its request
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {"generate_s": 0.0, "env_s": 0.0, "render_s": 0.0})


class RolloutEngine:
    """Runs episodes of `CodeVision-v0` with a policy, a token backend or a chat backend.

    policy_or_backend: an `agents.policy.Policy` (sampled with `HFBackend`), a token backend
        (`generate` + `update_weights`), or a chat backend (`respond`, see the module docstring).
    sandbox: the shared `cv_env.sandbox.Sandbox` every env of the engine uses.
    env_kwargs: keyword arguments of the env (max_turns, max_pixels, reward, ...), not `tasks`.
        A `judge` config becomes one `cv_env.judge.LLMJudge` that all the engine's envs share.
    sampling: a `SamplingParams` or dict (temperature, top_p, top_k, max_new_tokens).
    max_total_tokens: the budget of one episode's whole token sequence (prompt included).
    step_workers: threads that step envs concurrently (default: 2 per sandbox worker, plus the
        judge's `max_concurrency`, so judge calls wait on the judge and not on a free thread).

    After each rollout `last_timings` holds generate_s (the generate calls, with the env steps
    that overlapped them), step_s (waiting for env steps after them), turns, env_steps, total_s
    and overhead_per_turn_s ((total - generate) / turns).
    """

    def __init__(self, policy_or_backend, sandbox: Sandbox, env_kwargs: dict | None = None,
                 sampling: Any = None, max_total_tokens: int = 8192, step_workers: int | None = None):
        if not isinstance(sandbox, Sandbox):
            raise TypeError(f"sandbox must be a shared cv_env.sandbox.Sandbox, got {type(sandbox).__name__}")
        env_kwargs = dict(env_kwargs or {})
        for key in ("tasks", "sandbox"):
            if key in env_kwargs:
                raise ValueError(f"env_kwargs must not set {key!r}: the engine passes tasks per rollout and its sandbox")
        if max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {max_total_tokens}")
        self.chat = hasattr(policy_or_backend, "respond")
        self.renderer = None
        if self.chat:
            self.backend = policy_or_backend
            self.sampling = sampling
        else:
            self._init_tokens(policy_or_backend, env_kwargs, sampling)
        judge = env_kwargs["judge"] = make_judge(env_kwargs.get("judge"))
        self.sandbox = sandbox
        self.env_kwargs = env_kwargs
        self.max_total_tokens = int(max_total_tokens)
        judge_calls = judge.config.max_concurrency if judge is not None else 0
        self._pool = ThreadPoolExecutor(max_workers=step_workers or 2 * sandbox.workers + judge_calls)
        self._envs: list = []
        self.last_timings: dict[str, float] = {}

    def _init_tokens(self, policy_or_backend, env_kwargs: dict, sampling: Any) -> None:
        from agents.conversation import ChatRenderer
        from agents.generation import HFBackend, SamplingParams

        if hasattr(policy_or_backend, "generate") and hasattr(policy_or_backend, "update_weights"):
            self.backend = policy_or_backend
        elif hasattr(policy_or_backend, "renderer") and hasattr(policy_or_backend, "model"):
            self.backend = HFBackend(policy_or_backend)
        else:
            raise TypeError(f"RolloutEngine needs a Policy or a generation backend (or a chat backend: respond), "
                            f"got {type(policy_or_backend).__name__}")
        # The system turn lists the tool schemas of the envs' prompt preset (none for "compact"),
        # rendered the policy's way (its template choice and tool reply format).
        tools = list(get_prompt(env_kwargs.get("prompt", "full")).tools)
        policy = getattr(self.backend, "policy", None)
        self.renderer = (policy.renderer.with_tools(tools) if policy is not None
                         else ChatRenderer(self.backend.processor, tools=tools))
        if "system_prompt" not in env_kwargs:  # a template that opens <think> gets a prompt that does not ask for it
            env_kwargs["prompt"] = self.renderer.prompt_for(env_kwargs.get("prompt", "full"))
        self.sampling = SamplingParams.from_dict(sampling)
        self.tokenizer = self.renderer.tokenizer
        self.end_of_turn_id = self.renderer.closing_ids[0]

    def close(self) -> None:
        """Close the engine's envs and threads (the shared sandbox stays open)."""
        for env in self._envs:
            env.close()
        self._envs = []
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update_weights(self, model) -> None:
        """Pass the trainer's new weights to the generator (a no-op for the HF backend)."""
        self.backend.update_weights(model)

    # -- the loop -------------------------------------------------------------------------------

    def rollout(self, tasks: Sequence[Task], n: int = 1, group_ids: Sequence[str] | None = None,
                seed: int = 0) -> list[Trajectory]:
        """Play `n` episodes of each task; trajectories come back task by task, sample by sample.

        group_ids: one id per task (default: the task id), shared by its n samples (GRPO groups).
        seed: seeds sampling (the same seed, batch and weights give the same trajectories).
        Raises `EpisodesFailed` (`Unanswered`) when every episode ended by an error (without an
        answer from the chat backend), and RuntimeError when the shared sandbox broke.
        """
        tasks = list(tasks)
        if not tasks:
            raise ValueError("rollout needs at least one task")
        if n < 1:
            raise ValueError(f"n must be >= 1 (samples per task), got {n}")
        if group_ids is None:
            group_ids = [task.id for task in tasks]
        if len(group_ids) != len(tasks):
            raise ValueError(f"got {len(group_ids)} group_ids for {len(tasks)} tasks: give one per task")
        start = time.perf_counter()
        totals = {"generate_s": 0.0, "step_s": 0.0, "turns": 0, "env_steps": 0}
        if hasattr(self.backend, "reset"):
            self.backend.reset()  # per-episode backend state (scripted agents) starts afresh
        episodes = self._start(tasks, n, list(group_ids), seed)
        turn = 0
        while live := [ep for ep in episodes if not ep.done]:
            t0 = time.perf_counter()
            steps: list = []  # the env steps of this turn, on the pool
            try:
                self._act(live, seed * 100_003 + turn, steps)
            except BaseException:
                wait(steps)  # no env is left stepping when the backend raised (a refused request)
                raise
            generate_s = time.perf_counter() - t0
            if len(steps) != len(live):
                raise RuntimeError(f"the backend reported {len(steps)} finished turns for {len(live)} requests: "
                                   "a backend must call on_finish exactly once per request")
            t1 = time.perf_counter()
            for step in steps:
                step.result()  # an episode's own error ended that episode (_step); this is the rest
            for ep in live:
                ep.timings["generate_s"] += generate_s
            totals["step_s"] += time.perf_counter() - t1
            totals["generate_s"] += generate_s
            totals["turns"] += 1
            totals["env_steps"] += len(live)
            turn += 1
        trajectories = [self._trajectory(ep) for ep in episodes]
        self._check_systemic(episodes, trajectories)
        totals["total_s"] = time.perf_counter() - start
        totals["overhead_per_turn_s"] = (totals["total_s"] - totals["generate_s"]) / max(1, totals["turns"])
        self.last_timings = totals
        return trajectories

    def _act(self, live: list[_Episode], seed: int, steps: list) -> None:
        """One turn of every live episode: the policy's actions, each stepped on the pool as soon
        as it is known (its future appended to `steps`)."""
        if self.chat:
            def on_reply(i: int, reply: ChatReply) -> None:
                # A row's reply is known: step its env (or end it, unanswered) while the others are asked.
                work = self._unanswered if isinstance(reply, Exception) else self._step
                steps.append(self._pool.submit(work, live[i], reply))

            self.backend.respond([ChatRequest(list(ep.messages), ep.tools, ep.observation, str(ep.index), ep.task,
                                              ep.backend_state, ep.usage) for ep in live],
                                 self.sampling, seed=seed, on_finish=on_reply)
            return
        from agents.generation import GenerationRequest

        def on_finish(i: int, result) -> None:
            # A row's turn is complete: step its env now, while the batch may still be generating.
            ep = live[i]
            ep.state.append_sampled(result.token_ids, result.logprobs)
            steps.append(self._pool.submit(self._step, ep, self._action_text(result.token_ids)))

        self.backend.generate(
            [GenerationRequest(ep.state.token_ids, ep.state.images, list(ep.state.pixel_values),
                               ep.state.image_grid_thw, self.max_total_tokens - len(ep.state),
                               key=f"{ep.index}", task=ep.task) for ep in live],
            self.sampling, seed=seed, on_finish=on_finish)

    def _start(self, tasks: list[Task], n: int, group_ids: list[str], seed: int) -> list[_Episode]:
        while len(self._envs) < len(tasks) * n:
            self._envs.append(gym.make("CodeVision-v0", tasks=[tasks[0]], sandbox=self.sandbox,
                                       disable_env_checker=True, **self.env_kwargs))

        def reset(index: int) -> _Episode:
            task = tasks[index // n]
            obs, info = self._envs[index].reset(seed=seed + index, options={"task": task})
            messages = [{"role": "system", "content": [{"type": "text", "text": info["system_prompt"]}]},
                        observation_message(obs)]
            ep = _Episode(self._envs[index], task, str(group_ids[index // n]), index % n, index, obs, messages,
                          info["tools"])
            # The n samples of a task share one prompt: render it once, copy the tokens.
            if self.renderer is not None and index % n == 0:
                ep.state = self.renderer.start(messages)
            return ep

        episodes = list(self._pool.map(reset, range(len(tasks) * n)))
        if self.renderer is not None:
            for index, ep in enumerate(episodes):
                if ep.state is None:
                    first = episodes[index - index % n]
                    ep.state, ep.messages = first.state.copy(), [first.messages[0], first.messages[1]]
                if len(ep.state) >= self.max_total_tokens:
                    raise ValueError(
                        f"the prompt of task {ep.task.id!r} has {len(ep.state)} tokens, which leaves no room in "
                        f"max_total_tokens={self.max_total_tokens}: raise the budget or lower the env's max_pixels")
        return episodes

    def _action_text(self, ids: list[int]) -> str:
        """The env action: the whole turn, i.e. the template's generation pre-fill (Qwen3-VL-Thinking's
        "<think>\\n") and the sampled text, without the end-of-turn token (the template adds it). The
        parser and the format reward score the turn as the model wrote it, opening included."""
        if ids and ids[-1] == self.end_of_turn_id:
            ids = ids[:-1]
        return self.renderer.prefill + self.tokenizer.decode(ids, skip_special_tokens=False)

    def _step(self, ep: _Episode, action: str | dict) -> None:
        """One env step for one episode, then its reply's tokens (or its end); runs on the thread
        pool. An exception ends this episode, not the rollout (`_end_by_error`)."""
        turns = len(ep.turns)
        try:
            self._step_episode(ep, action)
        except Exception as exc:  # noqa: BLE001 - whatever it was, it is this episode's end
            if len(ep.turns) == turns:  # the step itself failed: the turn paid nothing
                ep.turns.append({"action": action_text(action), "reward": 0.0})
            self._end_by_error(ep, exc)

    def _step_episode(self, ep: _Episode, action: str | dict) -> None:
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = ep.env.step(action)
        ep.timings["env_s"] += time.perf_counter() - t0
        ep.messages.append(assistant_message(action))
        turn = {"action": action_text(action), "reward": float(reward),
                "tool_ok": info.get("tool_ok"), "ops": tuple(info.get("ops", ()))}
        ep.turns.append(turn)
        if terminated or truncated:
            ep.info = info
            self._finish(ep, info.get("truncation", "max_turns") if truncated else "")
            return
        ep.observation = obs
        reply = observation_message(obs)
        turn.update(reply_text=obs["text"], reply_images=tuple(part["image"] for part in reply["content"]
                                                                if part["type"] == "image"))
        ep.messages.append(reply)
        if self.renderer is None:  # a chat model sees every reply
            turn["reply_shown"] = True
            return
        t1 = time.perf_counter()
        delta = self.renderer.delta(ep.state, ep.messages)
        closing = self.renderer.closing_for(ep.state)
        # +1: the next turn must be able to sample at least one token.
        if len(ep.state) + len(closing) + len(delta.ids) + 1 > self.max_total_tokens:
            self._end(ep, "token_budget")
        else:
            self.renderer.close_turn(ep.state)
            self.renderer.append_delta(ep.state, delta, len(ep.messages))
            turn["reply_shown"] = True
        ep.timings["render_s"] += time.perf_counter() - t1

    def _unanswered(self, ep: _Episode, failure: Exception) -> None:
        """End an episode whose request the chat backend could not answer: no turn is made up."""
        ep.unanswered = True
        self._end_by_error(ep, failure)

    def _end(self, ep: _Episode, reason: str) -> None:
        """End a running episode through the env (`EndEpisode`); its settlement goes to the last
        turn (an episode without a turn has earned nothing to settle)."""
        _, reward, _, _, ep.info = ep.env.step(EndEpisode(reason))
        if ep.turns:
            ep.turns[-1]["reward"] += float(reward)
        self._finish(ep, reason)

    def _end_by_error(self, ep: _Episode, exc: Exception) -> None:
        """End an episode that raised: truncated ("error"), settled by the env when it still can."""
        ep.error = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            self._end(ep, "error")
        except Exception:  # noqa: BLE001 - the env had ended it, or cannot settle it: what it paid stands
            self._finish(ep, "error")
        ep.info = {**ep.info, "error": ep.error}

    def _finish(self, ep: _Episode, truncation: str) -> None:
        ep.done, ep.truncation = True, truncation
        if self.renderer is not None and ep.state.turn_open:
            if len(ep.state) + len(self.renderer.closing_for(ep.state)) <= self.max_total_tokens:
                self.renderer.close_turn(ep.state)  # the sequence then ends as a full render does

    def _check_systemic(self, episodes: list[_Episode], trajectories: list[Trajectory]) -> None:
        """Raise when the failures of a rollout are not one episode's: all of them failed (all
        unanswered: `Unanswered`), or the shared sandbox no longer runs code (closed, or its
        processes gone)."""
        failed, total = [ep for ep in episodes if ep.error], len(episodes)
        if len(failed) == total:
            if all(ep.unanswered for ep in failed):
                raise Unanswered(f"every episode of the rollout ({total}) ended without an answer from the backend, "
                                 f"so the run cannot go on; the first: {failed[0].error}", trajectories)
            raise EpisodesFailed(f"every episode of the rollout ({total}) ended by an error, so the run cannot go on; "
                                 f"the first: {failed[0].error}", trajectories)
        failed = [ep for ep in failed if not ep.unanswered]  # a backend's failure says nothing of the sandbox
        if not failed:
            return
        try:
            probe = self.sandbox.run("result = image", [Image.new("L", (1, 1))])
            problem = "" if probe.ok else str(probe.error)
        except Exception as exc:  # noqa: BLE001 - a closed or broken sandbox
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            raise RuntimeError(f"the shared sandbox no longer runs code ({problem}); {len(failed)} of {total} "
                               f"episodes ended by an error, the first: {failed[0].error}. Start a new Sandbox")

    def _trajectory(self, ep: _Episode) -> Trajectory:
        state, info = ep.state, ep.info
        prompt = ep.messages[1]
        if state is None:
            turns = [Turn(**fields) for fields in ep.turns]
        else:
            prompt_ids, spans = state.turns()
            turns = [Turn(**fields, sampled_ids=sampled, logprobs=logprobs, context_ids=context)
                     for fields, (sampled, logprobs, context) in zip(ep.turns, spans)]
        return Trajectory(
            task_id=ep.task.id, group_id=ep.group_id, category=ep.task.category, sample_index=ep.sample_index,
            prompt_text=prompt["content"][-1]["text"],
            prompt_images=tuple(part["image"] for part in prompt["content"] if part["type"] == "image"),
            turns=tuple(turns), success=bool(info.get("correct", False)), answer=info.get("answer"),
            reward_components=dict(info.get("reward_components", {})), used_ops=tuple(info.get("used_ops", ())),
            num_tool_calls=int(info.get("n_calls", sum(turn.tool_ok is not None for turn in turns))),
            num_failed_calls=int(info.get("n_failed", 0)), truncation=ep.truncation, error=ep.error,
            judge=dict(info.get("judge", {})),
            prompt_ids=prompt_ids if state is not None else (),
            image_grid_thw=[list(g) for g in state.image_grid_thw] if state is not None else [],
            pixel_values=state.all_pixel_values() if state is not None else None,
            temperature=self.sampling.logprob_temperature if state is not None else 1.0,
            timings=dict(ep.timings), usage=dict(ep.usage),
        )


def play(agent_factory, tasks: Sequence[Task], sandbox: Sandbox, n: int = 1, seed: int = 0,
         **env_kwargs) -> list[Trajectory]:
    """Scripted agents through the loop: `agent_factory(index)` plays the rollout's episode `index`
    (task i's sample s is i * n + s). env_kwargs: the env's (max_turns, reward, ...).

        (trajectory,) = play(lambda index: OracleAgent(), [task], sandbox, max_turns=4)
    """
    from agents.scripted import ScriptedAgents

    with RolloutEngine(ScriptedAgents(agent_factory), sandbox=sandbox, env_kwargs=env_kwargs) as engine:
        return engine.rollout(tasks, n=n, seed=seed)
