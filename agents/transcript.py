"""`Transcript`: one finished episode turn by turn, in readable form (for evaluation and the viewer).

A `Trajectory` is what a trainer needs (token ids, masks, log-probs); a `Transcript` is what a
person or a report needs: for every assistant turn its thinking, code or answer, the env's
reply (text, new images, error), whether the code ran, the ops it applied and the turn's reward,
plus the episode's task, final answer and reward components. Two ways to get one:

    transcript = play_transcript(env, OracleAgent(), task)          # scripted agents, no torch
    transcript = from_trajectory(trajectory, processor, task=task)  # model rollouts (decodes tokens)

`write_transcripts` / `read_transcripts` store them as JSONL with PNG images beside the file.
This module never imports torch: the scripted-agent path of `algos.evaluate` runs without it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from agents.jsonl import json_lines, safe_name
from cv_env.protocol import action_text, parse_turn
from cv_env.task import Task

__all__ = ["TurnRecord", "Transcript", "play_transcript", "from_trajectory", "write_transcripts", "read_transcripts"]

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.DOTALL)
_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.DOTALL)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


@dataclass
class TurnRecord:
    """One assistant turn and the env's reply to it.

    kind: "tool_call", "answer" or "invalid" (as `cv_env.protocol.parse_turn` reads the text).
    error: why an invalid turn could not be used ("" otherwise); the execution error, if any, is
    in `tool_text` (the env's reply starts with "Error:") and `tool_ok` is False.
    tool_ok: None when nothing ran (an answer, or a reply that was never shown).
    ops: ops the sandbox detected in this call's successful code; None when unknown (rebuilt
    from tokens, which do not record them).
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
    tool_images: list[Image.Image] = field(default_factory=list)
    tool_ok: bool | None = None
    ops: list[str] | None = None


@dataclass
class Transcript:
    """One episode, readable. `success` is answer correctness (apart from the shaped reward).

    variant / base_id: the robustness variant ("original", "rotate_90", ...) and the untouched
    task's id when the task came from `RobustnessWrapper`; else "" and the task id.
    used_ops: every op the episode's successful code applied (None when unknown).
    judge: the LLM judge's ruling on the answer (`info["judge"]`), {} when it was not asked.
    """

    task_id: str
    category: str
    question: str
    ground_truth: str
    answer: str | None
    success: bool
    reward: float
    reward_components: dict[str, float]
    input_images: list[Image.Image]
    turns: list[TurnRecord]
    num_tool_calls: int
    num_failed_calls: int
    used_ops: list[str] | None
    truncated: bool = False
    truncation: str = ""
    sample_index: int = 0
    agent: str = ""
    variant: str = ""
    base_id: str = ""
    judge: dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def to_json(self, image_paths: dict[str, list[str]] | None = None) -> dict[str, Any]:
        """A JSON-safe dict; images are referenced by the paths `write_transcripts` chose."""
        paths = image_paths or {}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("input_images", "turns")}
        out["input_images"] = list(paths.get("input", []))
        out["turns"] = []
        for i, turn in enumerate(self.turns):
            record = {f.name: getattr(turn, f.name) for f in fields(turn) if f.name != "tool_images"}
            record["tool_images"] = list(paths.get(f"turn{i}", []))
            out["turns"].append(record)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], base_dir: str | os.PathLike = ".") -> "Transcript":
        """Inverse of `to_json`; image paths are read relative to `base_dir`."""
        names = {f.name for f in fields(cls)}
        missing = sorted({"task_id", "turns", "success", "reward"} - set(data))
        if missing:
            raise ValueError(f"transcript record is missing field(s) {missing}: was it written by write_transcripts?")
        kwargs = {k: v for k, v in data.items() if k in names and k not in ("input_images", "turns")}
        turn_names = {f.name for f in fields(TurnRecord)}
        turns = [TurnRecord(**{k: v for k, v in t.items() if k in turn_names and k != "tool_images"},
                            tool_images=_load_images(t.get("tool_images", []), base_dir))
                 for t in data["turns"]]
        return cls(input_images=_load_images(data.get("input_images", []), base_dir), turns=turns, **kwargs)


def _load_images(paths: list[str], base_dir: str | os.PathLike) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(Path(base_dir) / path) as image:
            images.append(image.convert("RGB"))
    return images


def _robustness(task: Task | None) -> tuple[str, str]:
    if task is None:
        return "", ""
    info = task.extra.get("robustness") or {}
    return str(info.get("variant", "")), str(info.get("base_id", task.id))


def _turn_fields(text: str) -> dict[str, Any]:
    """What the assistant's text asks for, as the env parses it (never raises)."""
    parsed = parse_turn(text)
    think = _THINK.search(text)
    out: dict[str, Any] = {"text": text, "kind": parsed.kind, "thinking": think.group(1).strip() if think else ""}
    if parsed.kind == "tool_call":
        out.update(code=parsed.code, description=parsed.description, image_index=parsed.image_index)
    elif parsed.kind == "answer":
        out["answer"] = parsed.answer
    else:
        out["error"] = parsed.error
    return out


def _message_text(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _message_images(message: dict) -> list[Image.Image]:
    content = message.get("content", "")
    if isinstance(content, str):
        return []
    return [part["image"] for part in content if part.get("type") == "image"]


def play_transcript(env, agent, task: Task, seed: int | None = None, sample_index: int = 0,
                    agent_name: str = "") -> Transcript:
    """Play one episode of `task` in `env` (a CodeVision env, wrapped or not) with a scripted agent.

    The agent has `reset(task)` and `act(observation) -> str` (`agents.scripted`). Every step's
    reward, execution result and detected ops are recorded from the env's `info`.
    """
    obs, _ = env.reset(seed=seed, options={"task": task})
    core = env.unwrapped
    agent.reset(task)
    question = _message_text(core.messages[-1])
    input_images = _message_images(core.messages[-1])
    turns: list[TurnRecord] = []
    num_tool_calls = 0
    done = False
    info: dict[str, Any] = {}
    truncation = ""
    while not done:
        action = agent.act(obs)
        seen = len(core.messages)
        obs, reward, terminated, truncated, info = env.step(action)
        record = TurnRecord(reward=float(reward), **_turn_fields(action_text(action)))
        if "tool_ok" in info:
            num_tool_calls += 1
            record.tool_ok = bool(info["tool_ok"])
            record.ops = list(info.get("ops", [])) if record.tool_ok else []
            replies = [m for m in core.messages[seen:] if m.get("role") == "tool"]
            if replies:
                record.tool_text = _message_text(replies[-1])
                record.tool_images = _message_images(replies[-1])
        turns.append(record)
        done = terminated or truncated
        if truncated:
            truncation = "max_turns"
    variant, base_id = _robustness(task)
    return Transcript(
        task_id=task.id, category=task.category, question=question, ground_truth=task.answer,
        answer=info.get("answer"), success=bool(info.get("correct", False)),
        reward=float(sum(t.reward for t in turns)),
        reward_components={k: float(v) for k, v in info.get("reward_components", {}).items()},
        input_images=input_images, turns=turns, num_tool_calls=num_tool_calls,
        num_failed_calls=int(info.get("n_failed", 0)), used_ops=list(info.get("used_ops", [])),
        truncated=bool(truncation), truncation=truncation, sample_index=sample_index, agent=agent_name,
        variant=variant, base_id=base_id or task.id, judge=dict(info.get("judge", {})),
    )


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)


def _image_count(ids: list[int], image_token_id: int | None, vision_start_id: int | None) -> int:
    """Images whose placeholders lie in `ids` (one vision-start token each, else one pad run each)."""
    if vision_start_id is not None:
        return sum(1 for i in ids if i == vision_start_id)
    runs, previous = 0, None
    for i in ids:
        runs += i == image_token_id and previous != image_token_id
        previous = i
    return runs


def from_trajectory(trajectory, processor, task: Task | None = None, agent_name: str = "") -> Transcript:
    """Rebuild the readable episode from a `Trajectory`'s tokens with the policy's tokenizer.

    processor: the policy's processor or tokenizer (Qwen-style chat markers: `<|im_start|>`,
    `<tool_response>`, `<|vision_start|>`). Assistant turns are the sampled spans ending at
    `turn_ends`; the tokens between two turns are the env's reply, whose images are the next
    entries of `trajectory.images`. The question is the prompt's last user text, as the model saw
    it. task: the episode's task, for the ground truth and robustness variant (else unknown).
    The episode's `used_ops`, `num_failed_calls` and per-turn `turn_ops` come from the trajectory.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token_id = _token_id(tokenizer, "<|image_pad|>")
    vision_start_id = _token_id(tokenizer, "<|vision_start|>")
    end_ids = {i for i in (_token_id(tokenizer, "<|im_end|>"), _token_id(tokenizer, "<|endoftext|>")) if i is not None}
    ids, mask = list(trajectory.token_ids), list(trajectory.loss_mask)

    def decode(span: list[int]) -> str:
        return tokenizer.decode([i for i in span if i != image_token_id], skip_special_tokens=False)

    prompt = ids[: trajectory.prompt_length]
    n_inputs = _image_count(prompt, image_token_id, vision_start_id)
    users = _USER_TURN.findall(decode(prompt))
    question = _SPECIAL.sub("", users[-1]).strip() if users else ""
    images = list(trajectory.images)
    turn_ops = trajectory.turn_ops
    next_image = n_inputs
    turns: list[TurnRecord] = []
    n_turns = len(trajectory.turn_ends)
    for i, end in enumerate(trajectory.turn_ends):
        start = end
        while start > 0 and mask[start - 1] == 1:
            start -= 1
        sampled = ids[start: end + 1]
        while sampled and sampled[-1] in end_ids:
            sampled = sampled[:-1]
        text = tokenizer.decode(sampled, skip_special_tokens=False)
        record = TurnRecord(reward=float(trajectory.turn_rewards[i]), **_turn_fields(text))
        reply_end = len(ids)
        if i + 1 < n_turns:
            reply_end = trajectory.turn_ends[i + 1]
            while reply_end > 0 and mask[reply_end - 1] == 1:
                reply_end -= 1
        reply = ids[end + 1: reply_end]
        replies = _TOOL_RESPONSE.findall(decode(reply))
        if replies:
            record.tool_text = _SPECIAL.sub("", replies[-1]).strip()
            record.tool_ok = not record.tool_text.startswith("Error:")
            count = _image_count(reply, image_token_id, vision_start_id)
            record.tool_images = images[next_image: next_image + count]
            next_image += count
        if i < len(turn_ops):
            record.ops = list(turn_ops[i])
        turns.append(record)
    used_ops, failed = trajectory.used_ops, trajectory.num_failed_calls
    variant, base_id = _robustness(task)
    return Transcript(
        task_id=trajectory.task_id, category=trajectory.category,
        question=question or (task.question if task is not None else ""),
        ground_truth=task.answer if task is not None else "",
        answer=trajectory.answer, success=bool(trajectory.success), reward=float(trajectory.reward),
        reward_components={k: float(v) for k, v in trajectory.reward_components.items()},
        input_images=images[:n_inputs], turns=turns, num_tool_calls=int(trajectory.num_tool_calls),
        num_failed_calls=int(failed), used_ops=sorted(used_ops) if used_ops is not None else None,
        truncated=bool(trajectory.truncated), truncation=trajectory.truncation,
        sample_index=int(trajectory.sample_index), agent=agent_name, variant=variant,
        base_id=base_id or trajectory.task_id, judge=dict(trajectory.judge),
    )


def write_transcripts(transcripts: Iterable[Transcript], path: str | os.PathLike, image_dir: str | None = None) -> Path:
    """Write one JSON line per transcript to `path` (appending); images go to PNGs beside it.

    image_dir: folder for the PNGs, relative to the JSONL's folder (default "<stem>_images").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = image_dir or f"{path.stem}_images"
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for transcript in transcripts:
            stem = safe_name(f"{transcript.agent}-{transcript.task_id}-{transcript.sample_index}")
            groups = {"input": transcript.input_images}
            groups.update({f"turn{i}": t.tool_images for i, t in enumerate(transcript.turns)})
            paths: dict[str, list[str]] = {}
            for key, group in groups.items():
                paths[key] = []
                for j, image in enumerate(group):
                    relative = f"{image_dir}/{stem}-{key}-{j}.png"
                    image.save(path.parent / relative)
                    paths[key].append(relative)
            f.write(json.dumps(transcript.to_json(paths), ensure_ascii=False) + "\n")
    return path


def read_transcripts(path: str | os.PathLike) -> list[Transcript]:
    """Read the transcripts `write_transcripts` wrote (images loaded from their PNG files)."""
    path = Path(path)
    return [Transcript.from_json(data, base_dir=path.parent) for data in json_lines(path)]
