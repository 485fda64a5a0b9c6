"""The multi-turn rollout engine: B tasks x n samples through the env, token-exact.

    engine = RolloutEngine(policy, sandbox=sandbox, env_kwargs=dict(max_turns=4, max_pixels=128 * 128),
                           sampling=dict(temperature=1.0, max_new_tokens=256), max_total_tokens=4096)
    trajectories = engine.rollout(tasks, n=8, seed=0)      # len == len(tasks) * 8

Each turn makes one batched generation call for all live episodes. As soon as a row's turn is
complete (its stop token, while longer rows are still being generated) its env step starts on a
thread pool, so sandbox executions overlap the rest of the generation and each other (the
sandbox is one shared worker pool); the next turn's call waits for every step of this one. Sampled ids are appended
verbatim; each env reply adds only its template delta (agents.conversation). An episode ends
when the env ends it (answer, malformed turn, turn limit) or when the next env reply would not
fit in `max_total_tokens`: a reply with an image is appended whole or not at all, and the env
settles the episode as truncated (`env.truncate()`).

A rollout survives any one episode: an exception while one episode's turn is stepped or
rendered (an env bug, a template error, a sandbox failure) ends that episode only, truncated
("error"), with the error in `Trajectory.error`; the others go on. Only a systemic failure
raises, after the batch: every episode of the rollout failed, or the shared sandbox no longer
runs code.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import gymnasium as gym
from PIL import Image

import cv_env  # noqa: F401  (registers CodeVision-v0)
from agents.conversation import ChatRenderer, TokenState
from agents.generation import GenerationRequest, HFBackend, SamplingParams
from agents.trajectory import Trajectory, read_jsonl, write_jsonl
from cv_env.judge import make_judge
from cv_env.protocol import get_prompt
from cv_env.sandbox import Sandbox
from cv_env.task import Task

__all__ = ["RolloutEngine", "Trajectory", "read_jsonl", "write_jsonl"]


@dataclass
class _Episode:
    env: Any
    task: Task
    group_id: str
    sample_index: int
    state: TokenState
    index: int = 0  # position in this rollout
    action: str = ""
    turn_rewards: list[float] = field(default_factory=list)
    turn_ops: list[list[str]] = field(default_factory=list)
    num_tool_calls: int = 0
    done: bool = False
    truncation: str = ""
    error: str = ""  # what ended the episode when an exception did
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {"generate_s": 0.0, "env_s": 0.0, "render_s": 0.0})


class RolloutEngine:
    """Runs episodes of `CodeVision-v0` with a policy (or any `GenerationBackend`).

    policy_or_backend: an `agents.policy.Policy` (sampled with `HFBackend`) or a backend.
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

    def __init__(
        self,
        policy_or_backend,
        sandbox: Sandbox,
        env_kwargs: dict | None = None,
        sampling: SamplingParams | dict | None = None,
        max_total_tokens: int = 8192,
        step_workers: int | None = None,
    ):
        if hasattr(policy_or_backend, "generate") and hasattr(policy_or_backend, "update_weights"):
            self.backend = policy_or_backend
        elif hasattr(policy_or_backend, "renderer") and hasattr(policy_or_backend, "model"):
            self.backend = HFBackend(policy_or_backend)
        else:
            raise TypeError(
                f"RolloutEngine needs a Policy or a generation backend, got {type(policy_or_backend).__name__}"
            )
        if not isinstance(sandbox, Sandbox):
            raise TypeError(f"sandbox must be a shared cv_env.sandbox.Sandbox, got {type(sandbox).__name__}")
        env_kwargs = dict(env_kwargs or {})
        for key in ("tasks", "sandbox"):
            if key in env_kwargs:
                raise ValueError(f"env_kwargs must not set {key!r}: the engine passes tasks per rollout and its sandbox")
        if max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {max_total_tokens}")
        # The system turn lists the tool schemas of the envs' prompt preset (none for "compact"),
        # rendered the policy's way (its template choice and tool reply format).
        tools = list(get_prompt(env_kwargs.get("prompt", "full")).tools)
        policy = getattr(self.backend, "policy", None)
        self.renderer = (policy.renderer.with_tools(tools) if policy is not None
                         else ChatRenderer(self.backend.processor, tools=tools))
        if "system_prompt" not in env_kwargs:  # a template that opens <think> gets a prompt that does not ask for it
            env_kwargs["prompt"] = self.renderer.prompt_for(env_kwargs.get("prompt", "full"))
        judge = env_kwargs["judge"] = make_judge(env_kwargs.get("judge"))
        self.sandbox = sandbox
        self.env_kwargs = env_kwargs
        self.sampling = SamplingParams.from_dict(sampling)
        self.max_total_tokens = int(max_total_tokens)
        self.tokenizer = self.renderer.tokenizer
        self.end_of_turn_id = self.renderer.closing_ids[0]
        judge_calls = judge.config.max_concurrency if judge is not None else 0
        self._pool = ThreadPoolExecutor(max_workers=step_workers or 2 * sandbox.workers + judge_calls)
        self._envs: list = []
        self.last_timings: dict[str, float] = {}

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

    def rollout(
        self,
        tasks: Sequence[Task],
        n: int = 1,
        group_ids: Sequence[str] | None = None,
        seed: int = 0,
    ) -> list[Trajectory]:
        """Play `n` episodes of each task; trajectories come back task by task, sample by sample.

        group_ids: one id per task (default: the task id), shared by its n samples (GRPO groups).
        seed: seeds sampling (the same seed, batch and weights give the same trajectories).
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
            steps: list = []

            def on_finish(i: int, result, live=live, steps=steps) -> None:
                # A row's turn is complete: step its env now, while the batch may still be generating.
                ep = live[i]
                ep.state.append_sampled(result.token_ids, result.logprobs)
                ep.action = self._action_text(result.token_ids)
                steps.append(self._pool.submit(self._step, ep))

            self.backend.generate(
                [
                    GenerationRequest(ep.state.token_ids, ep.state.images, list(ep.state.pixel_values),
                                      ep.state.image_grid_thw, self.max_total_tokens - len(ep.state),
                                      key=f"{ep.index}", task=ep.task)
                    for ep in live
                ],
                self.sampling,
                seed=seed * 100_003 + turn,
                on_finish=on_finish,
            )
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
        self._check_systemic([ep for ep in episodes if ep.error], len(episodes))
        trajectories = [self._trajectory(ep) for ep in episodes]
        totals["total_s"] = time.perf_counter() - start
        totals["overhead_per_turn_s"] = (totals["total_s"] - totals["generate_s"]) / max(1, totals["turns"])
        self.last_timings = totals
        return trajectories

    def _start(self, tasks: list[Task], n: int, group_ids: list[str], seed: int) -> list[_Episode]:
        while len(self._envs) < len(tasks) * n:
            self._envs.append(gym.make("CodeVision-v0", tasks=[tasks[0]], sandbox=self.sandbox,
                                       disable_env_checker=True, **self.env_kwargs))

        def reset(index: int):
            env = self._envs[index]
            env.reset(seed=seed + index, options={"task": tasks[index // n]})
            # The n samples of a task share one prompt: render it once, copy the tokens.
            return self.renderer.start(env.unwrapped.messages) if index % n == 0 else None

        states = list(self._pool.map(reset, range(len(tasks) * n)))
        episodes = []
        for index, state in enumerate(states):
            task = tasks[index // n]
            state = state if state is not None else states[index - index % n].copy()
            if len(state) >= self.max_total_tokens:
                raise ValueError(
                    f"the prompt of task {task.id!r} has {len(state)} tokens, which leaves no room in "
                    f"max_total_tokens={self.max_total_tokens}: raise the budget or lower the env's max_pixels"
                )
            episodes.append(_Episode(self._envs[index], task, str(group_ids[index // n]), index % n, state,
                                     index=index))
        return episodes

    def _action_text(self, ids: list[int]) -> str:
        """The env action: the whole turn, i.e. the template's generation pre-fill (Qwen3-VL-Thinking's
        "<think>\\n") and the sampled text, without the end-of-turn token (the template adds it). The
        parser and the format reward score the turn as the model wrote it, opening included."""
        if ids and ids[-1] == self.end_of_turn_id:
            ids = ids[:-1]
        return self.renderer.prefill + self.tokenizer.decode(ids, skip_special_tokens=False)

    def _step(self, ep: _Episode) -> None:
        """One env step for one episode, then its delta (or its end); runs on the thread pool.
        An exception ends this episode, not the rollout (`_end_by_error`)."""
        try:
            self._step_episode(ep)
        except Exception as exc:  # noqa: BLE001 - whatever it was, it is this episode's end
            self._end_by_error(ep, exc)

    def _end_by_error(self, ep: _Episode, exc: Exception) -> None:
        """End an episode that raised: truncated ("error"), settled by the env when it still can."""
        ep.error = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            final_reward, ep.info = ep.env.unwrapped.truncate()
        except Exception:  # noqa: BLE001 - the env had ended it, or cannot settle it: what it paid stands
            final_reward = 0.0
        ep.info = {**ep.info, "error": ep.error}
        if len(ep.turn_rewards) < len(ep.state.turn_ends):
            ep.turn_rewards.append(0.0)  # the failed turn's own step paid nothing
        if ep.turn_rewards:
            ep.turn_rewards[-1] += float(final_reward)
        self._finish(ep, "error")

    def _check_systemic(self, failed: list[_Episode], total: int) -> None:
        """Raise when the failures of a rollout are not one episode's: all of them failed, or the
        shared sandbox no longer runs code (closed, or its processes gone)."""
        if not failed:
            return
        if len(failed) == total:
            raise RuntimeError(f"every episode of the rollout ({total}) ended by an error, so the run cannot go on; "
                               f"the first: {failed[0].error}")
        try:
            probe = self.sandbox.run("result = image", [Image.new("L", (1, 1))])
            problem = "" if probe.ok else str(probe.error)
        except Exception as exc:  # noqa: BLE001 - a closed or broken sandbox
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            raise RuntimeError(f"the shared sandbox no longer runs code ({problem}); {len(failed)} of {total} "
                               f"episodes ended by an error, the first: {failed[0].error}. Start a new Sandbox")

    def _step_episode(self, ep: _Episode) -> None:
        t0 = time.perf_counter()
        _, reward, terminated, truncated, info = ep.env.step(ep.action)
        ep.timings["env_s"] += time.perf_counter() - t0
        ep.turn_rewards.append(float(reward))
        ep.turn_ops.append(list(info.get("ops", [])))
        ep.num_tool_calls += "tool_ok" in info
        if terminated or truncated:
            ep.info = info
            self._finish(ep, "max_turns" if truncated else "")
            return
        t1 = time.perf_counter()
        messages = ep.env.unwrapped.messages
        delta = self.renderer.delta(ep.state, messages)
        closing = self.renderer.closing_for(ep.state)
        # +1: the next turn must be able to sample at least one token.
        if len(ep.state) + len(closing) + len(delta.ids) + 1 > self.max_total_tokens:
            final_reward, ep.info = ep.env.unwrapped.truncate()
            ep.turn_rewards[-1] += float(final_reward)
            self._finish(ep, "token_budget")
        else:
            self.renderer.close_turn(ep.state)
            self.renderer.append_delta(ep.state, delta, len(messages))
        ep.timings["render_s"] += time.perf_counter() - t1

    def _finish(self, ep: _Episode, truncation: str) -> None:
        ep.done, ep.truncation = True, truncation
        if len(ep.state) + len(self.renderer.closing_for(ep.state)) <= self.max_total_tokens:
            self.renderer.close_turn(ep.state)  # the sequence then ends as a full render does

    def _trajectory(self, ep: _Episode) -> Trajectory:
        state = ep.state
        token_rewards = [0.0] * len(state)
        for position, reward in zip(state.turn_ends, ep.turn_rewards):
            token_rewards[position] += reward
        components = dict(ep.info.get("reward_components", {}))
        return Trajectory(
            task_id=ep.task.id,
            group_id=ep.group_id,
            category=ep.task.category,
            token_ids=list(state.token_ids),
            loss_mask=list(state.loss_mask),
            sampler_logprobs=list(state.sampler_logprobs),
            token_rewards=token_rewards,
            turn_ends=list(state.turn_ends),
            turn_rewards=list(ep.turn_rewards),
            reward=float(sum(ep.turn_rewards)),
            reward_components=components,
            images=list(state.images),
            image_grid_thw=[list(g) for g in state.image_grid_thw],
            pixel_values=state.all_pixel_values(),
            success=bool(ep.info.get("correct", False)),
            num_turns=len(state.turn_ends),
            num_tool_calls=ep.num_tool_calls,
            truncated=bool(ep.truncation),
            truncation=ep.truncation,
            error=ep.error,
            prompt_length=state.prompt_length,
            temperature=self.sampling.logprob_temperature,
            sample_index=ep.sample_index,
            answer=ep.info.get("answer"),
            used_ops=list(ep.info.get("used_ops", [])),
            num_failed_calls=int(ep.info.get("n_failed", 0)),
            turn_ops=list(ep.turn_ops),
            timings=dict(ep.timings),
            judge=dict(ep.info.get("judge", {})),
        )
