"""SFT data: read demonstration files, render them token-exactly, mask all but the assistant tokens.

Accepted files (`.jsonl` / `.json` lines, or `.parquet`; a folder means every such file in it):

1. **Chat records** -- one conversation per record, in either spelling:

   OpenAI / Qwen messages::

       {"messages": [
           {"role": "system", "content": "..."},                                 # optional
           {"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                        {"type": "text", "text": "What is ...?"}]},
           {"role": "assistant", "content": "<think>...</think>\\n<tool_call>\\n{...}\\n</tool_call>"},
           {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Image 1 created ..."}]},
           {"role": "assistant", "content": "...", "tool_calls": [{"type": "function", "function":
               {"name": "code_image_tool", "arguments": {"code": "...", "image_index": 0}}}]},
           {"role": "assistant", "content": "<think>...</think>\\n<answer>13.2</answer>"}],
        "images": ["img/b.png"]}                                                  # optional

   ShareGPT (LLaMA-Factory; the CodeVision-SFT release)::

       {"conversations": [{"from": "human", "value": "<image>What is ...?"},
                          {"from": "gpt", "value": "<think>...</think><tool_call>...</tool_call>"},
                          {"from": "tool", "value": "<image>Here is the processed image."},
                          {"from": "gpt", "value": "...<answer>13.2</answer>"}],
        "images": ["img/a.png", "img/a_rot.png"], "system": "..."}                # system optional

   Roles: system, user (human), assistant (gpt, function_call), tool (observation). An image
   part is `{"type": "image", "image": X}` or `{"type": "image_url", "image_url": {"url": X}}`
   where X is a path (relative to the data file), raw bytes, a `data:image/...;base64,` URI or a
   `{"bytes": ..., "path": ...}` struct (the Hugging Face `datasets` image feature in parquet);
   an image part without X, or an `<image>` in text, takes the next entry of the record's
   `images` list, in order. In parquet, `messages` / `conversations` may also be a JSON string.

2. **Trajectory records** written by `python -m agents.collect` (oracle demonstrations) or by
   `agents.jsonl.write_jsonl`: token ids, loss mask and PNG images, used as they are. They
   must have been recorded with the tokenizer of the model being trained (`--model`).

A chat record is rendered exactly as a rollout sees the same conversation: the prompt with the
chat template (`agents.conversation.ChatRenderer`), then per assistant turn its text tokenized
on its own plus the end-of-turn token (loss mask 1: what the model must learn to write, the
`{% generation %}` span of the template), then the template delta of the tool/user messages
that follow (mask 0). Messages after the last assistant turn teach nothing and are dropped.
The system turn lists the tool schemas of the renderer (the env prompt preset's, as in RL; a
record's own `tools` field is ignored), and images larger than `max_pixels` are downscaled as the env shows them.
Under every chat template an assistant's `tool_calls` (and a ShareGPT `function_call`) train as
Hermes `<tool_call>` text, and tool replies render in the renderer's tool reply format, as in RL
(`agents.templates`). Under a template that pre-fills the turn's opening (Qwen3-VL-Thinking's
`<think>\\n`) each assistant turn must open with `<think>`, which then belongs to the prompt.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from agents.conversation import ChatRenderer, ImageTokenMismatch, message_images
from agents.templates import after_prefill, message_text, tool_call_text
from agents.jsonl import trajectory_from_json
from agents.trajectory import Trajectory, Turn
from cv_env.protocol import get_prompt

__all__ = [
    "SFTRecord",
    "read_records",
    "to_messages",
    "tokenize_conversation",
    "record_to_example",
    "SFTExamples",
    "build_examples",
    "micro_batches",
]

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "function_call": "assistant", "tool": "tool",
                   "observation": "tool", "function": "tool"}
_ROLES = ("system", "user", "assistant", "tool")
_IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class SFTRecord:
    """One raw record and where it came from (`source` is "file:line" for error messages)."""

    data: dict
    source: str
    base_dir: Path


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet") and p.is_file())
        if not files:
            raise FileNotFoundError(f"data folder {path} holds no .jsonl, .json or .parquet file")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist: give a .jsonl/.parquet file or a folder of them")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"data file {path} is not .jsonl, .json or .parquet: convert it to one of these")
    return [path]


def read_records(paths: Iterable[str | os.PathLike]) -> list[SFTRecord]:
    """Every record of the given files or folders, in order."""
    records: list[SFTRecord] = []
    for given in paths:
        for path in _data_files(Path(given).expanduser()):
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                for number, row in enumerate(pq.read_table(path).to_pylist()):
                    records.append(SFTRecord(row, f"{path}:row {number}", path.parent))
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if path.suffix == ".json" and text.lstrip().startswith("["):
                for number, row in enumerate(json.loads(text)):
                    records.append(SFTRecord(row, f"{path}:item {number}", path.parent))
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not a JSON line ({error.msg})") from error
                records.append(SFTRecord(row, f"{path}:{number}", path.parent))
    return records


# --------------------------------------------------------------------------------------------
# Chat records -> messages with PIL images
# --------------------------------------------------------------------------------------------


def _fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """RGB, downscaled (aspect kept) to at most `max_pixels`, as the env shows images."""
    image = image.convert("RGB")
    w, h = image.size
    if not max_pixels or w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    while size[0] * size[1] > max_pixels:
        size = (max(1, size[0] - 1), max(1, size[1] - 1))
    return image.resize(size, Image.Resampling.BICUBIC)


def _load_image(value: Any, base_dir: Path, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # datasets' image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _load_image(bytes(value["bytes"]), base_dir, where)
        if value.get("path"):
            return _load_image(value["path"], base_dir, where)
        if "url" in value:
            return _load_image(value["url"], base_dir, where)
        raise ValueError(f"{where}: image struct {sorted(value)} has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as image:
                return image.convert("RGB")
        except OSError as error:
            raise ValueError(f"{where}: image bytes are not a readable image ({error})") from error
    if isinstance(value, str):
        if value.startswith("data:image/"):
            try:
                return _load_image(base64.b64decode(value.split(",", 1)[1]), base_dir, where)
            except (IndexError, ValueError) as error:
                raise ValueError(f"{where}: malformed base64 image data URI ({error})") from error
        if value.startswith(("http://", "https://")):
            raise ValueError(f"{where}: image {value!r} is a URL; training reads no network: download the images "
                             "and give local paths")
        path = Path(value[len("file://"):] if value.startswith("file://") else value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} does not exist (paths are relative to the data file)")
        with Image.open(path) as image:
            return image.convert("RGB")
    raise ValueError(f"{where}: cannot read an image from a {type(value).__name__}: give a path, bytes, a data URI "
                     "or a {'bytes', 'path'} struct")


class _ImageQueue:
    """The record's `images` list, consumed in order by image parts without their own source."""

    def __init__(self, images: Sequence[Any] | None, base_dir: Path, where: str):
        self.images, self.base_dir, self.where, self.used = list(images or []), base_dir, where, 0

    def next(self) -> Image.Image:
        if self.used >= len(self.images):
            raise ValueError(f"{self.where}: more image placeholders than entries in the record's images list "
                             f"({len(self.images)}): every <image> or bare image part takes the next one")
        self.used += 1
        return _load_image(self.images[self.used - 1], self.base_dir, f"{self.where} images[{self.used - 1}]")

    def check_all_used(self) -> None:
        if self.used != len(self.images):
            raise ValueError(f"{self.where}: the record lists {len(self.images)} images but its messages place "
                             f"{self.used}: put one <image> (or image part) per image, in order")


def _text_parts(text: str, queue: _ImageQueue, max_pixels: int) -> list[dict] | str:
    if _IMAGE_TAG not in text:
        return text
    parts: list[dict] = []
    for k, piece in enumerate(text.split(_IMAGE_TAG)):
        if k:
            parts.append({"type": "image", "image": _fit_pixels(queue.next(), max_pixels)})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _content(content: Any, queue: _ImageQueue, max_pixels: int, where: str) -> Any:
    if content is None:
        return ""
    if isinstance(content, str):
        return _text_parts(content, queue, max_pixels)
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    parts: list[dict] = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict) or part.get("type") not in ("text", "image", "image_url"):
            raise ValueError(f"{where}: unsupported content part {str(part)[:80]!r}: use "
                             "{'type': 'text', 'text': ...} or {'type': 'image', 'image': ...}")
        if part["type"] == "text":
            expanded = _text_parts(str(part.get("text") or ""), queue, max_pixels)
            parts.extend([{"type": "text", "text": expanded}] if isinstance(expanded, str) else expanded)
            continue
        source = part.get("image") if part["type"] == "image" else (part.get("image_url") or {})
        if isinstance(source, dict) and part["type"] == "image_url":
            source = source.get("url")
        image = queue.next() if source in (None, "") else _load_image(source, queue.base_dir, where)
        parts.append({"type": "image", "image": _fit_pixels(image, max_pixels)})
    return parts


def _sharegpt_calls(value: Any, where: str) -> list[dict]:
    """A ShareGPT `function_call` value (`{"name": ..., "arguments": ...}` or a list of them, as JSON)
    as OpenAI-style tool calls."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: a function_call value must be JSON {{\"name\": ..., \"arguments\": ...}} "
                         f"(LLaMA-Factory's format): {error.msg}") from error
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(call, dict) and "name" in call for call in calls):
        raise ValueError(f"{where}: a function_call value must be one or more {{\"name\": ..., \"arguments\": ...}} "
                         f"objects, got {str(value)[:80]!r}")
    return [{"type": "function", "function": call} for call in calls]


def to_messages(record: SFTRecord, max_pixels: int = 1024 * 28 * 28, system_prompt: str = "env",
                prompt: str = "full") -> list[dict]:
    """The record's conversation as chat messages with PIL images (see the module doc for formats).

    system_prompt: "env" adds the system message of the env's prompt preset `prompt`
    (`cv_env.protocol.PROMPTS`) when the record has none, so SFT sees the prompt RL will show;
    "keep" leaves records as they are.
    """
    data, where = record.data, record.source
    if system_prompt not in ("env", "keep"):
        raise ValueError(f"system_prompt must be 'env' or 'keep', got {system_prompt!r}")
    queue = _ImageQueue(data.get("images"), record.base_dir, where)
    raw = data.get("messages", data.get("conversations"))
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: a chat record needs a non-empty 'messages' or 'conversations' list "
                         f"(keys found: {sorted(data)})")
    messages: list[dict] = []
    if data.get("system"):
        messages.append({"role": "system", "content": str(data["system"])})
    for k, item in enumerate(raw):
        at = f"{where} message {k}"
        if not isinstance(item, dict):
            raise ValueError(f"{at}: a message must be an object, got {type(item).__name__}")
        if "from" in item:  # ShareGPT
            role = _SHAREGPT_ROLES.get(str(item["from"]))
            if role is None:
                raise ValueError(f"{at}: unknown ShareGPT speaker {item['from']!r}: use one of "
                                 f"{sorted(_SHAREGPT_ROLES)}")
            message = {"role": role, "content": item.get("value")}
            if item["from"] == "function_call":  # LLaMA-Factory: the value is the call(s) as JSON
                message = {"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(item.get("value"), at)}
        else:
            message = {key: value for key, value in item.items() if value is not None}
            if message.get("role") not in _ROLES:
                raise ValueError(f"{at}: role {message.get('role')!r} is not one of {', '.join(_ROLES)}")
        message["content"] = _content(message.get("content"), queue, max_pixels, at)
        if message["role"] == "assistant":
            if isinstance(message["content"], list):
                if any(p["type"] == "image" for p in message["content"]):
                    raise ValueError(f"{at}: an assistant message cannot hold images (the model writes text only)")
                message["content"] = "".join(p["text"] for p in message["content"])
            if isinstance(message.get("tool_calls"), str):
                message["tool_calls"] = json.loads(message["tool_calls"])
        messages.append(message)
    queue.check_all_used()
    if system_prompt == "env" and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": get_prompt(prompt).system}]})
    return messages


# --------------------------------------------------------------------------------------------
# Messages -> token ids and the assistant mask
# --------------------------------------------------------------------------------------------


def _assistant_ids(renderer: ChatRenderer, messages: list[dict], i: int, where: str) -> list[int]:
    """The ids a model writes for assistant message `i`: its rendered text after the generation
    prompt (and its pre-fill), then the end-of-turn token."""
    closing = renderer.support.closing
    before = renderer.render_text(messages[:i], add_generation_prompt=True)
    after = renderer.render_text(messages[:i + 1])
    if not after.startswith(before) or not after.endswith(closing):
        raise ValueError(f"{where}: the chat template does not render assistant message {i} as generation prompt + "
                         "text + end of turn, so its tokens cannot be isolated for the loss")
    text = after[len(before):len(after) - len(closing)]
    ids = renderer.tokenizer(text, add_special_tokens=False)["input_ids"] + renderer.closing_ids[:1]
    vision = set(renderer.tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    if vision & set(ids[:-1]):
        raise ValueError(f"{where}: assistant message {i} spells a vision token such as <|image_pad|>; a model never "
                         "writes those (the sampler suppresses them): remove it from the data")
    return ids


def _as_sampled(renderer: ChatRenderer, message: dict, i: int, where: str) -> dict:
    """Assistant message `i` with its tool calls as text, opening with the template's generation
    pre-fill (Qwen3-VL-Thinking's "<think>\\n") as a sampled turn does. A turn without thinking
    gets the empty think block such a template writes for one."""
    text = message_text(message.get("content"))
    if message.get("tool_calls"):
        text += ("\n" if text else "") + tool_call_text(message["tool_calls"])
    written = after_prefill(text, renderer.prefill)
    if written is None:
        written = after_prefill(renderer.support.empty_thinking + text, renderer.prefill)
    if written is None:
        raise ValueError(f"{where}: assistant message {i} does not open with {renderer.prefill.strip()!r}, which this "
                         f"chat template's generation prompt writes ({renderer.prefill!r}): start each assistant turn "
                         "with it, or train with another model.chat_template")
    return {"role": "assistant", "content": renderer.prefill + written}


def tokenize_conversation(renderer: ChatRenderer, messages: list[dict], example_id: str = "example",
                          category: str = "sft") -> Trajectory:
    """Render `messages` as a rollout would; loss mask 1 exactly on the assistant turns' tokens.

    An assistant turn's `tool_calls` train as Hermes `<tool_call>` text under every template, and
    each turn must render as many calls as it holds. Under a template that pre-fills the turn's
    opening, the opening is part of the prompt (mask 0), as when sampling.
    Returns a `Trajectory` (rewards 0) so `Policy.collate` batches it like a rollout.
    Raises ValueError when there is no assistant turn or the prompt does not precede it.
    """
    assistant_at = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not assistant_at:
        raise ValueError(f"{example_id}: the conversation has no assistant message: nothing to learn")
    if assistant_at[0] == 0 or all(m.get("role") == "system" for m in messages[:assistant_at[0]]):
        raise ValueError(f"{example_id}: the conversation starts with an assistant message: a user message must "
                         "come first")
    in_record = {i: message_text(messages[i].get("content")).count("<tool_call>")
                 + len(messages[i].get("tool_calls") or []) for i in assistant_at}
    messages = [_as_sampled(renderer, m, i, example_id) if i in assistant_at else m for i, m in enumerate(messages)]
    state = renderer.start(messages[:assistant_at[0]])
    calls: list[int] = []  # tool calls per assistant turn
    for k, i in enumerate(assistant_at):
        ids = _assistant_ids(renderer, messages, i, example_id)
        rendered, expected = renderer.tokenizer.decode(ids).count("<tool_call>"), in_record[i]
        if rendered != expected:
            raise ValueError(f"{example_id}: assistant message {i} holds {expected} tool call(s) but trains on "
                             f"{rendered}: the chat template rewrote the turn")
        calls.append(rendered)
        state.append_sampled(ids, [0.0] * len(ids))
        if k + 1 < len(assistant_at):
            renderer.extend(state, messages[:assistant_at[k + 1]])
        else:
            renderer.close_turn(state)
    prompt_ids, spans = state.turns()
    replies = [messages[i + 1:after] for i, after in zip(assistant_at, assistant_at[1:] + [len(messages)])]
    return Trajectory(
        task_id=example_id, group_id=example_id, category=category,
        prompt_text=message_text(messages[assistant_at[0] - 1].get("content")),
        prompt_images=tuple(message_images(messages[:assistant_at[0]])),
        turns=tuple(Turn(action=renderer.tokenizer.decode(sampled), reward=0.0, sampled_ids=sampled, logprobs=logprobs,
                         context_ids=context, reply_text="\n".join(message_text(m.get("content")) for m in reply),
                         reply_images=tuple(message_images(reply)), reply_shown=True,
                         tool_ok=True if n_calls else None)
                    for (sampled, logprobs, context), reply, n_calls in zip(spans, replies, calls)),
        success=True, num_tool_calls=sum(calls), prompt_ids=prompt_ids, image_grid_thw=[list(g) for g in state.image_grid_thw],
        pixel_values=state.all_pixel_values(), temperature=1.0,
    )


def _check_trajectory(renderer: ChatRenderer, trajectory: Trajectory, where: str) -> Trajectory:
    vocab = len(renderer.tokenizer)
    if not trajectory.token_ids or max(trajectory.token_ids) >= vocab or min(trajectory.token_ids) < 0:
        raise ValueError(f"{where}: token ids fall outside this tokenizer's {vocab} ids: the demonstrations were "
                         "recorded with another model's tokenizer; collect them again with --model <model.path>")
    start = renderer.tokenizer.convert_tokens_to_ids("<|im_start|>")
    if trajectory.token_ids[0] != start:
        raise ValueError(f"{where}: the record does not start with this tokenizer's <|im_start|> ({start}): it was "
                         "recorded with another model's tokenizer; collect it again with --model <model.path>")
    if sum(trajectory.loss_mask) == 0:
        raise ValueError(f"{where}: the trajectory has no assistant (loss-mask 1) token: nothing to learn")
    # Scored at temperature 1 like any demonstration, whatever the sampler used when recording.
    return replace(trajectory, temperature=1.0, pixel_values=None)


def record_to_example(renderer: ChatRenderer, record: SFTRecord, max_pixels: int = 1024 * 28 * 28,
                      system_prompt: str = "env", prompt: str = "full") -> Trajectory:
    """One record (chat or trajectory) as a tokenized, masked training example."""
    data = record.data
    if "turns" in data and "prompt_ids" in data:
        return _check_trajectory(renderer, trajectory_from_json(data, base_dir=record.base_dir), record.source)
    messages = to_messages(record, max_pixels=max_pixels, system_prompt=system_prompt, prompt=prompt)
    category = str(data.get("category") or "sft")
    return tokenize_conversation(renderer, messages, example_id=str(data.get("id") or record.source), category=category)


class SFTExamples(Sequence[Trajectory]):
    """The usable records of a data set, tokenized again on each access.

    Only the records (paths, or the compressed bytes parquet holds) and each example's length
    stay in memory: a data set of tens of thousands of multi-image conversations would not fit
    as decoded images and token lists, least of all once per rank. An accessed example carries
    its pixel patches, so `Policy.collate` does not process its images a second time.
    """

    def __init__(self, renderer: ChatRenderer, records: Sequence[SFTRecord], lengths: Sequence[int],
                 assistant_tokens: int, max_pixels: int, system_prompt: str, prompt: str = "full"):
        self.renderer, self.records, self.lengths = renderer, list(records), list(lengths)
        self.assistant_tokens, self.max_pixels = int(assistant_tokens), max_pixels
        self.system_prompt, self.prompt = system_prompt, prompt

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return record_to_example(self.renderer, self.records[index], max_pixels=self.max_pixels,
                                 system_prompt=self.system_prompt, prompt=self.prompt)


def build_examples(renderer: ChatRenderer, records: Sequence[SFTRecord], max_tokens: int,
                   max_pixels: int = 1024 * 28 * 28, system_prompt: str = "env", prompt: str = "full",
                   on_invalid: str = "raise") -> tuple[SFTExamples, dict[str, Any]]:
    """Tokenize every record once to check it and measure it; keep those within `max_tokens`
    (an image span cannot be cut, so a longer example is left out, not truncated). `prompt` is
    the env prompt preset whose system message `system_prompt="env"` adds; the renderer should
    list that preset's tools.

    on_invalid: "raise" stops at the first bad record (the message names file and line);
    "skip" leaves it out and counts it. Returns (examples, stats) where stats has `kept`,
    `too_long`, `invalid` and `errors` (the first few messages). Under `torchrun` each rank
    checks its share of the records and the results are exchanged.
    """
    from algos.distributed import get_rank, get_world_size
    from algos.distributed import gather_lists

    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    rank, world = get_rank(), get_world_size()
    results = []  # (record index, length or None, assistant tokens, error)
    for index in range(rank, len(records), world):
        try:
            example = record_to_example(renderer, records[index], max_pixels=max_pixels, system_prompt=system_prompt,
                                        prompt=prompt)
            results.append((index, len(example.token_ids), example.num_sampled_tokens, ""))
        except (ValueError, FileNotFoundError, ImageTokenMismatch, KeyError, TypeError) as error:
            results.append((index, None, 0, str(error) or type(error).__name__))
    results.sort(key=lambda r: r[0])
    results = sorted(gather_lists(results), key=lambda r: r[0])
    kept, lengths, assistant_tokens = [], [], 0
    stats: dict[str, Any] = {"kept": 0, "too_long": 0, "invalid": 0, "errors": []}
    for index, length, sampled, error in results:
        if length is None:
            if on_invalid == "raise":
                raise ValueError(f"bad SFT record ({error}); fix it, or set data.on_invalid=skip to leave such "
                                 "records out")
            stats["invalid"] += 1
            if len(stats["errors"]) < 5:
                stats["errors"].append(error)
        elif length > max_tokens:
            stats["too_long"] += 1
        else:
            kept.append(records[index])
            lengths.append(length)
            assistant_tokens += sampled
    stats["kept"] = len(kept)
    return SFTExamples(renderer, kept, lengths, assistant_tokens, max_pixels, system_prompt, prompt), stats


# --------------------------------------------------------------------------------------------
# Micro-batches
# --------------------------------------------------------------------------------------------


def micro_batches(indices: Sequence[int], lengths: Sequence[int], micro_batch_size: int,
                  max_tokens: int = 0) -> list[list[int]]:
    """Split one optimizer step's examples into micro-batches.

    max_tokens 0: consecutive chunks of `micro_batch_size` examples. max_tokens > 0 (packing):
    first-fit-decreasing bins whose padded size (rows x longest row) stays within `max_tokens`,
    so short examples share a forward pass and little compute goes to padding. Each example
    keeps its own row: attention and the multimodal rotary positions never cross examples.
    An example longer than `max_tokens` gets a bin of its own.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if max_tokens <= 0:
        return [list(indices[k:k + micro_batch_size]) for k in range(0, len(indices), micro_batch_size)]
    bins: list[list[int]] = []
    longest: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        for b, members in enumerate(bins):
            if (len(members) + 1) * max(longest[b], lengths[i]) <= max_tokens:
                members.append(i)
                longest[b] = max(longest[b], lengths[i])
                break
        else:
            bins.append([i])
            longest.append(lengths[i])
    return bins
