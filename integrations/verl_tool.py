"""Our sandbox and reward inside verl (0.9.1): `CodeVisionTool` and `compute_score`.

A CodeVision-style verl recipe switches to our sandbox by one class path in its tool config
(`integrations/verl_tool_config.yaml` is that file) and to our reward by naming `compute_score`:

    actor_rollout_ref.rollout.multi_turn.tool_config_path=integrations/verl_tool_config.yaml
    reward.custom_reward_function.path=pkg://integrations.verl_tool
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.reward=codevision_release

`CodeVisionTool` is a verl `BaseTool` for `code_image_tool`. An instance is one episode of our
`CodeVisionEnv` on the tool's shared `Sandbox`: `create` starts it on the task's images (the
dataset's `tools_kwargs.code_image_tool.create_kwargs.images`, as CodeVision-RL rows carry them),
`execute` is one `env.step` — the code runs in the sandbox, its ops are verified against the
pixels, and the reply is the env's text and output image — with the failed-call penalty as the
tool reward; `calc_reward` is what the calls paid; `release` ends the episode.

verl's tool agent loop (0.9.x) makes a new instance for every call and passes its `AgentData`:
the tool then keeps one episode per trajectory (`agent_data.request_id`), so a later call may
process an earlier call's output image and crops map to the input's frame, and it writes the
episode's record (turns, verified ops, crop boxes, calls) into `agent_data.extra_fields`, which
verl hands to the reward function as `extra_info["codevision"]`.

`compute_score` settles the episode with `cv_env.reward` (any preset, `codevision_release`
included): the answer is the final turn's, required ops and bbox come from the row's
`extra_info` (read as our parquet reader reads a CodeVision-RL row), and the ops and crops are
the ones the tool verified — never parsed from the code's text.

What verl's interfaces do not carry: the reward is per sample, so the necessity group term is
not paid (as in the release, beta = 0); the tool rewards reach verl's GRPO only through the score
(their sum is the `exec_fail` term), not as per-turn credit; a tool-free episode has no record, so
its score uses the row alone.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any
from uuid import uuid4

from PIL import Image
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from cv_env.answers import check_answer, extract_answer
from cv_env.env import CodeVisionEnv
from cv_env.protocol import TOOL_SCHEMA, action_text
from cv_env.reward import EpisodeOutcome, RewardConfig, episode_components
from cv_env.sandbox import Sandbox
from cv_env.task import Task
from cv_env.tasks.parquet import row_to_task

RECORD_KEY = "codevision"  # the key of the episode record in AgentData.extra_fields / extra_info
_ENDED = "Error: the episode is over (its turn limit was reached), so this call did not run. Give your final answer."
_SANDBOX_KEYS = ("workers", "timeout_s", "memory_mb")
_ENV_KEYS = ("reward", "max_turns", "max_pixels")


def _image(item: Any) -> Image.Image:
    """An input image from a PIL image or an encoded entry (bytes, or {"bytes": ...} as in parquet)."""
    if isinstance(item, Image.Image):
        return item
    data = item.get("bytes") if isinstance(item, dict) else item
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError(f"an image must be a PIL image or encoded bytes ({{'bytes': ...}}), got {type(item).__name__}")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class CodeVisionTool(BaseTool):
    """`code_image_tool` backed by our `Sandbox` and env (see the module docstring).

    Config keys (the `config:` block of the tool YAML): `workers`, `timeout_s`, `memory_mb` (the
    shared sandbox), `reward` (preset name or weights: its `exec_fail_penalty` is the tool reward
    of a failed call), `max_turns` (calls an episode may make), `max_pixels` (largest image shown),
    `max_open_episodes` (trajectories kept between verl's per-call instances). `type` is verl's.
    """

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None):
        config = dict(config or {})
        known = {"type", "max_open_episodes", *_SANDBOX_KEYS, *_ENV_KEYS}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown CodeVisionTool config key(s) {unknown}; valid keys are: {', '.join(sorted(known))}")
        self.sandbox = Sandbox(**{k: config[k] for k in _SANDBOX_KEYS if k in config})
        self.env_kwargs = {k: config[k] for k in _ENV_KEYS if k in config}
        self.max_open_episodes = int(config.get("max_open_episodes", 4096))
        self._instances: dict[str, dict] = {}  # instance id -> {"images": ..., "trajectory": id or None}
        self._episodes: OrderedDict[str, dict] = OrderedDict()  # instance or trajectory id -> episode
        super().__init__(config, tool_schema or OpenAIFunctionToolSchema.model_validate(TOOL_SCHEMA))

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        """Start an episode on the task's images: `images` (or `image`, as the CodeVision release
        names it) in `kwargs` or in verl's `create_kwargs`."""
        kwargs = {**kwargs, **(kwargs.pop("create_kwargs", None) or {})}
        images = kwargs.get("images", kwargs.get("image"))
        if images is None:
            raise ValueError("code_image_tool needs the task's images: put them in the dataset's "
                             "tools_kwargs.code_image_tool.create_kwargs.images")
        images = [_image(item) for item in (images if isinstance(images, (list, tuple)) else [images])]
        instance_id = instance_id or str(uuid4())
        self._instances[instance_id] = {"images": images, "trajectory": None}
        return instance_id, ToolResponse()

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        """One `env.step` with the call's arguments; returns (reply, failed-call penalty, metrics)."""
        agent_data = kwargs.get("agent_data")
        episode = self._episode(instance_id, agent_data)
        if episode["done"]:
            return ToolResponse(text=_ENDED), 0.0, {"ok": False, "ended": True}
        env = episode["env"]
        action = dict(parameters) if isinstance(parameters, dict) else {"code": parameters}
        _, reward, terminated, truncated, info = env.step(action)
        episode["done"] = terminated or truncated
        if episode["done"]:  # the turn limit: the env paid everything on this step; the call's share is its penalty
            reward = info["reward_components"]["exec_fail"] - episode["paid"]
        episode["paid"] += reward
        content = agent_data.messages[-1].get("content", "") if agent_data is not None and agent_data.messages else ""
        episode["turns"].append((content if isinstance(content, str) else "") + action_text(action))
        if agent_data is not None:
            agent_data.extra_fields[RECORD_KEY] = _record(episode)
        images = [part["image"] for part in env.messages[-1]["content"] if part["type"] == "image"]
        text = next(part["text"] for part in env.messages[-1]["content"] if part["type"] == "text")
        response = ToolResponse(text=text, image=images) if images else ToolResponse(text=text)
        return response, float(reward), {"ok": bool(info.get("tool_ok")), "ops": list(info.get("ops", []))}

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        """The tool rewards the episode's calls earned so far (the per-call penalties)."""
        episode = self._episodes.get(self._key(instance_id))
        return 0.0 if episode is None else float(episode["paid"])

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        """End the instance: its episode, unless it belongs to a trajectory verl is still playing."""
        instance = self._instances.pop(instance_id, None)
        if instance is not None and instance["trajectory"] is None:
            self._episodes.pop(instance_id, None)

    def record(self, instance_id: str) -> dict:
        """The instance's episode as plain data for `compute_score` (`extra_info["codevision"]`):
        the turns, the verified ops, the crop boxes in the bbox's frame, the calls."""
        episode = self._episodes.get(self._key(instance_id))
        if episode is None:
            raise KeyError(f"tool instance {instance_id!r} has no episode: it made no call, or was released")
        return _record(episode)

    def _key(self, instance_id: str) -> str:
        instance = self._instances.get(instance_id)
        return instance["trajectory"] if instance and instance["trajectory"] else instance_id

    def _episode(self, instance_id: str, agent_data: Any) -> dict:
        """The episode a call plays: the trajectory's (kept across verl's per-call instances), or the instance's."""
        instance = self._instances.get(instance_id)
        if instance is None:
            raise KeyError(f"unknown tool instance {instance_id!r}: call create() first")
        key = instance_id
        if agent_data is not None:
            key = instance["trajectory"] = f"trajectory:{agent_data.request_id}"
        if key not in self._episodes:
            env = CodeVisionEnv(tasks=[Task(id=key, images=instance["images"], question="", answer="")],
                                sandbox=self.sandbox, **self.env_kwargs)
            env.reset(options={"index": 0})
            self._episodes[key] = {"env": env, "turns": [], "paid": 0.0, "done": False}
            while len(self._episodes) > self.max_open_episodes:
                self._episodes.popitem(last=False)  # the oldest trajectory, long finished
        self._episodes.move_to_end(key)
        return self._episodes[key]


def _record(episode: dict) -> dict:
    outcome = episode["env"].outcome()
    return {"turns": list(episode["turns"]), "used_ops": sorted(outcome.used_ops),
            "crop_boxes": [list(box) for box in outcome.crop_boxes],
            "n_calls": outcome.n_calls, "n_failed": outcome.n_failed}


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  reward: str | dict = "codevision", **kwargs: Any) -> dict[str, float]:
    """verl custom reward function: CodeVision's shaped reward of one sample, every term by name.

    `solution_str` is the response verl decoded; its last turn (after the last tool reply) holds
    the answer. `extra_info` is the row's CodeVision-RL `extra_info` (transform, bbox, answer_type,
    ...) plus the tool's record under "codevision". `reward`: a preset name or a dict of weights
    (`reward_kwargs` in verl's config). Returns {"score": total, <term>: value, ...}.
    """
    extra_info = dict(extra_info or {})
    config = RewardConfig.preset(reward) if isinstance(reward, str) else RewardConfig.from_dict(reward)
    # The reader wants an image; the reward needs only the row's metadata, read the reader's way.
    placeholder = io.BytesIO()
    Image.new("L", (1, 1)).save(placeholder, format="PNG")
    task = row_to_task({"images": [{"bytes": placeholder.getvalue()}], "extra_info": extra_info,
                        "reward_model": {"ground_truth": ground_truth}, "data_source": data_source},
                       where=f"{data_source} sample", base_dir=Path("."))
    record = extra_info.get(RECORD_KEY) or {}
    final_turn = _final_turn(solution_str, bool(record.get("turns")))
    answer = extract_answer(final_turn)
    outcome = EpisodeOutcome(
        assistant_turns=[*record.get("turns", []), final_turn],
        correct=answer is not None and check_answer(answer, task.answer, task.answer_type),
        required_ops=task.required_ops, used_ops=record.get("used_ops", ()),
        crop_boxes=record.get("crop_boxes", ()), bbox=task.bbox,
        n_calls=record.get("n_calls", 0), n_failed=record.get("n_failed", 0))
    components = episode_components(outcome, config)
    return {"score": components.pop("total"), **components}


def _final_turn(solution_str: str, had_tool_calls: bool) -> str:
    """The last assistant turn of a decoded response: the text after the last tool reply (Qwen's
    `</tool_response>`, then the next turn's role line), or the whole response without tool calls."""
    if not had_tool_calls or "</tool_response>" not in solution_str:
        return solution_str
    tail = solution_str.rsplit("</tool_response>", 1)[1].lstrip()
    return tail[len("assistant"):].lstrip("\n") if tail.startswith("assistant") else tail
