"""The RL data model: a `Turn`, a `Trajectory` (one episode), a `TrajectoryGroup` (one prompt's rollouts).

    trajectory.prompt_ids + [turn.sampled_ids + turn.context_ids for turn in trajectory.turns]
        == trajectory.token_ids                         # what the model saw, token-exact
    trajectory.loss_mask[t] == 1  exactly where the model sampled token_ids[t]
    sum(trajectory.token_rewards) == trajectory.reward == sum(turn.reward for turn in turns)
    group.rewards_G[i] == group.trajectories_G[i].reward + group.group_terms_G[i]

Everything downstream reads these: advantages, losses, metrics, evaluation reports and
transcripts (`agents.transcript`), the viewer, SFT data, JSONL files (`agents.jsonl`). The
records are frozen; the per-token arrays are derived from the turns (and cached). A rollout from
a chat backend (text in, text out) has no token ids: its token arrays are empty, the rest holds.
This module never imports torch (the scripted-agent evaluation runs without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

from PIL import Image


@dataclass(frozen=True)
class Turn:
    """One assistant turn and the env's reply to it.

    action: the turn's text as the env read it (the template's pre-fill and the sampled text).
    reward: the env step's reward (the last turn's includes the outcome and episode terms).
    sampled_ids / logprobs: what the model sampled, verbatim, with the sampler's log-probs.
    context_ids: the tokens appended after the turn that the model did not sample: the
        template's closing and, when the reply was shown, the reply's template delta.
    reply_text / reply_images: the env's reply as its observation gave it ("" and () when the
        step ended the episode). reply_shown: the reply's tokens (and images) are in
        context_ids; False when the episode ended, or the token budget left no room for it.
    tool_ok: whether the turn's tool call ran (None: nothing was called). ops: the ops its
        code applied, as the sandbox verified them.
    """

    action: str
    reward: float
    sampled_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    context_ids: tuple[int, ...] = ()
    reply_text: str = ""
    reply_images: tuple[Image.Image, ...] = ()
    reply_shown: bool = False
    tool_ok: bool | None = None
    ops: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One episode: the prompt, the turns, the outcome.

    Identity: task_id, category, group_id (the prompt's group; GRPO compares a group's samples),
    sample_index (which of the group's samples).
    Prompt: prompt_text / prompt_images (the env's first observation: the question as the model
    saw it), prompt_ids (the rendered prompt, generation prompt included).
    Outcome (from the env's final info): success (the answer is correct, apart from the shaped
    reward), answer, reward_components, used_ops, num_tool_calls and num_failed_calls (the env's
    counts of calls, and of calls that failed), judge (the LLM judge's ruling, {} when not asked); truncation: "" when the episode ended by itself, else
    "max_turns", "token_budget" or "error"; error: for "error", the exception that ended it
    (trainers leave such trajectories out of the loss).
    Model inputs: image_grid_thw (one grid per image of `images`), pixel_values (the processor's
    patches for them, or None: `Policy.collate` recomputes them from the images), temperature
    (log-probs are of the temperature-scaled distribution; 1.0 for greedy decoding).
    timings: the engine's seconds spent on the episode (generate_s, env_s, render_s).
    usage: what a chat backend counted for the episode (a served model: requests, attempts,
    unanswered, prompt/completion tokens, latency; `agents.served.usage_metrics`); {} otherwise.
    """

    task_id: str
    group_id: str
    category: str
    prompt_text: str
    prompt_images: tuple[Image.Image, ...]
    turns: tuple[Turn, ...]
    success: bool = False
    answer: str | None = None
    reward_components: dict[str, float] = field(default_factory=dict)
    used_ops: tuple[str, ...] = ()
    num_tool_calls: int = 0
    num_failed_calls: int = 0
    truncation: str = ""
    error: str = ""
    judge: dict[str, Any] = field(default_factory=dict)
    prompt_ids: tuple[int, ...] = ()
    image_grid_thw: list[list[int]] = field(default_factory=list)
    pixel_values: Any = None  # a torch.Tensor of every image's patches, or None
    temperature: float = 1.0
    sample_index: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)

    # -- the episode ------------------------------------------------------------------------------

    @property
    def reward(self) -> float:
        """The episode's shaped reward: the sum of its steps' rewards."""
        return float(sum(turn.reward for turn in self.turns))

    @property
    def turn_rewards(self) -> list[float]:
        return [turn.reward for turn in self.turns]

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def turn_ops(self) -> list[list[str]]:
        return [list(turn.ops) for turn in self.turns]

    @property
    def truncated(self) -> bool:
        return bool(self.truncation)

    @cached_property
    def images(self) -> list[Image.Image]:
        """The images whose placeholders are in `token_ids`, in order (what the model saw)."""
        shown = list(self.prompt_images)
        for turn in self.turns:
            if turn.reply_shown:
                shown.extend(turn.reply_images)
        return shown

    # -- tokens (derived) ---------------------------------------------------------------------------

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @cached_property
    def token_ids(self) -> list[int]:
        ids = list(self.prompt_ids)
        for turn in self.turns:
            ids += turn.sampled_ids
            ids += turn.context_ids
        return ids

    @cached_property
    def loss_mask(self) -> list[int]:
        mask = [0] * len(self.prompt_ids)
        for turn in self.turns:
            mask += [1] * len(turn.sampled_ids)
            mask += [0] * len(turn.context_ids)
        return mask

    @cached_property
    def sampler_logprobs(self) -> list[float]:
        logprobs = [0.0] * len(self.prompt_ids)
        for turn in self.turns:
            logprobs += turn.logprobs
            logprobs += [0.0] * len(turn.context_ids)
        return logprobs

    @cached_property
    def turn_ends(self) -> list[int]:
        """Index of the last sampled token of each turn (where its reward goes)."""
        ends, position = [], len(self.prompt_ids)
        for turn in self.turns:
            position += len(turn.sampled_ids)
            ends.append(position - 1)
            position += len(turn.context_ids)
        return ends

    @cached_property
    def token_rewards(self) -> list[float]:
        """Each turn's reward on its last sampled token, 0 elsewhere."""
        rewards = [0.0] * len(self.token_ids)
        for end, turn in zip(self.turn_ends, self.turns):
            if end >= 0:
                rewards[end] += turn.reward
        return rewards

    @property
    def num_sampled_tokens(self) -> int:
        return sum(len(turn.sampled_ids) for turn in self.turns)

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TrajectoryGroup:
    """The rollouts of one prompt, compared with each other (GRPO's group).

    group_terms_G: each trajectory's group term (beta x tool necessity, `cv_env.reward`), 0 when off.
    """

    trajectories_G: tuple[Trajectory, ...]
    group_terms_G: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.group_terms_G) != len(self.trajectories_G):
            raise ValueError(f"got {len(self.group_terms_G)} group terms for {len(self.trajectories_G)} trajectories: "
                             "give one per trajectory")

    @property
    def rewards_G(self) -> list[float]:
        """The rewards the update uses: each trajectory's shaped reward plus its group term."""
        return [t.reward + term for t, term in zip(self.trajectories_G, self.group_terms_G)]

    def __len__(self) -> int:
        return len(self.trajectories_G)


def flatten_groups(groups: Sequence[TrajectoryGroup]) -> list[Trajectory]:
    """The trajectories of `groups`, group after group (the `G` order of `rewards_G` tensors)."""
    return [t for group in groups for t in group.trajectories_G]
