"""What a checkpoint's chat template supports, probed when it loads, and how the gaps are filled.

Qwen-VL checkpoints ship different chat templates for one text format (ChatML turns, Hermes tool
calls). Probed on the real templates (tests/test_real_templates.py):

    template             tools block  assistant tool_calls  tool message            pre-fill      history
    Qwen2-VL, Qwen2.5-VL no           dropped               <|im_start|>tool (role)  none          kept
    Qwen3-VL-Instruct    yes          Hermes text           <tool_response> in user  none          kept
    Qwen3-VL-Thinking    yes          Hermes text           <tool_response> in user  "<think>\\n"   rewritten
    codevision (ours)    yes          Hermes text           <tool_response> in user  none          kept

`probe_template(raw_renderer(processor), mark)` finds this out by rendering small probe
conversations, and refuses (`TemplateError`) a template whose assistant turns it cannot find.
`fill_messages` then fills each gap the way these families were trained (Qwen's Hermes tool
format, which LLaMA-Factory's `qwen2_vl` template and so the CodeVision SFT recipe use):

* no tools block: the Hermes tools block is appended to the system message;
* assistant `tool_calls` become `<tool_call>` text in the content under every template (it is the
  text the env parses; where a template renders tool calls itself, its text is this one);
* tool replies, `tool_response_format="codevision"` (the CodeVision SFT layout): a user turn
  wrapped in `<tool_response>\\n…\\n</tool_response>`; "default": the template's own rendering of
  a tool message, the codevision layout where it has none.

Assistant turns are never left to the template: `agents.conversation.ChatRenderer` writes each
as the template's header, the turn's text verbatim (pre-fill included) and the template's
closing, so a template that rewrites history (Qwen3-VL-Thinking re-spaces thinking and drops it
from turns before the last question) cannot change what the model sampled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from cv_env.protocol import TOOL_NAME, TOOL_SCHEMA

TOOL_RESPONSE_FORMATS = ("default", "codevision")
# model.chat_template=<name> picks one of these files of the `agents` package.
BUILTIN_TEMPLATES = {"codevision": "chat_template.jinja"}

# Qwen's Hermes tools block (Qwen2.5 / Qwen3 templates, LLaMA-Factory's "qwen" tool format).
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
_REFUSAL_ADVICE = (
    "set model.chat_template=codevision (agents/chat_template.jinja: Qwen's own text format, extended "
    "token-exactly) or model.chat_template=<path of a .jinja file> whose render of a conversation cut after an "
    "assistant turn is a prefix of every longer render"
)


class TemplateError(ValueError):
    """A chat template that cannot be extended token-exactly (raised when it loads)."""

    def __init__(self, why: str):
        super().__init__(f"this chat template cannot be extended token-exactly: {why}. To train with it, "
                         f"{_REFUSAL_ADVICE}")


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template writes and supports (see the module docstring for the four Qwen-VL ones).

    header / closing: the text it writes before and after an assistant turn's text.
    prefill: what its generation prompt writes after the header (Qwen3-VL-Thinking: "<think>\\n");
    a sampled turn's text is the pre-fill plus the sampled text.
    empty_thinking: what it writes before the text of a final turn that has no thinking
    (Qwen3-VL-Thinking: "<think>\\n\\n</think>\\n\\n"; "" for the others).
    tools_block: it lists the `tools` schemas in the system turn.
    tool_calls: "hermes" (renders assistant `tool_calls` as our `<tool_call>` text), "other"
    (renders them some other way) or "dropped".
    tool_role: "tool_response" (renders a tool message inside `<tool_response>`), "generic" (as a
    turn of role "tool") or "none" (drops it or fails).
    rewrites_history: it renders some assistant turn other than as header + text + closing.
    """

    header: str
    prefill: str
    closing: str
    empty_thinking: str
    tools_block: bool
    tool_calls: str
    tool_role: str
    rewrites_history: bool

    @property
    def opens_think(self) -> bool:
        """The generation prompt opens a think block the model is to close (a thinking checkpoint)."""
        return "<think>" in self.prefill and "</think>" not in self.prefill

    def describe(self, tool_response_format: str, tools: bool = True) -> str:
        """One line for the start-up log: what the template does and what the renderer fills in."""
        tools_text = ("none shown" if not tools else "the template's own block" if self.tools_block
                      else "filled in: the Hermes block appended to the system message")
        calls = {"hermes": "the template's Hermes text (identical to ours)",
                 "other": "Hermes text in the content (the template's own form is not what the env parses)",
                 "dropped": "filled in: Hermes text in the content (the template drops tool_calls)"}[self.tool_calls]
        own = {"tool_response": "<tool_response> in a user turn", "generic": "a turn of role 'tool'",
               "none": "none"}[self.tool_role]
        if tool_response_format == "default" and self.tool_role != "none":
            replies = f"the template's own ({own})"
        else:
            replies = f"codevision layout (user turn, <tool_response>); the template's own: {own}"
        prefill = f"{self.prefill!r}" + (" (opens thinking: turns are scored with it; the system prompt does "
                                         "not ask for <think>)" if self.opens_think else "")
        history = "rewritten by the template; turns kept verbatim" if self.rewrites_history else "kept"
        return (f"chat template: tools: {tools_text}; tool calls: {calls}; tool replies: {replies}; "
                f"generation pre-fill: {prefill}; history: {history}; assistant turn = {self.header!r} + text + "
                f"{self.closing!r}")


# -- filling ----------------------------------------------------------------------------------------


def tools_block(tools: list[dict]) -> str:
    """Qwen's Hermes tools block listing `tools` (what Qwen3-VL's template writes into the system turn)."""
    return _TOOLS_INTRO + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + _TOOLS_OUTRO


def tool_call_text(tool_calls: list[dict]) -> str:
    """OpenAI-style `tool_calls` as Hermes text: one `<tool_call>\\n{json}\\n</tool_call>` per call."""
    texts = []
    for call in tool_calls:
        call = call.get("function", call) if isinstance(call, dict) else call
        if not isinstance(call, dict) or "name" not in call:
            raise ValueError(f"a tool call must be {{'function': {{'name': ..., 'arguments': ...}}}}, got {call!r}")
        arguments = call.get("arguments", {})
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        texts.append('<tool_call>\n{"name": ' + json.dumps(call["name"], ensure_ascii=False)
                     + ', "arguments": ' + arguments + "}\n</tool_call>")
    return "\n".join(texts)


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part if isinstance(part, str) else str(part.get("text", "")) for part in content
                   if isinstance(part, str) or part.get("type") == "text")


def fill_messages(messages: list[dict], support: TemplateSupport, tools: list[dict],
                  tool_response_format: str) -> tuple[list[dict], list[dict] | None]:
    """The messages to give the template, and its `tools` argument, with every gap filled.

    Assistant `tool_calls` become Hermes text in the content; tool messages become codevision
    user turns where `tool_response_format` or the template asks for it; without a tools block in
    the template, the schemas go into the system message (and the template gets no `tools`).
    """
    codevision_replies = tool_response_format == "codevision" or support.tool_role == "none"
    filled = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            text = message_text(message.get("content"))
            message = {"role": "assistant",
                       "content": text + ("\n" if text else "") + tool_call_text(message["tool_calls"])}
        elif role == "tool" and codevision_replies:
            message = {"role": "user", "content": _wrapped(message.get("content"))}
        filled.append(message)
    if not tools or support.tools_block:
        return filled, (list(tools) or None)
    block = tools_block(tools)
    if filled and filled[0].get("role") == "system":
        content = filled[0].get("content")
        if isinstance(content, list):
            content = [*content, {"type": "text", "text": "\n\n" + block}]
        else:
            content = message_text(content) + "\n\n" + block
        return [{**filled[0], "content": content}, *filled[1:]], None
    return [{"role": "system", "content": block}, *filled], None


def _wrapped(content: Any) -> list[dict]:
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    return [{"type": "text", "text": "<tool_response>\n"}, *parts, {"type": "text", "text": "\n</tool_response>"}]


def after_prefill(text: str, prefill: str) -> str | None:
    """What a model writes after the generation pre-fill, for a whole assistant turn `text`.

    None when `text` does not open with the pre-fill. A turn that opens with the pre-fill's tag
    but other spacing ("<think>R" for the pre-fill "<think>\\n") counts as opening with it.
    """
    if text.startswith(prefill):
        return text[len(prefill):]
    opening, stripped = prefill.strip(), text.lstrip()
    if opening and stripped.startswith(opening):
        return stripped[len(opening):].lstrip()
    return None


# -- probing ----------------------------------------------------------------------------------------

Render = Callable[..., str]  # render(messages, tools=None, add_generation_prompt=False) -> template text


def raw_renderer(processor) -> Render:
    """The processor's chat template as a plain function, nothing filled in."""
    def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
        return processor.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


def probe_template(render: Render, mark: str) -> TemplateSupport:
    """Probe a template (`render`: see `raw_renderer`) with small conversations.

    mark: a string no template or message contains, to find an assistant turn's text in a render.
    Raises `TemplateError` for a template whose generation prompt, assistant header or closing
    cannot be found: such a template cannot be extended token-exactly.
    """
    base = [{"role": "system", "content": [_text("SYSTEM")]}, {"role": "user", "content": [_text("QUESTION")]}]
    before = render(base)
    prompt = render(base, add_generation_prompt=True)
    if not prompt.startswith(before):
        raise TemplateError("its generation prompt re-renders the conversation before it")
    followed = render(base + [_assistant(mark), {"role": "user", "content": [_text("NEXT")]}])
    if mark not in followed:
        raise TemplateError("it does not render the text of an assistant message")
    if not followed.startswith(before):
        raise TemplateError("it re-renders earlier messages when new ones follow (an assistant turn changes how "
                            "the messages before it render)")
    header = followed[len(before):followed.index(mark)]
    tail = prompt[len(before):]
    if not header or not tail.startswith(header):
        raise TemplateError(f"its generation prompt {tail!r} does not start with the header {header!r} it writes "
                            "before an assistant turn")
    last = render(base + [_assistant(mark)])
    closing = last[last.index(mark) + len(mark):] if mark in last else ""
    if not closing:
        raise TemplateError("it writes nothing after an assistant turn: it has no end-of-turn token")
    if not followed[followed.index(mark) + len(mark):].startswith(closing):
        raise TemplateError("it ends an assistant turn differently when more messages follow")
    prefill = tail[len(header):]
    opening = last[len(before):last.index(mark)] if last.startswith(before) else ""
    return TemplateSupport(
        header=header, prefill=prefill, closing=closing,
        empty_thinking=opening[len(header):] if opening.startswith(header) else "",
        tools_block=_renders_tools(render, base, before),
        tool_calls=_tool_call_support(render, base, header + tool_call_text([_CALL]) + closing),
        tool_role=_tool_role(render, base, mark),
        rewrites_history=_rewrites_history(render, base, before + header, closing, prefill),
    )


_CALL = {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"code": "result = image"}}}


def _renders_tools(render: Render, base: list[dict], before: str) -> bool:
    try:
        with_tools = render(base, tools=[TOOL_SCHEMA])
    except Exception:  # a template may refuse tools outright (raise_exception)
        return False
    return with_tools != before and TOOL_NAME in with_tools


def _tool_call_support(render: Render, base: list[dict], hermes_turn: str) -> str:
    call_turn = {"role": "assistant", "content": "", "tool_calls": [_CALL]}
    try:
        text = render(base + [call_turn, {"role": "user", "content": [_text("NEXT")]}])
    except Exception:
        return "dropped"
    if hermes_turn in text:
        return "hermes"
    return "other" if TOOL_NAME in text else "dropped"


def _tool_role(render: Render, base: list[dict], mark: str) -> str:
    try:
        text = render(base + [_assistant(mark), {"role": "tool", "content": [_text("RESULT")]}])
    except Exception:
        return "none"
    reply = text[text.index(mark) + len(mark):] if mark in text else ""
    if "RESULT" not in reply:
        return "none"
    return "tool_response" if "<tool_response>" in reply else "generic"


def _rewrites_history(render: Render, base: list[dict], start: str, closing: str, prefill: str) -> bool:
    turns = (prefill + "reasoning</think>\nanswer", prefill + "reasoning without its end", "a plain answer")
    follow_ups = ([], [{"role": "user", "content": [_text("NEXT")]}], [{"role": "tool", "content": [_text("R")]}])
    for turn in turns:
        for after in follow_ups:
            try:
                text = render(base + [_assistant(turn)] + after)
            except Exception:
                continue  # a template without a tool role: probed apart
            if not text.startswith(start + turn + closing):
                return True
    return False


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def probe_conversation(prefill: str) -> list[dict]:
    """A two-image episode (tool call, tool reply with an image, tool reply without, answer) whose
    assistant turns open with `prefill` as sampled turns do: the conversation the renderer must
    extend token-exactly (`agents.conversation.ChatRenderer` checks it when it is made)."""
    image = Image.new("RGB", (28, 28), "white")
    call = tool_call_text([_CALL])
    return [
        {"role": "system", "content": [_text("SYSTEM")]},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image},
                                     _text("QUESTION")]},
        _assistant(prefill + "first</think>\n" + call),
        {"role": "tool", "content": [{"type": "image", "image": image}, _text("Image 2 created.")]},
        _assistant(prefill + "an unfinished thought " + call),
        {"role": "tool", "content": [_text("Error: no result.")]},
        _assistant(prefill + "done</think>\n<answer>1</answer>"),
    ]


# -- choosing a template ----------------------------------------------------------------------------


def resolve_chat_template(name_or_path: str) -> str:
    """The text of `model.chat_template`: a built-in name (`BUILTIN_TEMPLATES`) or a .jinja file."""
    if name_or_path in BUILTIN_TEMPLATES:
        return resources.files("agents").joinpath(BUILTIN_TEMPLATES[name_or_path]).read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model.chat_template={name_or_path!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
            "nor an existing file: give one of those names or the path of a .jinja file"
        )
    return path.read_text(encoding="utf-8")
