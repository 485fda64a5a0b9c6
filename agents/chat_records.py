"""Chat records: episodes as conversations that `algos.sft` renders with any student's template.

    write_chat_records([(chat_messages(trajectory), {"task_id": ..., "reward": ...})], "demos/teacher.jsonl")

One JSON line per episode: `{"messages": [...], **metadata}`, its images as PNG files beside the
file (`<stem>_images/`), referenced from the messages' image parts by relative path. This is the
"chat record" format `algos.sft_data` reads (OpenAI / Qwen messages): unlike a `Trajectory` file
it holds no token ids, so one set of demonstrations (say, from a served teacher) trains students
of any chat template. A leading system message is left out, so SFT shows the prompt preset it
trains with (`to_messages(system_prompt="env")`), as RL will.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from agents.jsonl import safe_name
from agents.trajectory import Trajectory
from cv_env.protocol import TOOL_NAME

__all__ = ["chat_messages", "write_chat_records"]


def _message(role: str, text: str, images) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "image", "image": image} for image in images]
            + [{"type": "text", "text": text}]}


def chat_messages(trajectory: Trajectory, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The episode's conversation as the env showed it, in chat format (images as PIL): the
    question with its images, then each turn's text and the env's reply to it (a tool message,
    as `agents.rollout.observation_message` builds it), preceded by `system_prompt` when given.
    A turn that ended the episode has no reply."""
    messages = [] if system_prompt is None else [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    messages.append(_message("user", trajectory.prompt_text, trajectory.prompt_images))
    for turn in trajectory.turns:
        messages.append({"role": "assistant", "content": turn.action})
        if turn.reply_text or turn.reply_images:
            messages.append({**_message("tool", turn.reply_text, turn.reply_images), "name": TOOL_NAME})
    return messages


def write_chat_records(records: Iterable[tuple[list[dict[str, Any]], dict[str, Any]]], path: str | os.PathLike,
                       image_dir: str | None = None) -> int:
    """Append each (messages, metadata) record to the JSONL `path`; return how many were written.

    messages: chat messages whose content is a string or parts (`{"type": "text"}` and
    `{"type": "image", "image": PIL}`); metadata: JSON-safe fields kept beside `messages`
    (`task_id` names the image files). image_dir: relative to the file's folder (default "<stem>_images").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = image_dir or f"{path.stem}_images"
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "a", encoding="utf-8") as f:
        for messages, metadata in records:
            stem = safe_name(f"{metadata.get('task_id', 'episode')}-{metadata.get('sample_index', 0)}")
            saved: list[dict[str, Any]] = []
            n_images = 0
            for message in messages:
                if message.get("role") == "system":
                    continue
                content = message.get("content")
                if isinstance(content, list):
                    parts = []
                    for part in content:
                        if part.get("type") == "image" and isinstance(part.get("image"), Image.Image):
                            relative = f"{image_dir}/{stem}-{n_images}.png"
                            part["image"].save(path.parent / relative)
                            part = {"type": "image", "image": relative}
                            n_images += 1
                        parts.append(part)
                    content = parts
                saved.append({**message, "content": content})
            f.write(json.dumps({"messages": saved, **metadata}, ensure_ascii=False) + "\n")
            count += 1
    return count
