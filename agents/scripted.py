"""Scripted agents that speak the same string actions as a model.

`OracleAgent` reads the task's hidden metadata and plays the ideal episode (exactly the required
inverse ops, the crop at the ground-truth box, the right answer): it is the reference column of
evaluations and the source of SFT demonstrations. `RandomAgent` plays a random mix of useful,
useless, broken and malformed turns: the fuzzer of the environment.

Both work without torch: `agents.scripted` imports only `cv_env`. They play through the episode
loop (`agents.rollout.play`, or `RolloutEngine(ScriptedAgents(...))`):

    (trajectory,) = play(lambda index: OracleAgent(), [task], sandbox)
    trajectory.reward == ideal_reward(task)["total"]
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from cv_env.protocol import TOOL_NAME
from cv_env.reward import EpisodeOutcome, RewardConfig, episode_components
from cv_env.task import Task
from cv_env.tasks.oracle import oracle_code, oracle_solution


def tool_call_turn(code: str, image_index: int = 0, description: str = "", thought: str = "") -> str:
    """A well-formed assistant turn that calls `code_image_tool`."""
    arguments = {"code": code, "description": description, "image_index": image_index}
    call = json.dumps({"name": TOOL_NAME, "arguments": arguments})
    return f"<think>{thought or description or 'I will process the image.'}</think>\n<tool_call>\n{call}\n</tool_call>"


def answer_turn(answer: str, thought: str = "") -> str:
    """A well-formed final assistant turn."""
    return f"<think>{thought or 'I can answer now.'}</think>\n<answer>{answer}</answer>"


class OracleAgent:
    """Plays `cv_env.tasks.oracle.oracle_solution(task)` one turn at a time.

    Usage: `agent.reset(task)` at the start of an episode (the env's `task` property gives it),
    then `agent.act()` for each turn. It earns `ideal_reward(task)` on every built-in category.

    tool_rate < 1 makes it a teacher that knows every answer but often skips the tool: on a
    share 1 - tool_rate of the tasks that need an op (chosen by `uses_tool`, a pure function
    of the task id and `seed`) it answers at once, earning `ideal_reward(task, tools=False)`.
    Demonstrations from such a teacher show a student answers it cannot always reproduce.
    """

    def __init__(self, tool_rate: float = 1.0, seed: int = 0) -> None:
        if not 0.0 <= tool_rate <= 1.0:
            raise ValueError(f"tool_rate must be within [0, 1] (the share of tasks solved with the tool), got {tool_rate}")
        self.tool_rate = float(tool_rate)
        self.seed = int(seed)
        self._turns: list[str] = []

    def uses_tool(self, task: Task) -> bool:
        """Whether this agent calls the tool on `task` (always when tool_rate is 1 and an op is needed)."""
        if oracle_code(task) is None:
            return False
        if self.tool_rate >= 1.0:
            return True
        draw = zlib.crc32(f"{self.seed}:{task.id}".encode()) / 2**32  # uniform in [0, 1), stable across runs
        return draw < self.tool_rate

    def reset(self, task: Task) -> None:
        self._turns = []
        steps = oracle_solution(task)
        if len(steps) > 1 and not self.uses_tool(task):
            steps = [{"answer": task.answer, "thought": f"I answer from the image as shown: the answer is {task.answer}."}]
        for step in steps:
            if "answer" in step:
                self._turns.append(answer_turn(step["answer"], step.get("thought", "")))
            else:
                self._turns.append(tool_call_turn(step["code"], step.get("image_index", 0),
                                                  step.get("description", ""), step.get("thought", "")))

    def act(self, observation: dict | None = None) -> str:
        if not self._turns:
            raise RuntimeError("the oracle has no turn left: call reset(task) at the start of each episode")
        return self._turns.pop(0)


class ScriptAgent:
    """Plays a fixed list of turns, one per `act()`: failures and malformed turns on demand."""

    def __init__(self, turns: list[str]) -> None:
        self.turns = list(turns)

    def reset(self, task: Task | None = None) -> None:
        """Nothing to prepare: the script is the same whatever the task."""

    def act(self, observation: dict | None = None) -> str:
        if not self.turns:
            raise RuntimeError("the script has no turn left: give ScriptAgent one turn per step of the episode")
        return self.turns.pop(0)


# Snippets a careless or adversarial policy might write; RandomAgent draws from them.
_RANDOM_CODE = (
    "result = image.rotate(90, expand=True)",
    "result = image.rotate(180, expand=True)",
    "result = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)",
    "w, h = image.size\nresult = image.crop((0, 0, w // 2, h // 2))",
    "result = ImageEnhance.Contrast(image).enhance(1.8)",
    "result = np.rot90(np.asarray(image), k=3)",
    "result = cv2.GaussianBlur(np.asarray(image), (5, 5), 0)",
    "print(image.size)\nresult = image",
    "result = image.crop((10, 10, 5, 5))",  # an empty box
    "result = undefined_name",
    "import os\nresult = image",
    "result = image.rotate(",
    "result = ().__class__.__subclasses__()",
    "result = 'not an image'",
    # Code that runs but assigns no `result` (it prints, or does nothing visible).
    "print(image.size)",
    "x = image.rotate(90)",
    "pass",
    # Printed output far past what the model is shown, with control and unpaired surrogate characters.
    "print('y' * 100000)\nresult = image",
    "print('\\x00\\x1b[31m \\ud800 end')",
    # Odd images: every mode is shown as RGB; a 1x1, an extreme aspect (and one past the limit), a large one.
    "result = Image.new('F', image.size, 3.5)",
    "result = Image.new('I;16', (7, 5), 300)",
    "result = image.convert('RGBA')",
    "result = image.convert('P')",
    "result = image.convert('1')",
    "result = image.resize((1, 1))",
    "result = image.resize((200, 1))",
    "result = image.resize((2000, 1))",
    "result = image.resize((1600, 1200))",
    "result = np.zeros((4, 4), float)",
    "résultat = image\nresult = résultat",
)
_ENDLESS_CODE = "while True:\n    pass"  # stopped by the sandbox's wall clock
_RANDOM_TEXT = ("A", "B", "7", "yes", "STOP", "3.5", "")


class RandomAgent:
    """Random turns: tool calls (good, useless, failing, hostile, without `result`, odd images),
    malformed calls and answers. endless_prob: the share of calls whose code loops until the
    sandbox's timeout stops it (0 by default: each costs a worker `timeout_s`)."""

    def __init__(self, seed: int = 0, answer_prob: float = 0.2, malformed_prob: float = 0.15,
                 endless_prob: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.answer_prob = answer_prob
        self.malformed_prob = malformed_prob
        self.endless_prob = endless_prob
        self._num_images = 1

    def reset(self, task: Task | None = None) -> None:
        self._num_images = len(task.images) if task is not None else 1

    def act(self, observation: dict | None = None) -> str:
        if observation is not None and observation.get("role") == "tool" and observation.get("images"):
            self._num_images += 1
        u = self.rng.random()
        if u < self.answer_prob:
            return answer_turn(str(self.rng.choice(_RANDOM_TEXT)))
        if u < self.answer_prob + self.malformed_prob:
            return str(self.rng.choice([
                '<tool_call>{"name": "code_image_tool", "arguments": {"code": </tool_call>',
                '<tool_call>{"name": "other_tool", "arguments": {}}</tool_call>',
                "<think>unfinished thought",
                "```python\nresult = image\n```",
                "<answer>" * 10_000,  # a looping model: longer than the env reads (refused unread)
            ]))
        code = str(self.rng.choice(_RANDOM_CODE))
        if self.endless_prob and self.rng.random() < self.endless_prob:
            code = _ENDLESS_CODE
        index = int(self.rng.integers(0, self._num_images + 1))  # sometimes out of range
        return tool_call_turn(code, index)


def ideal_reward(task: Task, reward: RewardConfig | None = None, tools: bool = True) -> dict[str, float]:
    """The reward components of the ideal episode of `task`: the most an agent earns without gaming.

    Ideal: one successful execution doing exactly the required inverse ops E (the crop exactly at
    the bbox) plus, for a corrupted image, the enhancement it needs (a non-core op: `emerge`), then
    the correct answer, every turn well formatted. A task that needs nothing is answered directly.
    (On a clean task an agent could add 0.2 more by a gratuitous enhancement: that is reward
    gaming, not the maximum a task offers.)

    tools=False: the reward of the correct answer given at once, without any call (what
    `OracleAgent` earns on a task where it skips the tool).
    """
    cfg = reward or RewardConfig()
    required = task.required_ops
    used = (set(required) | ({"enhance"} if task.extra.get("corruption") else set())) if tools else set()
    calls = 1 if used else 0
    turns = [tool_call_turn("result = image")] * calls + [answer_turn(task.answer)]
    outcome = EpisodeOutcome(
        assistant_turns=turns, correct=True, required_ops=required, used_ops=used,
        crop_boxes=[list(task.bbox)] if "crop" in used and task.bbox is not None else [],
        bbox=task.bbox, n_calls=calls, n_failed=0,
    )
    return episode_components(outcome, cfg)


class ScriptedAgents:
    """A chat backend whose "model" is one scripted agent per episode, for `agents.rollout.RolloutEngine`.

    agent_factory(index): the agent of the rollout's episode `index` (task i's sample s is
    episode i * n + s); it is reset with the episode's task and acts on each new observation.

        engine = RolloutEngine(ScriptedAgents(lambda index: RandomAgent(seed=index)), sandbox=sandbox)
    """

    def __init__(self, agent_factory: Callable[[int], Any] = lambda index: OracleAgent()) -> None:
        self.agent_factory = agent_factory
        self._agents: dict[str, Any] = {}

    def respond(self, requests: Sequence[Any], sampling: Any = None, seed: int | None = None,
                on_finish: Callable[[int, str], None] | None = None) -> list[str]:
        """Each request's episode agent's next turn (`agents.rollout.ChatRequest`s in, str actions
        out), each passed to `on_finish(i, action)` as soon as it is known."""
        actions = []
        for i, request in enumerate(requests):
            agent = self._agents.get(request.key)
            if agent is None:  # the episode's first turn
                agent = self._agents[request.key] = self.agent_factory(int(request.key))
                agent.reset(request.task)
            actions.append(agent.act(request.observation))
            if on_finish is not None:
                on_finish(i, actions[-1])
        return actions

    def reset(self) -> None:
        """Forget every episode's agent (the engine calls it at the start of each rollout)."""
        self._agents.clear()

    def update_weights(self, model) -> None:
        """No-op: a scripted agent has no weights."""

