"""The tool protocol: the schema of `code_image_tool`, the prompts, and turn parsing.

A model's turn is a string: `<think>…</think>` then either one Hermes-style tool call

    <tool_call>{"name": "code_image_tool", "arguments": {"code": "...", "image_index": 0}}</tool_call>

(arguments as an object or as a JSON string; a fenced ```python block is accepted too) or a
final `<answer>…</answer>`. `parse_turn` turns it into a `Turn`; it never raises on model
output, and its time is linear in the turn's length: what it cannot use becomes a `Turn` of
kind "invalid" whose `error` the model reads. Programmatic agents may pass a dict instead
(`parse_action`); what is inside the dict counts as model output too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from cv_env.tags import blocks

TOOL_NAME = "code_image_tool"

TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": (
            "Run Python code on one of the conversation's images. The selected image is available "
            "as `image` (also `img`), all images as `images`. PIL (Image, ImageOps, ImageEnhance, "
            "ImageFilter, ImageDraw), numpy as np, cv2 and math are available. Assign the processed "
            "image (a PIL image or an HxW / HxWx3 uint8 array) to `result`; print() output is "
            "returned too. No files, no network."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Python code that assigns the output image to `result`."},
                "description": {"type": "string", "description": "One line: what the code does and why."},
                "image_index": {"type": "integer", "description": "Which image to process: 0 is the first input image; each tool output gets the next index."},
            },
            "required": ["code"],
        },
    },
}

SYSTEM_PROMPT = """You answer questions about images. You can look closer by writing Python code that processes an image: rotate or flip it to fix its orientation, crop the region that matters, or enhance contrast, brightness or sharpness.

In every turn, first reason inside <think> </think>. Then do exactly one of:
- call the tool once:
<tool_call>
{"name": "code_image_tool", "arguments": {"code": "result = image.rotate(90, expand=True)", "description": "fix the orientation", "image_index": 0}}
</tool_call>
- or give the final answer: <answer>your answer</answer>

The tool's reply shows the new image and its index. Coordinates are pixels of the image you process, at the size the reply states. Use the tool only when it helps, and answer as soon as you can."""

# A short prompt for small models and tight context budgets (the CPU learning run, issue 9): the
# same protocol shown by one example, without the template's tool-schema block. With the
# test-size BPE tokenizer it is ~150 tokens where "full" is ~750.
COMPACT_SYSTEM_PROMPT = """Answer the question about the image. First reason inside <think> </think>. Then either call the tool, which runs Python on an image (`image`; PIL, cv2, numpy; assign the output image to `result`):
<tool_call>
{"name": "code_image_tool", "arguments": {"code": "result = image.rotate(90, expand=True)", "image_index": 0}}
</tool_call>
or give the final answer: <answer>your answer</answer>"""


@dataclass(frozen=True)
class Prompt:
    """What the model is told before the task: the system message and the tool schemas that
    the chat template lists in the system turn (none: the message alone describes the tool)."""

    system: str
    tools: tuple[dict[str, Any], ...]


# For checkpoints whose chat template opens the think block itself (Qwen3-VL-Thinking's generation
# prompt ends with "<think>\n"): the same protocol, without asking the model to write <think>.
THINKING_SYSTEM_PROMPT = SYSTEM_PROMPT.replace(
    "In every turn, first reason inside <think> </think>. Then do exactly one of:",
    "Every turn starts inside a <think> block that is already open: reason there and close it with </think>. "
    "Then do exactly one of:")
COMPACT_THINKING_SYSTEM_PROMPT = COMPACT_SYSTEM_PROMPT.replace(
    "First reason inside <think> </think>. Then either",
    "Your turn starts inside an open <think> block: reason, close it with </think>, then either")

PROMPTS: dict[str, Prompt] = {
    "full": Prompt(SYSTEM_PROMPT, (TOOL_SCHEMA,)),  # the instructions plus the schema (Qwen's tool format)
    "compact": Prompt(COMPACT_SYSTEM_PROMPT, ()),  # ~5x fewer tokens: one example call, no schema block
    "full_thinking": Prompt(THINKING_SYSTEM_PROMPT, (TOOL_SCHEMA,)),  # "full" for a template that opens <think>
    "compact_thinking": Prompt(COMPACT_THINKING_SYSTEM_PROMPT, ()),  # "compact" for a template that opens <think>
}


def get_prompt(name: str) -> Prompt:
    """The prompt preset `name` ("full" or "compact"); a clear error for any other name."""
    try:
        return PROMPTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prompt {name!r}: use one of {', '.join(PROMPTS)}") from None


def thinking_prompt(name: str) -> str:
    """The preset to show instead of `name` when the chat template opens <think> itself."""
    get_prompt(name)
    return name if name.endswith("_thinking") else f"{name}_thinking"


# Fenced code: ```python ... ``` (or ```py / bare ```), the form that needs no JSON escaping.
# Linear: each opening fence but the last closes the block before it, so at most one lazy scan
# runs on to the end of the text (unlike `<answer>` tags, where every opening tag can).
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_IMAGE_INDEX_HINT = re.compile(r"image_index\s*[=:]\s*(\d+)")
_MAX_IMAGE_INDEX = 10**9


@dataclass(frozen=True)
class Turn:
    """What a model turn asks for.

    kind: "tool_call" (code to run), "answer" (ends the episode), or "invalid" (neither,
    or a tool call that could not be read; `error` says why).
    """

    kind: Literal["tool_call", "answer", "invalid"]
    code: str = ""
    image_index: int = 0
    description: str = ""
    answer: str = ""
    error: str = ""
    notes: tuple[str, ...] = ()  # non-fatal remarks for the model (extra calls ignored, ...)


def _loads_lenient(text: str) -> Any:
    """json.loads that also accepts raw newlines/tabs inside strings (a common model slip)."""
    return json.loads(text, strict=False)


def _json_problem(exc: ValueError | RecursionError) -> str:
    """What was wrong with a JSON text, in words (the decoder's message and position when it has one)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return str(exc)[:200]  # e.g. an integer with more digits than Python converts


def preview(value: Any, limit: int = 60) -> str:
    """A short repr of a model-supplied value for a message; never raises, whatever the value."""
    try:
        text = repr(value)
    except Exception:  # an int past Python's digit limit, a nesting too deep, a failing __repr__
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _arguments_from_call(payload: str) -> tuple[dict | None, str]:
    """Parse the body of one <tool_call> block into its arguments, or explain the problem."""
    body = payload.strip()
    fenced = _FENCE.search(body)
    if body.startswith("```") and fenced:  # <tool_call>```python ...```</tool_call>
        return {"code": fenced.group(1)}, ""
    try:
        call = _loads_lenient(body)
    except (ValueError, RecursionError) as exc:
        if fenced:
            return {"code": fenced.group(1)}, ""
        return None, (
            f"the tool call is not valid JSON ({_json_problem(exc)}). "
            'Write {"name": "code_image_tool", "arguments": {"code": "...", "image_index": 0}}, '
            "or put the code in a ```python block."
        )
    if not isinstance(call, dict):
        return None, "the tool call must be a JSON object with \"name\" and \"arguments\"."
    name = call.get("name", TOOL_NAME)
    if name != TOOL_NAME:
        return None, f"unknown tool {preview(name)}: the only tool is {TOOL_NAME!r}."
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = _loads_lenient(arguments)
        except (ValueError, RecursionError) as exc:
            return None, f"the tool call's \"arguments\" string is not valid JSON ({_json_problem(exc)})."
    if not isinstance(arguments, dict):
        return None, "the tool call's \"arguments\" must be an object with \"code\"."
    return arguments, ""


def _image_index(value: Any) -> int | None:
    """The image index a model wrote (an int, or a string of ASCII digits), or None when it is
    none or absurdly large (no episode has a billion images)."""
    if isinstance(value, str):
        value = value.strip()
        # isascii: "²" and other Unicode digits pass isdigit() but are no numbers for int()
        if not (value.isascii() and value.isdigit() and len(value) <= 9):
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _MAX_IMAGE_INDEX:
        return None
    return int(value)


def _turn_from_arguments(arguments: dict, notes: tuple[str, ...] = ()) -> Turn:
    code = arguments.get("code")
    if not isinstance(code, str) or not code.strip():
        return Turn("invalid", error="the tool call has no \"code\" string to run.", notes=notes)
    raw_index = arguments.get("image_index", 0)
    index = _image_index(raw_index)
    if index is None:
        return Turn("invalid", notes=notes, error=(
            f"\"image_index\" must be an integer: the number of an image (0 for the first), got {preview(raw_index)}."))
    description = arguments.get("description", "")
    return Turn("tool_call", code=code, image_index=index,
                description=description if isinstance(description, str) else preview(description, 500), notes=notes)


def parse_turn(text: str) -> Turn:
    """Parse a model turn (see the module docstring). Never raises on model output."""
    calls = blocks(text, "tool_call", open_ended=True)
    answers = blocks(text, "answer")
    if calls:
        notes: list[str] = []
        if len(calls) > 1:
            notes.append(f"only one tool call runs per turn: the first ran, the other {len(calls) - 1} did not.")
        if answers:
            notes.append("an <answer> in the same turn as a tool call is ignored: answer after you see the result.")
        arguments, error = _arguments_from_call(calls[0])
        if arguments is None:
            return Turn("invalid", error=error, notes=tuple(notes))
        return _turn_from_arguments(arguments, tuple(notes))
    if answers:
        return Turn("answer", answer=answers[-1].strip())
    fenced = _FENCE.findall(text)
    if fenced:
        notes = ()
        if len(fenced) > 1:
            notes = (f"only one code block runs per turn: the first ran, the other {len(fenced) - 1} did not.",)
        hint = _IMAGE_INDEX_HINT.search(text.split("```", 1)[0])
        return _turn_from_arguments({"code": fenced[0], "image_index": hint.group(1) if hint else 0}, notes)
    return Turn("invalid", error="the turn has neither a tool call nor an <answer>.")


ACTION_KEYS = ("code", "image_index", "description", "answer")


@dataclass(frozen=True)
class EndEpisode:
    """The action an agent sends to end a running episode without a model turn.

    For agents that stop for their own reasons (a rollout's token budget ran out, the turn
    could not be rendered): `env.step(EndEpisode("token_budget"))` settles the episode as the
    turn limit does (the outcome and episode terms that earlier steps did not pay) and returns
    it truncated, with `info["truncation"] == reason`. A model can never send it: it is not a
    str or a dict.
    """

    reason: str = "agent"


def parse_action(action: Any) -> Turn:
    """Turn an env action (a model's string, or a dict from a programmatic agent) into a `Turn`.

    Only an action that is neither a str nor a dict raises (TypeError: a programming error of
    the caller). Everything inside a dict is taken as model output, since agents pass a model's
    function-call arguments on as they come: `{"code": ...}` (with optional `image_index` and
    `description`) is a tool call, `{"answer": ...}` an answer (any value, read as text); keys
    outside `ACTION_KEYS` are ignored with a note, an `answer` next to `code` is ignored as in
    a string turn, and a dict with neither is an invalid turn whose error names its keys.
    """
    if isinstance(action, str):
        return parse_turn(action)
    if not isinstance(action, dict):
        raise TypeError(
            f"action must be a str (the model's turn) or a dict ({{'code': ...}} or {{'answer': ...}}), "
            f"got {type(action).__name__}"
        )
    unknown = [key for key in action if key not in ACTION_KEYS]
    notes = []
    if unknown:
        notes.append(f"unknown key(s) ignored: {preview(unknown, 200)}; an action has {', '.join(ACTION_KEYS)}.")
    if "code" in action:
        if "answer" in action:
            notes.append("an 'answer' in the same action as 'code' is ignored: answer after you see the result.")
        return _turn_from_arguments(action, tuple(notes))
    if "answer" in action:
        return Turn("answer", answer=_as_text(action["answer"]).strip(), notes=tuple(notes))
    return Turn("invalid", notes=tuple(notes), error=(
        f"the action has neither 'code' (a tool call) nor 'answer', got key(s) {preview(list(action), 200)}. "
        "Send {'code': ..., 'image_index': 0} or {'answer': ...}."))


def _as_text(value: Any) -> str:
    """A dict action's answer as text: strings as they are, anything else by str() (never raises)."""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:  # an int past Python's digit limit, a failing __str__
        return ""


def action_text(action: str | dict, turn: Turn | None = None) -> str:
    """The assistant turn an action stands for, as text: a string as it is; a dict as the
    `<answer>` or the tool call it asks for, or (when it asks for neither) its short repr.
    turn: `parse_action(action)`, when the caller has it already."""
    if isinstance(action, str):
        return action
    turn = parse_action(action) if turn is None else turn
    if turn.kind == "answer":
        return f"<answer>{turn.answer}</answer>"
    if turn.kind == "tool_call":
        return render_tool_call(turn)
    return preview(action, 2000)


def assistant_message(action: str | dict, turn: Turn | None = None) -> dict[str, Any]:
    """The conversation entry for a turn: the raw text for string actions (token-exact view);
    a structured `tool_calls` entry for dict tool calls, so any chat template can render it."""
    if isinstance(action, str):
        return {"role": "assistant", "content": action}
    turn = parse_action(action) if turn is None else turn
    if turn.kind != "tool_call":
        return {"role": "assistant", "content": action_text(action, turn)}
    arguments = {"code": turn.code, "description": turn.description, "image_index": turn.image_index}
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": TOOL_NAME, "arguments": arguments}}]}


def render_tool_call(turn: Turn) -> str:
    """The Hermes-style text of a tool call (used to record dict actions in the conversation)."""
    arguments = {"code": turn.code, "description": turn.description, "image_index": turn.image_index}
    return "<tool_call>\n" + json.dumps({"name": TOOL_NAME, "arguments": arguments}) + "\n</tool_call>"
