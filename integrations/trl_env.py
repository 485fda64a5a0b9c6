"""Our environment inside TRL's `GRPOTrainer` as a stateful multi-turn environment (TRL 1.16).

    from integrations.trl_env import CodeVisionTRL
    cv = CodeVisionTRL(processor, tasks="orientation_ocr", sandbox=Sandbox(workers=2),
                       reward="codevision_release", num_generations=4)
    trainer = GRPOTrainer(model, args=GRPOConfig(num_generations=4, ...), processing_class=processor,
                          train_dataset=cv.dataset(), environment_factory=cv.make_env,
                          reward_funcs=cv.reward)

How TRL's environment interface maps onto ours:

* TRL builds one environment per rollout with `environment_factory` (here `cv.make_env`: a
  `CodeVisionEnv` on the one shared `Sandbox` and task source) and calls `reset(**row)` with the
  dataset row. Each row names a task (`task_index`), so the G rollouts of a GRPO group play the
  same task; `reset` returns the task's images and question, which TRL appends to the row's prompt.
* The environment's public method `code_image_tool` is the tool TRL lists in the prompt and calls
  with the arguments it parsed from the model's `<tool_call>`. It is one `env.step`: the code runs
  in our sandbox, ops are verified against the pixels, and its reply — the new image and the
  env's text — comes back to TRL as content blocks, so the image enters the conversation.
* `cv.reward` is the reward function. It gets every rollout's environment and token ids, splits
  the ids into the model's turns exactly as generated, plays the turn the env has not seen (the
  final answer), settles the episode in the env, and returns the env's shaped total (plus the
  necessity group term). Every reward component is logged through TRL as `codevision/<term>`.

What TRL's interface does not carry, and what the adapter does about it:

* A tool receives only the call's arguments, never the turn's text. The env records each call
  from its arguments, so its own format term cannot see the turn's `<think>`; the adapter scores
  `fmt` on the turns as generated (`cv_env.reward.format_reward`) and corrects the total by
  `format_weight * (fmt - env's fmt)`. Everything else is the env's own reckoning.
* GRPO's advantage is one number per rollout: the per-call penalties the env pays on their steps
  reach TRL only summed into the episode total (per-turn credit, as our PPO's GAE uses it, is lost).
* TRL may run several tool calls of one turn; the env counts each as a turn of its own.
* Necessity compares the rollouts of a group, so it needs each group whole in one process: it is
  computed over consecutive runs of `num_generations` rows, and a run whose rows do not share one
  task is an error (more processes than groups split them; set the `reward`'s beta to 0 there).

Printed output is model-controlled text: before it reaches TRL's tokenizer every `<|` is broken
with a zero-width space, so a snippet cannot print a control token such as `<|im_start|>`.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np

from agents.templates import TemplateError, probe_template, raw_renderer
from cv_env.env import CodeVisionEnv
from cv_env.protocol import TOOL_SCHEMA, EndEpisode
from cv_env.reward import RewardConfig, apply_necessity, format_reward
from cv_env.sandbox import Sandbox
from cv_env.tasks import TaskSource, load_tasks

_ZERO_WIDTH_SPACE = "\u200b"
_ENDED = ("Error: the episode is over (its turn limit was reached), so this call did not run. "
          "Give your final answer in <answer></answer>.")


def escape_control_tokens(text: str) -> str:
    """`text` with every `<|` broken by a zero-width space, so no `<|...|>` control token survives."""
    return text.replace("<|", "<" + _ZERO_WIDTH_SPACE + "|")


def _escaped_content(content: list[dict]) -> list[dict]:
    """A copy of a message's content blocks, text escaped (images are passed as they are)."""
    return [{**part, "text": escape_control_tokens(part["text"])} if part.get("type") == "text" else dict(part)
            for part in content]


def split_turns(ids: Sequence[int], end_of_turn: int, next_turn: Sequence[int]) -> list[list[int]]:
    """The model's turns in a TRL completion: its generated ids with tool replies in between.

    Each turn runs up to its end-of-turn token (included; the last may be cut short); the ids after
    it are the template's tool reply, up to and including `next_turn` (the generation prompt that
    opens the next assistant turn). Tool replies never contain `next_turn`: their text is escaped.
    """
    ids, next_turn = list(ids), list(next_turn)
    turns, start = [], 0
    while start < len(ids):
        end = ids.index(end_of_turn, start) + 1 if end_of_turn in ids[start:] else len(ids)
        turns.append(ids[start:end])
        start = _find(ids, next_turn, end)
    return turns


def _find(ids: list[int], pattern: list[int], start: int) -> int:
    """The index just past the first `pattern` in `ids[start:]`, or len(ids) when there is none."""
    for i in range(start, len(ids) - len(pattern) + 1):
        if ids[i:i + len(pattern)] == pattern:
            return i + len(pattern)
    return len(ids)


def ensure_response_parser(processor) -> None:
    """Give the processor's tokenizer a response parser TRL can read tool calls with, if it has none.

    TRL recognises a few published chat templates; any other Qwen-VL template (ours, Qwen2.5-VL's)
    writes the same Hermes `<tool_call>` JSON as Qwen3's, so TRL's Qwen3 parser reads it.
    """
    from trl.chat_template_utils import add_response_schema, qwen3_template

    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
        return
    try:
        add_response_schema(processor)
    except ValueError:  # a template TRL does not know by name
        tokenizer.response_template = qwen3_template


def _tool_docstring(schema: dict) -> str:
    """A Google-style docstring for `code_image_tool` from its JSON schema (TRL builds the schema
    it shows the model from the method's signature and docstring)."""
    function = schema["function"]
    lines = [function["description"], "", "Args:"]
    lines += [f"    {name}: {spec['description']}" for name, spec in function["parameters"]["properties"].items()]
    return "\n".join(lines)


class CodeVisionTRLEnv:
    """One rollout's environment for TRL (made by `CodeVisionTRL.make_env`; TRL reuses it via `reset`).

    `env` is the underlying `CodeVisionEnv`: its `messages`, `task` and final `info` are the record
    of the episode. After the reward function ran, `result` holds the final step's info, whose
    `reward_components` include the format correction described in the module docstring.
    """

    def __init__(self, env: CodeVisionEnv):
        self.env = env
        self.tool_calls = 0  # calls TRL made in this episode (including any after its end)
        self.result: dict | None = None  # the final step's info, once the episode is over

    def reset(self, task_index: int, **row: Any) -> list[dict]:
        """Start the episode of dataset row `task_index`; return its images and question for the prompt."""
        self.env.reset(options={"index": int(task_index)})
        self.tool_calls, self.result = 0, None
        return _escaped_content(self.env.messages[-1]["content"])

    def code_image_tool(self, **arguments: Any) -> list[dict]:
        # The signature TRL reads is set below from TOOL_SCHEMA; taking **arguments lets every
        # argument dict the model wrote reach the env, which turns a missing or unknown key into
        # an observation and a failed call instead of a TypeError TRL would catch and hide.
        self.tool_calls += 1
        if self.result is not None:
            return [{"type": "text", "text": _ENDED}]
        _, _, terminated, truncated, info = self.env.step(dict(arguments))
        if terminated or truncated:
            self.result = info
        return _escaped_content(self.env.messages[-1]["content"])

    code_image_tool.__doc__ = _tool_docstring(TOOL_SCHEMA)
    code_image_tool.__signature__ = inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("code", inspect.Parameter.KEYWORD_ONLY, annotation=str),
        inspect.Parameter("description", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=""),
        inspect.Parameter("image_index", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=0),
    ], return_annotation=list)
    code_image_tool.__annotations__ = {"code": str, "description": str, "image_index": int, "return": list}

    def _finish(self, turns: list[str]) -> dict[str, float]:
        """Settle the episode given the model's turns as generated; return the reward components."""
        seen = sum(message["role"] == "assistant" for message in self.env.messages[1:])
        for turn in turns[seen:]:
            if self.result is not None:
                break
            _, _, terminated, truncated, info = self.env.step(turn)
            if terminated or truncated:
                self.result = info
        if self.result is None:  # the last turn was a call TRL did not run, or an unreadable one
            _, _, _, _, self.result = self.env.step(EndEpisode("unfinished"))
        components = dict(self.result["reward_components"])
        fmt = format_reward(turns)
        components["total"] += self.env.reward_config.format_weight * (fmt - components["fmt"])
        components["fmt"] = fmt
        self.result = {**self.result, "reward_components": components, "episode_reward": components["total"]}
        return components


class CodeVisionTRL:
    """Everything `GRPOTrainer` needs to train on our env: `make_env`, `dataset()`, `reward`.

    Args:
        processor: the policy's processor (the one given to `GRPOTrainer`): its chat template tells
            where the model's turns start and end in a completion (`ensure_response_parser` is
            applied to it, so TRL can read the model's tool calls).
        tasks: a task spec for `cv_env.tasks.load_tasks` ("synthetic", a category, a parquet path,
            a `TaskSource` or a list of `Task`); loaded once, shared by every environment.
        sandbox: the `Sandbox` every environment runs code in (one worker pool for the trainer),
            or a config dict for one made here (closed by `close()`).
        reward: a `RewardConfig`, a preset name ("codevision", "codevision_release") or a dict.
        num_generations: GRPO's group size (`GRPOConfig.num_generations`), for the necessity term.
        split: the split of a generated suite. `env_kwargs`: any other `CodeVisionEnv` argument
            (max_turns, max_pixels, prompt, system_prompt, judge, ...).
    """

    def __init__(self, processor, tasks: str | TaskSource | list = "synthetic", *,
                 sandbox: Sandbox | dict | None = None, reward: RewardConfig | str | dict | None = None,
                 num_generations: int, split: str = "train", **env_kwargs: Any):
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1 (GRPOConfig.num_generations), got {num_generations}")
        ensure_response_parser(processor)
        self.tasks = load_tasks(tasks, split=split)
        self.owns_sandbox = not isinstance(sandbox, Sandbox)
        self.sandbox = Sandbox(**(sandbox or {})) if self.owns_sandbox else sandbox
        self.num_generations = int(num_generations)
        self.env_kwargs = {**env_kwargs, "reward": reward}
        probe = self._env()  # the env resolves the reward and prompt settings
        self.reward_config, self.system_prompt = probe.reward_config, probe.system_prompt
        self.reward = CodeVisionReward(self, processor)

    def _env(self) -> CodeVisionEnv:
        return CodeVisionEnv(tasks=self.tasks, sandbox=self.sandbox, **self.env_kwargs)

    def make_env(self) -> CodeVisionTRLEnv:
        """TRL's `environment_factory`: a new rollout environment on the shared sandbox and tasks."""
        return CodeVisionTRLEnv(self._env())

    def dataset(self, indices: Sequence[int] | None = None):
        """A `datasets.Dataset` for `GRPOTrainer`: one row per task (all, or `indices`), each a
        system prompt and an empty user turn that `reset` fills with the task, plus `task_index`."""
        from datasets import Dataset

        indices = range(len(self.tasks)) if indices is None else indices
        prompt = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": ""}]
        return Dataset.from_list([{"prompt": prompt, "task_index": int(i)} for i in indices])

    def close(self) -> None:
        """Close the sandbox when it was made here."""
        if self.owns_sandbox:
            self.sandbox.close()


class CodeVisionReward:
    """TRL reward function: settles each rollout's episode in its env and returns the shaped total.

    TRL calls it with every rollout of a batch (keyword arguments `completion_ids`, `environments`,
    `log_metric`, ...). TRL logs its values under this object's `__name__` ("codevision"); each
    reward component's batch mean is logged as `codevision/<term>`.
    """

    __name__ = "codevision"

    def __init__(self, owner: CodeVisionTRL, processor):
        self.owner = owner
        self.tokenizer = getattr(processor, "tokenizer", processor)
        support = probe_template(raw_renderer(processor), "\ue000codevision-probe\ue001")
        closing = self.tokenizer(support.closing, add_special_tokens=False)["input_ids"]
        if not closing:
            raise TemplateError(f"the template's end of an assistant turn {support.closing!r} has no tokens")
        self.end_of_turn = closing[0]
        self.next_turn = self.tokenizer(support.header + support.prefill, add_special_tokens=False)["input_ids"]
        self.prefill = support.prefill

    def turns(self, completion_ids: Sequence[int]) -> list[str]:
        """The model's turns in one completion, as text (the template's pre-fill included, the
        end-of-turn token not), as the env reads a turn."""
        texts = []
        for ids in split_turns(completion_ids, self.end_of_turn, self.next_turn):
            if ids and ids[-1] == self.end_of_turn:
                ids = ids[:-1]
            texts.append(self.prefill + self.tokenizer.decode(ids, skip_special_tokens=False))
        return texts

    def __call__(self, prompts=None, completions=None, completion_ids=None, environments=None,
                 log_metric=None, **kwargs: Any) -> list[float]:
        if environments is None:
            raise ValueError("the codevision reward needs TRL's environments: pass `environment_factory="
                             "cv.make_env` to GRPOTrainer together with `reward_funcs=cv.reward`")
        components = [env._finish(self.turns(ids)) for env, ids in zip(environments, completion_ids)]
        totals = [c["total"] for c in components]
        necessity = self._necessity(environments)
        totals = [total + extra for total, extra in zip(totals, necessity)]
        if log_metric is not None:
            for name in components[0]:
                log_metric(f"codevision/{name}", float(np.mean([c[name] for c in components])))
            log_metric("codevision/necessity_bonus", float(np.mean(necessity)))
            log_metric("codevision/tool_calls", float(np.mean([env.tool_calls for env in environments])))
        return totals

    def _necessity(self, environments: Sequence[CodeVisionTRLEnv]) -> list[float]:
        """beta * necessity for each rollout, over consecutive groups of `num_generations`."""
        config, size = self.owner.reward_config, self.owner.num_generations
        if config.beta == 0:
            return [0.0] * len(environments)
        if len(environments) % size:
            raise ValueError(f"{len(environments)} rollouts in this process are not whole groups of "
                             f"num_generations={size}: necessity needs each group in one process (set beta=0)")
        extra = []
        for start in range(0, len(environments), size):
            group = environments[start:start + size]
            if len({env.env.task.id for env in group}) != 1:
                raise ValueError(f"rollouts {start}..{start + size - 1} play different tasks, so they are not one "
                                 "GRPO group: necessity needs each group whole in one process (set beta=0)")
            extra += apply_necessity([env.result for env in group], config)
        return extra

