"""`CodeVisionEnv`: one episode is a task; one step is one model turn.

    import gymnasium as gym, cv_env
    env = gym.make("CodeVision-v0", tasks="synthetic", max_turns=12)
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(model_turn)

See DESIGN.md ("The environment contract") for the whole contract. In short: an action is the
model's turn (a string, or a dict from a programmatic agent); a tool call runs in the sandbox
and its output image becomes a new image of the episode; `<answer>` ends the episode.
Each step pays its immediate process reward (a failed call is penalised when it happens); the
final step pays the rest, so an episode's rewards sum to its shaped total, and
`info["reward_components"]` names every term at the end.

A model's mistake is an observation, never an exception: whatever str or dict `step` gets, it
returns an observation inside `observation_space` that says what was wrong and a finite
reward. Only misuse raises: `step` before `reset` or after the episode ended, an action that
is neither a str nor a dict, a closed env (and a failure that is nobody's turn: a shared
sandbox closed under the env). What each kind of turn becomes:

* a turn longer than `max_action_chars`: refused before it is read; the observation says so;
  it counts as a failed call (the per-call penalty applies) and the episode goes on;
* a tool call that cannot be read (bad JSON, no code, a bad image_index, a dict with neither
  `code` nor `answer`) or whose code fails: an "Error: ..." observation, a failed call;
* a tool call whose code runs but assigns no `result`: a successful call (the code did what
  it was asked; it is not penalised as failed) that adds no image; its observation is the
  printed output, or "No image was produced: assign the output image to `result`." when it
  printed nothing. Like every call it counts towards `usage_cost`;
* a turn with neither a tool call nor an answer: the episode ends, the answer taken from the
  text by fallback rules, the format term 0.

An agent ends an episode early for its own reasons (a token budget) with the action
`cv_env.EndEpisode(reason)`: the episode is settled as the turn limit settles it and comes back
truncated, `info["truncation"] == reason`.

`reset`'s info carries what a chat agent needs to open the conversation besides the observation:
`system_prompt` and `tools` (the prompt preset's function schemas for the chat template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from PIL import Image

from cv_env import release_rules
from cv_env.answers import check_answer, extract_answer
from cv_env.frames import Frame
from cv_env.judge import LLMJudge, make_judge
from cv_env.protocol import TOOL_NAME, EndEpisode, Turn, action_text, assistant_message, get_prompt, parse_action
from cv_env.reward import EpisodeOutcome, RewardConfig, episode_components, step_components
from cv_env.sandbox import Sandbox
from cv_env.shown import shown_copy, shown_task_copy
from cv_env.spaces import observation_space, sanitize_text, text_space
from cv_env.task import Task
from cv_env.tasks import TaskSource, load_tasks

MAX_STDOUT_CHARS = 2000  # printed output shown to the model per call (a longer one is cut, marked)
NO_IMAGE = "No image was produced: assign the output image to `result`."


@dataclass
class _EpisodeImage:
    """An image of the episode: full resolution, and where its pixels come from."""

    image: Image.Image
    root: int | None  # the input image its pixels map to (None: not traceable)
    frame: Frame | None  # this image's pixels -> the root input's pixels


@dataclass
class _Episode:
    task: Task
    images: list[_EpisodeImage]
    assistant_turns: list[str] = field(default_factory=list)
    used_ops: set[str] = field(default_factory=set)
    crop_boxes: list[list[float]] = field(default_factory=list)  # in the bbox's frame (image 0)
    source_crop_boxes: list[list[float]] = field(default_factory=list)  # in the image each was cut from
    n_calls: int = 0
    n_failed: int = 0
    paid: float = 0.0  # rewards already paid by earlier steps
    done: bool = False


def _printed(text: str) -> str:
    """The printed output shown to the model: at most MAX_STDOUT_CHARS, a cut marked as such."""
    if len(text) > MAX_STDOUT_CHARS:
        cut = len(text) - MAX_STDOUT_CHARS
        text = text[:MAX_STDOUT_CHARS] + f"\n…[printed output cut here: {cut:,} more characters not shown]"
    return text


def _action_chars(action: str | dict) -> int:
    """The length of an action's text: the string, or the string values of a dict action."""
    if isinstance(action, str):
        return len(action)
    return sum(len(value) for value in action.values() if isinstance(value, str))


class CodeVisionEnv(gym.Env):
    """Answer a question about image(s), optionally by running image-processing code.

    Args:
        tasks: "synthetic" (the built-in suite), a category name, a parquet path, a
            `TaskSource`, or a list of `Task`.
        split: which split of a generated suite ("train", "validation", "test").
        task_options: options of the task loader (`cv_env.tasks.load_tasks`), e.g.
            `{"crop_from_bbox": True, "answer_field": "extra_info.answer"}` for parquet files.
        max_turns: assistant turns before the episode is truncated.
        reward: a `RewardConfig`, a preset name ("codevision", "codevision_release"), or a dict
            of weights (unknown keys are an error).
        sandbox: a config dict for a private `Sandbox` (`workers`, `timeout_s`, `memory_mb`),
            or a shared `Sandbox` instance (many envs, one worker pool; not closed by the env).
        max_pixels: the largest image the model is shown; larger ones are downscaled copies
            (code always runs on full resolution and the observation states the true size).
        max_images_per_observation: bound of the observation space's image list.
        max_text_chars: bound of the observation's text.
        max_action_chars: the longest turn `step` reads; a longer one is refused before any
            parsing, with an observation saying so (it counts as a failed call).
        prompt: the prompt preset (`cv_env.protocol.PROMPTS`): "full" (the instructions plus the
            tool schema the chat template lists; the default) or "compact" (~5x fewer tokens).
            `tools` holds the preset's schemas for the renderer of the conversation.
        system_prompt: replaces the preset's system message (default: the preset's).
        judge: an LLM judge for answers the rules reject: a `cv_env.judge` config dict, or one
            shared `cv_env.judge.LLMJudge` for many envs (one cache, one concurrency limit). When
            it is asked, the final `info["judge"]` holds its ruling: correct (None: undecided, the
            rule verdict stands), rule, source, latency_s.
        render_mode: None or "ansi" (the conversation as text).
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        tasks: str | TaskSource | list[Task] = "synthetic",
        split: str = "train",
        max_turns: int = 12,
        reward: RewardConfig | str | dict | None = None,
        sandbox: Sandbox | dict | None = None,
        max_pixels: int = 1024 * 28 * 28,
        max_images_per_observation: int = 8,
        max_text_chars: int = 8192,
        max_action_chars: int = 65536,
        prompt: str = "full",
        system_prompt: str | None = None,
        judge: LLMJudge | dict | None = None,
        render_mode: str | None = None,
        task_options: dict | None = None,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if max_action_chars < 1:
            raise ValueError(f"max_action_chars must be >= 1, got {max_action_chars}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.tasks = load_tasks(tasks, split=split, **(task_options or {}))
        if len(self.tasks) == 0:
            raise ValueError("the task source is empty: give the environment at least one task")
        self.max_turns = int(max_turns)
        self.reward_config = _reward_config(reward)
        if isinstance(sandbox, Sandbox):
            self.sandbox, self._owns_sandbox = sandbox, False
        else:
            self.sandbox, self._owns_sandbox = Sandbox(**(sandbox or {})), True
        self.max_pixels = int(max_pixels)
        self.max_text_chars = int(max_text_chars)
        preset = get_prompt(prompt)
        self.prompt = prompt
        self.system_prompt = preset.system if system_prompt is None else str(system_prompt)
        self.tools = [dict(tool) for tool in preset.tools]
        self.judge = make_judge(judge)
        self.render_mode = render_mode
        self.observation_space = observation_space(max_images_per_observation, self.max_pixels, self.max_text_chars)
        self.max_action_chars = int(max_action_chars)
        self.action_space = text_space(self.max_action_chars)
        self.messages: list[dict[str, Any]] = []
        self._episode: _Episode | None = None
        self._closed = False

    # -- public views ---------------------------------------------------------------------------

    @property
    def task(self) -> Task:
        """The current episode's task (includes the hidden answer: for trainers, not agents)."""
        if self._episode is None:
            raise RuntimeError("no episode yet: call reset() first")
        return self._episode.task

    @property
    def images(self) -> list[Image.Image]:
        """All images of the episode at full resolution (inputs, then tool outputs)."""
        return [] if self._episode is None else [item.image for item in self._episode.images]

    def outcome(self, correct: bool = False) -> EpisodeOutcome:
        """The current episode as the reward sees it (turns, verified ops, crop boxes in the frame
        the reward config scores them in, calls), with `correct` as the answer's verdict: what
        `episode_components` scores.

        For a reward computed elsewhere than in this env (e.g. a trainer's reward function in
        another process, given the record of the tool calls this env ran)."""
        episode = self._episode
        if episode is None:
            raise RuntimeError("no episode yet: call reset() first")
        return EpisodeOutcome(
            assistant_turns=list(episode.assistant_turns),
            correct=bool(correct),
            required_ops=episode.task.required_ops,
            used_ops=set(episode.used_ops),
            crop_boxes=list(episode.source_crop_boxes if self.reward_config.crop_frame == "source"
                            else episode.crop_boxes),
            bbox=episode.task.bbox,
            n_calls=episode.n_calls,
            n_failed=episode.n_failed,
        )

    # -- gym API --------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode. `options` may hold `{"task": Task}` or `{"index": i}` to pick one."""
        if self._closed:
            raise RuntimeError("reset() on a closed env: create a new one")
        super().reset(seed=seed)
        options = options or {}
        if "task" in options:
            task = options["task"]
            if not isinstance(task, Task):
                raise TypeError(f"options['task'] must be a cv_env.Task, got {type(task).__name__}")
        elif "index" in options:
            task = self.tasks[int(options["index"]) % len(self.tasks)]
        else:
            task = self.tasks.sample(self.np_random)
        if len(task.images) > self.observation_space["images"].max_images:
            raise ValueError(
                f"task {task.id!r} has {len(task.images)} images but max_images_per_observation is "
                f"{self.observation_space['images'].max_images}: raise it in the env config"
            )
        images = [_EpisodeImage(img, i, Frame.identity(img.size)) for i, img in enumerate(task.images)]
        self._episode = _Episode(task=task, images=images)
        shown = [shown_task_copy(img, self.max_pixels) for img in task.images]
        sizes = "\n".join(
            f"Image {i}: {img.width}x{img.height} pixels"
            + (f" (shown at {s.width}x{s.height})" if s.size != img.size else "")
            for i, (img, s) in enumerate(zip(task.images, shown))
        )
        text = sanitize_text(f"{task.question}\n\n{sizes}", self.max_text_chars)
        self.messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [{"type": "image", "image": s} for s in shown] + [{"type": "text", "text": text}]},
        ]
        obs = {"role": "user", "text": text, "images": tuple(np.asarray(s) for s in shown)}
        info = {"task_id": task.id, "category": task.category, "turn": 0, "num_images": len(images),
                "system_prompt": self.system_prompt, "tools": [dict(tool) for tool in self.tools]}
        return obs, info

    def step(self, action: str | dict):
        """Play one model turn (see the module docstring for what each kind of turn becomes)."""
        episode = self._running_episode("step")
        if isinstance(action, EndEpisode):
            return self._finish(None, {**self._info(episode), "truncation": str(action.reason)},
                                terminated=False, obs=None)
        if not isinstance(action, (str, dict)):
            parse_action(action)  # raises the TypeError that names the accepted actions
        length = _action_chars(action)
        refused = length > self.max_action_chars
        if refused:  # not read at all: a looping model's megabytes cost nothing to refuse
            turn = Turn("invalid", error=(
                f"the turn is {length:,} characters long, over the limit of {self.max_action_chars:,}, "
                "so it was not read. Write a shorter turn: one tool call or an <answer>."))
        else:
            turn = parse_action(action)
        text = action_text(action, turn)
        episode.assistant_turns.append(text)
        self.messages.append(assistant_message(action, turn))
        n_turns = len(episode.assistant_turns)
        info = self._info(episode)

        if turn.kind == "answer":
            return self._finish(turn.answer, info, terminated=True, obs=None)
        if turn.kind == "invalid" and not refused and isinstance(action, str) and not _looks_like_tool_call(action):
            # Neither a tool call nor an answer: the episode ends; the answer is taken from the
            # text by fallback rules and the format reward is 0.
            # (The format term is 0 by its own rule: the turn has no <answer>.)
            return self._finish(extract_answer(action), info, terminated=True, obs=None)

        if n_turns >= self.max_turns and self.reward_config.last_turn_call == "skip":
            return self._finish(None, info, terminated=False, obs=None)  # as the release: the call never runs
        obs, ok = self._run_tool(turn, info)
        if n_turns >= self.max_turns:  # the final step pays all that is left, this call included
            return self._finish(None, info, terminated=False, obs=obs)
        info["reward_components"] = step_components(ok, self.reward_config)  # this step's terms, by name
        step_reward = info["reward_components"]["total"]
        episode.paid += step_reward
        return obs, step_reward, False, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        lines = []
        for message in self.messages:
            content = message.get("content", "")
            if isinstance(content, list):
                content = " ".join(
                    part["text"] if part["type"] == "text" else f"[image {part['image'].width}x{part['image'].height}]"
                    for part in content
                )
            lines.append(f"[{message['role']}] {content}")
        return "\n".join(lines)

    def close(self) -> None:
        """Close the env (and its sandbox, when it made its own). Safe to call twice."""
        self._closed = True
        if self._owns_sandbox and self.sandbox is not None:
            self.sandbox.close()
        super().close()

    # -- internals ------------------------------------------------------------------------------

    def _running_episode(self, method: str) -> _Episode:
        """The episode a `step` call acts on; a clear error for every misuse."""
        if self._closed:
            raise RuntimeError(f"{method}() on a closed env: create a new one")
        episode = self._episode
        if episode is None:
            raise RuntimeError(f"{method}() before reset(): call reset() to start an episode")
        if episode.done:
            raise RuntimeError(f"{method}() after the episode ended: call reset() to start a new one")
        return episode

    @staticmethod
    def _info(episode: _Episode) -> dict[str, Any]:
        return {"turn": len(episode.assistant_turns), "task_id": episode.task.id, "category": episode.task.category}

    def _run_tool(self, turn: Turn, info: dict) -> tuple[dict, bool]:
        """Run one tool call; return the tool observation and whether the execution succeeded.

        The sandbox's result is already checked (its host parses the worker's reply with bounds
        and verifies every rotation, flip and crop against the pixels); printed output is cut
        here (marked) and sanitised.
        """
        episode = self._episode
        episode.n_calls += 1
        n_images = len(episode.images)
        lines: list[str] = []
        new_image = shown = None
        if turn.kind == "invalid":
            ok = False
            lines.append(f"Error: {turn.error}")
        elif not 0 <= turn.image_index < n_images:
            ok = False
            lines.append(f"Error: image_index {turn.image_index} is out of range: this episode has images "
                         f"0..{n_images - 1}.")
        else:
            result = self.sandbox.run(turn.code, [item.image for item in episode.images], image_index=turn.image_index)
            ok = result.ok
            info["tool_elapsed_s"] = result.elapsed_s
            if ok and result.image is not None:
                new_image, shown = result.image, shown_copy(result.image, self.max_pixels)
                info["ops"] = [op["name"] for op in self._record_success(result)]
                (w, h), size = new_image.size, shown.size
                note = f" (shown at {size[0]}x{size[1]}; coordinates refer to the full size)" if size != (w, h) else ""
                lines.append(f"Image {len(episode.images) - 1} created: {w}x{h} pixels{note}.")
            else:
                info["ops"] = []
            printed = _printed(result.stdout)
            if not ok:
                lines.append(f"Error: {result.error or 'the code failed'}")
            elif new_image is None and not printed:
                lines.append(NO_IMAGE)
            if printed:
                lines.append("Printed output:\n" + printed)
        if not ok:
            episode.n_failed += 1
        info["tool_ok"] = ok
        if turn.notes:
            lines.append("Note: " + " ".join(turn.notes))
        message = sanitize_text("\n".join(lines), self.max_text_chars)
        content: list[dict] = []
        shown_images: tuple = ()
        if shown is not None:
            content.append({"type": "image", "image": shown})
            shown_images = (np.asarray(shown),)
        content.append({"type": "text", "text": message})
        self.messages.append({"role": "tool", "name": TOOL_NAME, "content": content})
        return {"role": "tool", "text": message, "images": shown_images}, ok

    def _record_success(self, result) -> list[dict]:
        """Add the output image with its frame, and collect its ops and crop boxes: in image 0's
        frame (where a frame chain reaches it) and as cut, in the pixels of the call's source
        image. Returns the ops (the sandbox verified them and recomputed the boxes)."""
        episode = self._episode
        parent = episode.images[result.source_index] if result.source_index is not None else None
        root, frame = None, None
        if parent is not None and parent.frame is not None and result.frame is not None:
            root, frame = parent.root, parent.frame.then(result.frame)
        episode.images.append(_EpisodeImage(result.image, root, frame))
        for op in result.ops:
            episode.used_ops.add(op["name"])
            if op["name"] != "crop" or parent is None:
                continue
            box = [float(v) for v in op["source_box"]]
            episode.source_crop_boxes.append(box)  # host-verified, in images[source]
            if parent.root == 0 and parent.frame is not None:  # bbox is given on image 0
                episode.crop_boxes.append(parent.frame.box_to_source(box))
        return result.ops

    def _finish(self, answer: str | None, info: dict, *, terminated: bool, obs: dict | None):
        episode = self._episode
        task = episode.task
        cfg = self.reward_config
        if cfg.answer_rules == "release":  # the release reads the answer from the whole response
            answer = release_rules.extract_answer(release_rules.response_text(episode.assistant_turns))
            correct = release_rules.answers_equivalent(answer, task.answer)
        else:
            correct = answer is not None and check_answer(answer, task.answer, task.answer_type)
        if not correct and answer and answer.strip() and self.judge is not None:
            ruling = self.judge.ask(task.question, task.answer, answer)
            info["judge"] = {"correct": ruling.correct, "rule": correct, "source": ruling.source,
                             "latency_s": ruling.latency_s}
            correct = correct if ruling.correct is None else ruling.correct  # undecided: the rule verdict stands
        components = episode_components(self.outcome(correct=bool(correct)), cfg)
        reward = components["total"] - episode.paid  # what earlier steps did not pay yet
        episode.paid += reward
        episode.done = True
        info.update({
            "reward_components": components,
            "correct": bool(correct),
            "answer": answer,
            "n_calls": episode.n_calls,
            "n_failed": episode.n_failed,
            "used_ops": sorted(episode.used_ops),
            "episode_reward": components["total"],
        })
        if not terminated:
            info.setdefault("truncation", "max_turns")
        if obs is None:
            obs = {"role": "user", "text": "", "images": ()}
        return obs, reward, terminated, not terminated, info


def _reward_config(reward: RewardConfig | str | dict | None) -> RewardConfig:
    if reward is None:
        return RewardConfig()
    if isinstance(reward, RewardConfig):
        return reward
    if isinstance(reward, str):
        return RewardConfig.preset(reward)
    if isinstance(reward, dict):
        return RewardConfig.from_dict(reward)
    raise TypeError(f"reward must be a RewardConfig, a preset name or a dict, got {type(reward).__name__}")


def _looks_like_tool_call(text: str) -> bool:
    """A turn that tried to call the tool (so a parse error is an observation, not the end)."""
    return "<tool_call>" in text or "```" in text
