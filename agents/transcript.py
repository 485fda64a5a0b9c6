"""`Transcript`: a readable view of a `Trajectory` (for evaluation reports and the viewer).

A `Trajectory` already holds every turn's text and the env's reply; a transcript adds what a
person reading it needs: each turn parsed the way the env parsed it (its thinking, code or
answer, the error of a malformed turn) and the task's context (ground truth, robustness
variant, which agent played). No token is decoded: nothing here depends on a tokenizer.

    transcript = Transcript.of(trajectory, task=task, agent="oracle")
    write_jsonl(transcripts, path); read_transcripts(path)    # agents.jsonl

This module never imports torch: the scripted-agent path of `algos.evaluate` runs without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from agents.jsonl import json_lines, trajectory_from_json
from agents.trajectory import Trajectory, Turn
from cv_env.protocol import parse_turn
from cv_env.task import Task

__all__ = ["TurnRecord", "Transcript", "read_transcripts"]

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


@dataclass(frozen=True)
class TurnRecord:
    """One assistant turn as a reader sees it.

    kind: "tool_call", "answer" or "invalid" (as `cv_env.protocol.parse_turn` reads the text).
    error: why an invalid turn could not be used ("" otherwise); the execution error, if any, is
    in `tool_text` (the env's reply starts with "Error:") and `tool_ok` is False.
    tool_ok: None when nothing ran (an answer, or a turn that ended the episode).
    ops: ops the sandbox detected in this call's successful code.
    """

    text: str
    kind: str
    reward: float
    thinking: str = ""
    code: str = ""
    description: str = ""
    image_index: int | None = None
    answer: str | None = None
    error: str = ""
    tool_text: str = ""
    tool_images: tuple[Image.Image, ...] = ()
    tool_ok: bool | None = None
    ops: list[str] | None = None

    @classmethod
    def of(cls, turn: Turn) -> "TurnRecord":
        parsed = parse_turn(turn.action)
        think = _THINK.search(turn.action)
        fields: dict[str, Any] = {"thinking": think.group(1).strip() if think else ""}
        if parsed.kind == "tool_call":
            fields.update(code=parsed.code, description=parsed.description, image_index=parsed.image_index)
        elif parsed.kind == "answer":
            fields["answer"] = parsed.answer
        else:
            fields["error"] = parsed.error
        return cls(text=turn.action, kind=parsed.kind, reward=float(turn.reward), tool_text=turn.reply_text,
                   tool_images=turn.reply_images, tool_ok=turn.tool_ok, ops=list(turn.ops), **fields)


@dataclass(frozen=True, eq=False)
class Transcript:
    """One episode, readable: a trajectory and its task's context.

    ground_truth: the task's answer ("" when the task is unknown). agent: who played it.
    variant / base_id: the robustness variant ("original", "rotate_90", ...) and the untouched
    task's id when the task came from `RobustnessWrapper`; else "" and the task id.
    Every field of the trajectory reads through (`success`, `reward`, `used_ops`, ...).
    """

    trajectory: Trajectory
    ground_truth: str = ""
    agent: str = ""
    variant: str = ""
    base_id: str = ""

    @classmethod
    def of(cls, trajectory: Trajectory, task: Task | None = None, agent: str = "") -> "Transcript":
        """The transcript of `trajectory`; `task` (the caller's record of it) gives the ground truth."""
        variant, base_id = "", trajectory.task_id
        if task is not None:
            robustness = task.extra.get("robustness") or {}
            variant, base_id = str(robustness.get("variant", "")), str(robustness.get("base_id", task.id))
        return cls(trajectory, task.answer if task is not None else "", agent, variant, base_id or trajectory.task_id)

    def __getattr__(self, name: str) -> Any:
        if name == "trajectory":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.trajectory, name)

    @property
    def question(self) -> str:
        return self.trajectory.prompt_text

    @property
    def input_images(self) -> list[Image.Image]:
        return list(self.trajectory.prompt_images)

    @property
    def turns(self) -> list[TurnRecord]:
        return [TurnRecord.of(turn) for turn in self.trajectory.turns]

    @property
    def used_ops(self) -> list[str]:
        return sorted(self.trajectory.used_ops)

    def context(self) -> dict[str, str]:
        """What a transcript record adds to its trajectory's (`agents.jsonl.write_jsonl`)."""
        return {"ground_truth": self.ground_truth, "agent": self.agent, "variant": self.variant,
                "base_id": self.base_id}


def read_transcripts(path: str | os.PathLike) -> list[Transcript]:
    """Read the transcripts `agents.jsonl.write_jsonl` wrote (images loaded from their PNG files)."""
    path = Path(path)
    return [Transcript(trajectory_from_json(data, base_dir=path.parent), str(data.get("ground_truth", "")),
                       str(data.get("agent", "")), str(data.get("variant", "")), str(data.get("base_id", "")))
            for data in json_lines(path)]
