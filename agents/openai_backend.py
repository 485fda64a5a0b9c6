"""`OpenAIBackend`: any model behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang,
`transformers serve`, a hosted API), for evaluation and demonstrations.

    backend = OpenAIBackend(OpenAIConfig(url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct"))
    RolloutEngine(backend, sandbox=sandbox).rollout(tasks)   # a chat backend of the episode loop
    messages = backend.system_messages(system_prompt, tools) + [user_message(question, images)]
    turn = backend.complete(messages)        # one request: a ServedTurn; turn.action is the env's action

Where a local backend (`agents.generation`) passes token ids, this one passes messages: images as
base64 PNG data URLs (the env's shown copies, already sized by its `max_pixels`), the tool schema
as `tools` (`tool_mode="native"`: the server's tool parser turns the model's calls into
`tool_calls`) or as the Hermes tools block in the system message (`tool_mode="prompt"`: for a
server without a tool parser for the model; the model writes `<tool_call>` text). Either form of
reply becomes the same action text (`reply_action`), so the env parses it as any model's turn;
a model's malformed call is the model's mistake, which the env answers with an observation.

**No token-exactness is claimed**: the server applies its own chat template and tokenizer, so
what it sampled is not known token by token. It is for evaluation and for demonstrations (SFT
data, rendered later with the student's own template), not for RL training.

Requests run with one deadline each, retries with backoff on timeouts, 429 and 5xx
(`cv_env.chat_client`); HTTP 401/403/404, and a 400 that refuses native tool calls, raise
`EndpointConfigError` at once, naming the fix;
any other failure raises `EndpointError`, which `respond` answers for its episode (the episode
ends unanswered, the run goes on). Each `ServedTurn` carries the token usage the server
reported and the request's latency; `respond` counts them per episode (`ChatRequest.usage`).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from agents.rollout import ChatRequest, Unanswered
from agents.templates import tool_call_text, tools_block
from cv_env.chat_client import ChatClient, EndpointError, api_key_from_env, config_from_mapping
from cv_env.protocol import TOOL_NAME, TOOL_SCHEMA

__all__ = ["OpenAIConfig", "OpenAIBackend", "ServedTurn", "EndpointConfigError", "EndpointDown", "EndpointError",
           "TOOL_MODES",
           "image_data_url", "user_message", "tool_reply_messages", "reply_action"]

TOOL_MODES = ("native", "prompt")
MODEL_PREFIX = "openai:"  # `model=openai:<name>` on the command line names a served model


@dataclass(frozen=True)
class OpenAIConfig:
    """Where the served model is and how to ask it (one request per assistant turn)."""

    url: str  # the endpoint's base, e.g. "http://127.0.0.1:8000/v1" (or the full .../chat/completions URL)
    model: str  # the model name the endpoint serves (its GET /v1/models lists them)
    api_key_env: str | None = None  # environment variable holding the API key (None: no auth)
    tool_mode: str = "native"  # native: schema as `tools`, replies' `tool_calls` | prompt: schema and calls as text
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass (1.0: off)
    top_k: int = 0  # 0: off (not sent); > 0 is sent as `top_k`, which vLLM and SGLang accept, OpenAI does not
    max_tokens: int = 1024  # the longest assistant turn
    timeout_s: float = 120.0  # deadline of one request, from connecting to the reply's last byte
    retries: int = 3  # extra attempts after a timeout, connection error, HTTP 429 or 5xx
    backoff_s: float = 1.0  # wait before retry k is backoff_s * 2**k, plus up to 50 % jitter (or Retry-After)
    max_concurrency: int = 8  # requests in flight at once (run_served plays batches of 8x this many episodes)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("the served model must be named: model=openai:<name the endpoint serves>")
        if self.tool_mode not in TOOL_MODES:
            raise ValueError(f"tool_mode {self.tool_mode!r} is not one of {', '.join(TOOL_MODES)}")
        checks = {"temperature": self.temperature >= 0, "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0,
                  "max_tokens": self.max_tokens >= 1, "timeout_s": self.timeout_s > 0, "retries": self.retries >= 0,
                  "backoff_s": self.backoff_s >= 0, "max_concurrency": self.max_concurrency >= 1}
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"served model {', '.join(bad)}: temperature, retries and backoff_s must be >= 0, "
                             "top_p in (0, 1], top_k >= 0, timeout_s > 0, max_tokens and max_concurrency >= 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OpenAIConfig":
        """Build from a mapping (e.g. a Hydra node); unknown keys raise a ValueError naming them."""
        return config_from_mapping(cls, d, "served-model option")


class EndpointConfigError(ValueError):
    """The endpoint refused the run's settings (HTTP 401, 403, 404): no episode can succeed."""


class EndpointDown(Unanswered):
    """No episode of a run got an answer: the endpoint is down, or refuses every request.
    `trajectories`: the run's episodes, each ended unanswered."""


@dataclass(frozen=True)
class ServedTurn:
    """One reply of the served model.

    action: the env action (the turn as text: thinking, then a Hermes `<tool_call>` or an `<answer>`).
    message: the assistant message as it goes back to the endpoint in later requests.
    call_id: the id of the native tool call the env runs (None: a text call, or none), which
    the tool's reply must cite.
    """

    action: str
    message: dict[str, Any]
    call_id: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int


class OpenAIBackend:
    """Asks the served model for one assistant turn per request; thread-safe (one may serve many
    engines at once: each episode's conversation lives in its `ChatRequest.state`)."""

    def __init__(self, config: OpenAIConfig | Mapping[str, Any]):
        self.config = config if isinstance(config, OpenAIConfig) else OpenAIConfig.from_dict(config)
        c = self.config
        try:
            api_key = api_key_from_env(c.api_key_env, "api_key_env")
        except ValueError as error:
            raise EndpointConfigError(str(error)) from None
        self.client = ChatClient(c.url, api_key, timeout_s=c.timeout_s,
                                 retries=c.retries, backoff_s=c.backoff_s, max_concurrency=c.max_concurrency)

    @property
    def name(self) -> str:
        """How reports label this model: `openai:<model>`."""
        return MODEL_PREFIX + self.config.model

    def system_messages(self, system_prompt: str, tools: Sequence[dict]) -> list[dict[str, Any]]:
        """The conversation's opening: the system prompt, with the tools block in prompt mode."""
        text = system_prompt
        if self.config.tool_mode == "prompt" and tools:
            text += "\n\n" + tools_block(list(tools))
        return [{"role": "system", "content": text}]

    def complete(self, messages: Sequence[dict[str, Any]], seed: int | None = None) -> ServedTurn:
        """The model's next turn after `messages` (chat-completions wire form).

        Raises `EndpointConfigError` for 401/403/404 and `EndpointError` for every other request
        that got no usable reply (retries included); never anything else.
        """
        c = self.config
        payload: dict[str, Any] = {"model": c.model, "messages": list(messages), "max_tokens": c.max_tokens,
                                   "temperature": c.temperature, "top_p": c.top_p}
        if c.top_k > 0:
            payload["top_k"] = c.top_k
        if seed is not None:
            payload["seed"] = int(seed)
        if c.tool_mode == "native":
            payload["tools"] = [TOOL_SCHEMA]
        try:
            response = self.client.post(payload)
        except EndpointError as error:
            if error.status in (401, 403, 404):
                raise EndpointConfigError(self._config_advice(error)) from None
            if error.status == 400 and c.tool_mode == "native" and "tool" in str(error).lower():
                raise EndpointConfigError(
                    f"{error}. The endpoint refuses native tool calls for this model: set model.tool_mode=prompt "
                    "(the schema and the calls as text), or start the server with a tool parser (vLLM: "
                    "--enable-auto-tool-choice --tool-call-parser hermes)") from None
            raise
        try:
            choice = response.data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"the reply of {self.client.endpoint} is not a chat completion (no "
                                f"choices[0].message): {str(response.data)[:300]}", "reply", response.attempts) from None
        if not isinstance(message, dict):
            raise EndpointError(f"the reply of {self.client.endpoint} has a message that is not an object",
                                "reply", response.attempts)
        usage = response.data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        action = reply_action(message)
        call = _native_call(message)
        return ServedTurn(
            action=action, message=_history_message(message, action, call), call_id=call and call["id"],
            finish_reason=str(choice.get("finish_reason") or ""), prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")), latency_s=response.latency_s,
            attempts=response.attempts)

    def respond(self, requests: Sequence[ChatRequest], sampling: Any = None, seed: int | None = None,
                on_finish: Callable[[int, str | EndpointError], None] | None = None) -> list[str | EndpointError]:
        """The next turn of each episode, as a chat backend of `agents.rollout.RolloutEngine`.

        The requests are sent concurrently, at most `max_concurrency` in flight; each reply is
        passed to `on_finish(i, reply)` as soon as it arrives. A reply is the turn's action text,
        or the `EndpointError` of a request that got no usable reply after its retries (the
        engine ends that episode unanswered). A refusal of the settings (`EndpointConfigError`)
        raises: the requests not sent yet are not sent.

        Each episode's wire conversation is built from `request.messages` (system prompt with the
        tools block in prompt mode, the question, the model's own replies as it sent them, the
        env's tool replies citing the native call) and kept in `request.state`, so each turn
        sends only its new images encoded. `request.usage` counts the episode's requests,
        attempts, whether it ended unanswered (0/1), the prompt and completion tokens the server
        reported, and the answered requests' latency (sum and max, seconds). `sampling` is not
        used (the config's sampling applies); `seed` (with the episode's key) seeds each request.
        """
        stop = threading.Event()  # set by a refusal of the settings
        replies: list[str | EndpointError] = [""] * len(requests)

        def ask(i: int) -> None:
            if stop.is_set():
                return
            try:
                replies[i] = self._reply(requests[i], seed)
            except BaseException:
                stop.set()
                raise
            if on_finish is not None:
                on_finish(i, replies[i])

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(len(requests), self.config.max_concurrency)) as pool:
            asked = [pool.submit(ask, i) for i in range(len(requests))]
        for future in asked:
            future.result()  # the first refusal (or bug) stops the rollout
        return replies

    def _reply(self, request: ChatRequest, seed: int | None) -> str | EndpointError:
        """One episode's next turn (or the error that kept it from coming), its usage counted."""
        state, usage = request.state, request.usage
        if not state:  # the episode's first request
            state.update(wire=[], seen=0, last=None)
            usage.update(requests=0.0, attempts=0.0, unanswered=0.0, prompt_tokens=0.0, completion_tokens=0.0,
                         latency_s=0.0, latency_max_s=0.0)
        for message in request.messages[state["seen"]:]:
            state["wire"].extend(self._wire(message, request.tools, state["last"]))
        state["seen"] = len(request.messages)
        if seed is not None:  # distinct per episode and turn, the same run to run
            seed = zlib.crc32(f"{seed}/{request.key}".encode()) & 0x7FFFFFFF
        usage["requests"] += 1
        try:
            turn = self.complete(state["wire"], seed=seed)
        except EndpointError as error:
            usage["attempts"] += error.attempts
            usage["unanswered"] = 1.0
            return error
        state["last"] = turn
        usage["attempts"] += turn.attempts
        usage["prompt_tokens"] += turn.prompt_tokens
        usage["completion_tokens"] += turn.completion_tokens
        usage["latency_s"] += turn.latency_s
        usage["latency_max_s"] = max(usage["latency_max_s"], turn.latency_s)
        return turn.action

    def _wire(self, message: dict[str, Any], tools: Sequence[dict], last: ServedTurn | None) -> list[dict[str, Any]]:
        """The chat-completions form of one message of the engine's conversation. An assistant
        message is the model's latest reply as it was sent back (`last`)."""
        role = message["role"]
        if role == "assistant":
            if last is None:
                raise ValueError("an assistant message before the model's first reply: the conversation was not "
                                 "built by this backend's episode loop")
            return [last.message]
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
        text = "".join(part["text"] for part in parts if part["type"] == "text")
        images = [part["image"] for part in parts if part["type"] == "image"]
        if role == "system":
            return self.system_messages(text, tools)
        if role == "tool":
            return tool_reply_messages(text, images, last.call_id if last is not None else None)
        return [user_message(text, images)]

    def _config_advice(self, error: EndpointError) -> str:
        c = self.config
        if error.status in (401, 403):
            key = (f"the key in ${c.api_key_env}" if c.api_key_env else "no API key (api_key_env is null)")
            fix = ("set api_key_env to the environment variable that holds a valid key (e.g. api_key_env=OPENAI_API_KEY)"
                   if not c.api_key_env else f"export a valid key in {c.api_key_env}")
            return f"{error}. The endpoint refused {key}: {fix}."
        return (f"{error}. Either the URL is not an OpenAI-compatible base (it should end in /v1, e.g. "
                f"endpoint=http://host:8000/v1) or the endpoint serves no model {c.model!r}: GET {c.url.rstrip('/')}"
                "/models lists the names it serves; give one as model=openai:<name>.")


# -- messages out ---------------------------------------------------------------------------------


def image_data_url(image: Image.Image | np.ndarray) -> str:
    """A PNG data URL of an image (lossless: the model sees the env's pixels)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # a third faster than the default level, ~10 % larger
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _content(text: str, images: Sequence[Any], before: str = "", after: str = "") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": before}] if before else []
    parts += [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
    parts.append({"type": "text", "text": text + after})
    return parts


def user_message(text: str, images: Sequence[Any] = ()) -> dict[str, Any]:
    """A user turn: the images (PIL or arrays), then the text (the env's question layout)."""
    return {"role": "user", "content": _content(text, images)}


def tool_reply_messages(text: str, images: Sequence[Any], call_id: str | None) -> list[dict[str, Any]]:
    """The env's reply to a tool call, as messages.

    To a native call (`call_id`): a `tool` message citing it, and its images (a tool message
    holds text only) in a user turn after it. To a text call: one user turn in the CodeVision SFT
    layout, `<tool_response>\\n` images text `\\n</tool_response>`, as the model was trained.
    """
    if call_id is None:
        return [{"role": "user", "content": _content(text, images, before="<tool_response>\n",
                                                    after="\n</tool_response>")}]
    messages: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": call_id, "content": text}]
    if len(images):
        messages.append({"role": "user", "content": _content("The image the tool call created.", images)})
    return messages


# -- replies in -----------------------------------------------------------------------------------


def reply_action(message: Any) -> str:
    """The env action a chat-completions `message` stands for. Never raises, whatever the server sent.

    Text content is kept as written (it may hold `<tool_call>` text or an `<answer>`); a separate
    `reasoning_content` (or `reasoning`) opens the turn as `<think>…</think>` unless the content
    has its own; each native `tool_calls` entry is appended as Hermes `<tool_call>` text. Their
    arguments, when a JSON object, are written as that object; anything else (malformed JSON, a
    list) as a JSON string, so the env's observation names exactly what was wrong.
    """
    if not isinstance(message, dict):
        return ""
    content = _text(message.get("content"))
    reasoning = _text(message.get("reasoning_content") or message.get("reasoning"))
    if reasoning and "<think>" not in content:
        content = f"<think>{reasoning}</think>\n{content}"
    calls = message.get("tool_calls")
    texts = [_call_text(call) for call in calls] if isinstance(calls, list) else []
    return "\n".join(part for part in [content.rstrip(), *texts] if part)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _arguments(function: dict) -> tuple[dict | None, Any]:
    """(arguments as an object, or None; the arguments as the server sent them)."""
    raw = function.get("arguments", {})
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = None
    return (value if isinstance(value, dict) else None), raw


def _call_text(call: Any) -> str:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return "<tool_call>\n" + json.dumps({"name": TOOL_NAME, "arguments": _jsonable(call)}) + "\n</tool_call>"
    name = function.get("name") if isinstance(function.get("name"), str) else _jsonable(function.get("name"))
    arguments, raw = _arguments(function)
    if arguments is not None:
        return tool_call_text([{"name": name, "arguments": _jsonable(arguments)}])
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": _jsonable(raw)}) + "\n</tool_call>"


def _jsonable(value: Any) -> Any:
    """`value` if json.dumps can write it, else its text (a server can send anything)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:2000]


def _native_call(message: dict) -> dict | None:
    """The first native tool call with an id and JSON-object arguments, which the env runs (a
    malformed one goes back as text: servers re-parse the arguments of calls in the history)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict):
        return None
    call, function = calls[0], calls[0].get("function")
    if not isinstance(call.get("id"), str) or not isinstance(function, dict) or function.get("name") != TOOL_NAME:
        return None
    arguments, _ = _arguments(function)
    if arguments is None:
        return None
    return {"id": call["id"], "type": "function",
            "function": {"name": TOOL_NAME, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _history_message(message: dict, action: str, call: dict | None) -> dict[str, Any]:
    """The assistant turn as later requests show it: its text and the native call the env ran
    (only that one: every call in the history needs a reply), or the whole turn as text."""
    if call is None:
        return {"role": "assistant", "content": action}
    content = _text(message.get("content"))
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
