"""Token-exact incremental rendering of a multi-turn, multi-image conversation.

A rollout never re-tokenizes what the model wrote. An episode's tokens are built like this:

    state = renderer.start(env.messages)                  # system + user prompt + "<|im_start|>assistant\n"
    state.append_sampled(ids, logprobs)                   # the sampled ids, verbatim (loss mask 1)
    env.step(action_text)                                 # env.messages grows: assistant turn + tool message
    renderer.extend(state, env.messages)                  # closes the turn, adds only the template delta (mask 0)

`extend` renders the conversation with the processor's chat template twice (up to the last
assistant turn, and in full with the generation prompt) and tokenizes only the difference,
together with the images it introduces. For a conversation whose assistant turns were
tokenized canonically the result equals the full render's ids (tests prove it for every tiny
family); for sampled turns it keeps exactly what the sampler saw.

Each assistant turn is rendered verbatim: the template's header, the turn's text (a sampled turn's
text is the template's generation pre-fill plus the sampled text) and the template's closing; the
checkpoint's own template renders everything else, with what it lacks filled in
(`agents.templates`). A template that cannot be extended this way is refused when the renderer is
made, never in the middle of a rollout.

Text that the environment shows (tool output, questions) may spell a special token such as
`<|image_pad|>` (a program can print anything). Such strings are escaped before rendering so
that an image placeholder can only come from an image part: otherwise a printed placeholder
would demand image features that do not exist.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from agents.image_patches import image_patches
from agents.templates import (
    TOOL_RESPONSE_FORMATS, TemplateError, TemplateSupport, fill_messages, message_text, probe_conversation,
    probe_template, raw_renderer,
)
from cv_env.protocol import TOOL_SCHEMA, thinking_prompt

_LOG = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # start-up lines already logged by this process

_ZERO_WIDTH_SPACE = "\u200b"
# A fast tokenizer resets its padding/truncation state on every call, which raises "Already
# borrowed" when two threads tokenize at once; the rollout engine renders from a thread pool, so
# tokenization is serialised (template rendering and everything else is not).
_TOKENIZE_LOCK = threading.Lock()
_PIECE_CACHE_SIZE = 4096  # tokenized text pieces a renderer keeps (the system turn, headers, repeated replies)


class ImageTokenMismatch(ValueError):
    """The image placeholder tokens of a sequence do not match its image grids."""


def image_token_spans(input_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive `image_token_id`s, end exclusive."""
    spans, start = [], None
    for i, token in enumerate(input_ids):
        if token == image_token_id:
            if start is None:
                start = i
        elif start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(input_ids)))
    return spans


def check_image_tokens(input_ids: list[int], image_grid_thw, image_token_id: int, merge_size: int,
                       where: str = "sequence") -> None:
    """Raise `ImageTokenMismatch` unless each image's placeholder run has grid.prod() / merge² tokens.

    Called before every forward pass (generation and log-probs): a mismatch would otherwise
    surface deep inside the model as a shape error, or worse, silently shift image features.
    """
    grids = [] if image_grid_thw is None else [list(map(int, g)) for g in image_grid_thw]
    expected = [t * h * w // merge_size**2 for t, h, w in grids]
    found = [end - start for start, end in image_token_spans(input_ids, image_token_id)]
    if found != expected:
        raise ImageTokenMismatch(
            f"{where}: image placeholder runs have {found} tokens but the {len(grids)} image grid(s) "
            f"{grids} need {expected} (grid t*h*w / merge_size {merge_size}^2). The token ids and the images "
            "went out of sync: never cut or re-tokenize an image span; render images with the same processor "
            "that built the ids"
        )


@dataclass
class TokenState:
    """The growing token sequence of one episode, exactly as the sampler sees it.

    token_ids / loss_mask / sampler_logprobs have one entry per token: mask 1 and the sampler's
    log-prob on model-sampled tokens, mask 0 and 0.0 on everything the template or the env added.
    images / pixel_values / image_grid_thw: the images in the order their placeholders appear, and
    the processor's outputs for them (`pixel_values` one tensor per processor call).
    turn_ends: index of the last sampled token of each assistant turn (where its reward goes).
    `turns()` cuts the sequence into the prompt and each turn's sampled and context tokens.
    """

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    sampler_logprobs: list[float] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    image_grid_thw: list[list[int]] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    prompt_length: int = 0
    num_messages: int = 0  # messages of the conversation already rendered into token_ids
    turn_open: bool = False  # the last assistant turn has sampled tokens but no closing yet

    def __len__(self) -> int:
        return len(self.token_ids)

    def copy(self) -> "TokenState":
        """An independent copy (the pixel tensors are shared: nothing writes to them)."""
        return TokenState(list(self.token_ids), list(self.loss_mask), list(self.sampler_logprobs), list(self.images),
                          list(self.pixel_values), [list(g) for g in self.image_grid_thw], list(self.turn_ends),
                          self.prompt_length, self.num_messages, self.turn_open)

    def append_sampled(self, ids: list[int], logprobs: list[float]) -> None:
        """Append one assistant turn's sampled ids verbatim, with their sampler log-probs (mask 1)."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled ids but {len(logprobs)} log-probs: give one log-prob per id")
        if not ids:
            raise ValueError("an assistant turn needs at least one sampled token")
        self.token_ids.extend(map(int, ids))
        self.loss_mask.extend([1] * len(ids))
        self.sampler_logprobs.extend(map(float, logprobs))
        self.turn_ends.append(len(self.token_ids) - 1)
        self.turn_open = True

    def turns(self) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[float, ...], tuple[int, ...]]]]:
        """(prompt ids, [(sampled ids, their log-probs, the context ids after them)] per turn), as
        `agents.trajectory.Turn` holds them; a turn's sampled span is the mask-1 run ending at its turn_end."""
        spans = []
        for end in self.turn_ends:
            start = end
            while start > 0 and self.loss_mask[start - 1] == 1:
                start -= 1
            spans.append((start, end + 1))
        bounds = [start for start, _ in spans[1:]] + [len(self.token_ids)]
        prompt = tuple(self.token_ids[:spans[0][0] if spans else len(self.token_ids)])
        return prompt, [(tuple(self.token_ids[start:end]), tuple(self.sampler_logprobs[start:end]),
                         tuple(self.token_ids[end:after])) for (start, end), after in zip(spans, bounds)]

    def append_context(self, ids: list[int]) -> None:
        """Append tokens the model did not sample (template, env messages): mask 0."""
        self.token_ids.extend(map(int, ids))
        self.loss_mask.extend([0] * len(ids))
        self.sampler_logprobs.extend([0.0] * len(ids))

    def all_pixel_values(self) -> torch.Tensor | None:
        """Every image's pixel patches, concatenated in placeholder order (None without images)."""
        if not self.pixel_values:
            return None
        return self.pixel_values[0] if len(self.pixel_values) == 1 else torch.cat(self.pixel_values, 0)


@dataclass(frozen=True)
class Delta:
    """Tokens (and their images) to append after a closed assistant turn."""

    ids: list[int]
    images: list[Image.Image]
    pixel_values: torch.Tensor | None
    image_grid_thw: list[list[int]]


class ChatRenderer:
    """Renders an env conversation into token ids with a processor's chat template, incrementally.

    processor: a Qwen-VL processor (tokenizer + image processor + chat template).
    tools: the function schemas shown in the system turn (default: the env's `code_image_tool`).
    tool_response_format: "codevision" (tool replies as a user turn in `<tool_response>`, the
    CodeVision SFT layout) or "default" (the template's own; see `agents.templates`).
    support: the template's probe result, when already known (`with_tools` passes it on).

    Making a renderer probes the template (`support`; logged once per process) and checks that
    a tool-using episode extends token-exactly: `TemplateError` says why not and what to use.
    """

    def __init__(self, processor, tools: list[dict] | None = None, tool_response_format: str = "codevision",
                 support: TemplateSupport | None = None):
        if tool_response_format not in TOOL_RESPONSE_FORMATS:
            raise ValueError(f"tool_response_format must be one of {', '.join(TOOL_RESPONSE_FORMATS)}, "
                             f"got {tool_response_format!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tools = [TOOL_SCHEMA] if tools is None else list(tools)
        self.tool_response_format = tool_response_format
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self._image_pad, self._turn_start = "<|image_pad|>", "<|im_start|>"
        self._piece_ids: dict[str, tuple[int, ...]] = {}  # text piece -> its ids (`_tokenize`)
        self.merge_size = int(getattr(processor.image_processor, "merge_size", 2))
        # Longest first, so "<|im_start|>" is escaped whole and not as a shorter token inside it.
        specials = {t for t in self.tokenizer.get_added_vocab() if t.startswith("<|") and t.endswith("|>")}
        self._specials = sorted(specials, key=len, reverse=True)
        # Stands for an assistant turn's text while the template renders; random, so no text can forge it.
        self._mark = "\ue000" + secrets.token_hex(8) + ":{}\ue001"
        self._template = raw_renderer(processor)
        self.support = support or probe_template(self._template, self._mark.format("probe"))
        self.prefill = self.support.prefill
        self.closing_ids = self.tokenizer(self.support.closing, add_special_tokens=False)["input_ids"]
        self._check_extendable()
        line = self.support.describe(tool_response_format, bool(self.tools))
        if line not in _LOGGED:
            _LOGGED.add(line)
            _LOG.info(line)

    def with_tools(self, tools: list[dict]) -> "ChatRenderer":
        """The same renderer (template, tool reply format) showing other tool schemas."""
        return ChatRenderer(self.processor, tools, self.tool_response_format, support=self.support)

    def prompt_for(self, name: str) -> str:
        """The env prompt preset to show this template's model instead of `name`: its "_thinking"
        variant where the template opens <think> itself (the model must not write it again)."""
        return thinking_prompt(name) if self.support.opens_think else name

    # -- rendering ------------------------------------------------------------------------------

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat-template text of `messages` (env text escaped, images as placeholders, gaps
        filled, assistant turns verbatim)."""
        filled, tools = fill_messages([self._escaped(m) for m in messages], self.support, self.tools,
                                      self.tool_response_format)
        turns, shown = [], []
        for message in filled:
            if message.get("role") == "assistant":
                turns.append(message_text(message.get("content")))
                message = {"role": "assistant", "content": self._mark.format(len(turns) - 1)}
            shown.append(message)
        return self._with_turns(self._template(shown, tools, add_generation_prompt), turns)

    def encode(self, text: str, images: list[Image.Image]) -> Delta:
        """Tokenize template text with its images (placeholders expanded to the image grids).

        Equal to the processor's own call (a test holds them equal for every family), done in
        pieces: `agents.image_patches` gives the grids and patches, and the text is tokenized
        piece by piece between special tokens (a special token is a boundary the tokenizer never
        merges across, so the pieces' ids concatenate to the whole's), with each image
        placeholder expanded to its grid's run of ids. The pieces that recur (the system turn,
        the template's headers) are tokenized once per renderer.
        """
        if not images:
            ids = self._tokenize(text)
            if self.image_token_id in ids:
                raise ImageTokenMismatch("rendered text has image placeholders but no image was given")
            return Delta(ids, [], None, [])
        pixel_values, grids = image_patches(self.processor.image_processor, images)
        pieces = text.split(self._image_pad)
        if len(pieces) != len(grids) + 1:
            raise ImageTokenMismatch(f"rendered text has {len(pieces) - 1} image placeholders for {len(grids)} images")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            ids += self._tokenize(piece)
            if k < len(grids):
                ids += [self.image_token_id] * (grids[k][0] * grids[k][1] * grids[k][2] // self.merge_size**2)
        check_image_tokens(ids, grids, self.image_token_id, self.merge_size, "rendered text")
        return Delta(ids, list(images), pixel_values, grids)

    def _tokenize(self, text: str) -> list[int]:
        """`tokenizer(text)["input_ids"]`, piece by piece between `<|im_start|>`s, each piece cached."""
        ids: list[int] = []
        for k, piece in enumerate(text.split(self._turn_start)):
            piece = piece if k == 0 else self._turn_start + piece
            if not piece:
                continue
            cached = self._piece_ids.get(piece)
            if cached is None:
                with _TOKENIZE_LOCK:
                    cached = tuple(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
                if len(self._piece_ids) >= _PIECE_CACHE_SIZE:
                    self._piece_ids.clear()
                self._piece_ids[piece] = cached
            ids += cached
        return ids

    def render_full(self, messages: list[dict], add_generation_prompt: bool = False) -> Delta:
        """Render and tokenize a whole conversation at once (the reference the increments must equal)."""
        return self.encode(self.render_text(messages, add_generation_prompt), message_images(messages))

    # -- incremental ----------------------------------------------------------------------------

    def start(self, messages: list[dict]) -> TokenState:
        """A new episode's state: the prompt messages rendered with the generation prompt."""
        if not messages or messages[-1].get("role") == "assistant":
            raise ValueError("start() needs the prompt messages (system/user), not ending with an assistant turn")
        delta = self.render_full(messages, add_generation_prompt=True)
        state = TokenState()
        self._append_delta(state, delta)
        state.prompt_length = len(state.token_ids)
        state.num_messages = len(messages)
        return state

    def close_turn(self, state: TokenState) -> list[int]:
        """Append what the template writes after an assistant turn's content (mask 0); return it.

        A turn that ended with the end-of-turn token only needs the rest (Qwen: "\\n"); one that
        stopped at `</tool_call>` or ran out of tokens gets the whole closing (`<|im_end|>\\n`).
        """
        if not state.turn_open:
            return []
        closing = self.closing_ids
        if state.token_ids and state.token_ids[-1] == closing[0]:
            closing = closing[1:]
        state.append_context(closing)
        state.turn_open = False
        return closing

    def closing_for(self, state: TokenState) -> list[int]:
        """The ids `close_turn` would append now (to check a token budget before appending)."""
        if not state.turn_open:
            return []
        closing = self.closing_ids
        return closing[1:] if state.token_ids and state.token_ids[-1] == closing[0] else closing

    def delta(self, state: TokenState, messages: list[dict]) -> Delta:
        """The template delta of the env messages after the last assistant turn, up to the next
        generation prompt. `messages` is the whole conversation (e.g. `env.unwrapped.messages`)."""
        last = _last_assistant_index(messages)
        if last < state.num_messages:
            raise ValueError(
                "delta() needs a conversation whose newest assistant turn is not rendered yet: append the sampled "
                "turn with append_sampled() and let the env add it to its messages before calling delta()"
            )
        return self.encode(self._delta_text(messages, last), message_images(messages[last + 1:]))

    def extend(self, state: TokenState, messages: list[dict]) -> Delta:
        """Close the open assistant turn and append the delta of the new env messages (mask 0)."""
        self.close_turn(state)
        delta = self.delta(state, messages)
        self._append_delta(state, delta)
        state.num_messages = len(messages)
        return delta

    def append_delta(self, state: TokenState, delta: Delta, num_messages: int) -> None:
        """Append a delta computed earlier by `delta()` (lets a caller check a token budget first)."""
        self._append_delta(state, delta)
        state.num_messages = num_messages

    # -- internals ------------------------------------------------------------------------------

    def _append_delta(self, state: TokenState, delta: Delta) -> None:
        state.append_context(delta.ids)
        state.images.extend(delta.images)
        if delta.pixel_values is not None:
            state.pixel_values.append(delta.pixel_values)
        state.image_grid_thw.extend(delta.image_grid_thw)

    def _delta_text(self, messages: list[dict], last: int) -> str:
        """The text the template adds after assistant message `last`, up to the generation prompt."""
        prefix = self.render_text(messages[: last + 1])
        full = self.render_text(messages, add_generation_prompt=True)
        if not full.startswith(prefix):
            raise TemplateError("it re-renders earlier messages when new ones follow, so the render of a "
                                "conversation cut after an assistant turn is not a prefix of the longer render")
        text = full[len(prefix):]
        if text and not any(text.startswith(s) for s in self._specials):
            # Tokenizing the delta alone equals tokenizing it in context only when it starts at a
            # token boundary that BPE cannot merge across; a special token guarantees one.
            raise TemplateError(f"the text it adds after an assistant turn ({text[:40]!r}) does not start with a "
                                "special token, so tokenizing it apart from the history could merge differently")
        return text

    def _with_turns(self, text: str, turns: list[str]) -> str:
        """`text` (rendered with a mark for each assistant turn's text) with each turn written verbatim."""
        header, pieces, cursor = self.support.header, [], 0
        for k, turn in enumerate(turns):
            mark = self._mark.format(k)
            at = text.find(mark, cursor)
            start = text.rfind(header, cursor, at) if at >= 0 else -1
            if start < 0 or any(s in text[start + len(header):at] for s in self._specials):
                raise TemplateError(f"it does not write assistant turn {k} as its header {header!r} and the turn's "
                                    "text")
            pieces += [text[cursor:start], header, turn]
            cursor = at + len(mark)
        return "".join(pieces) + text[cursor:]

    def _check_extendable(self) -> None:
        """Play a tool-using episode through the template: every turn's render must equal its
        generation prompt + the sampled text + the closing, and every reply extend it as a delta."""
        messages = probe_conversation(self.prefill)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for k, i in enumerate(turns):
            sampled = messages[i]["content"][len(self.prefill):]
            prompt = self.render_text(messages[:i], add_generation_prompt=True)
            if self.render_text(messages[: i + 1]) != prompt + sampled + self.support.closing:
                raise TemplateError("a conversation ending with an assistant turn does not render as its generation "
                                    "prompt, the sampled text and the end of the turn")
            if k + 1 < len(turns):
                self._delta_text(messages[: turns[k + 1]], i)

    def _escape(self, text: str) -> str:
        for token in self._specials:
            if token in text:
                text = text.replace(token, token[:1] + _ZERO_WIDTH_SPACE + token[1:])
        return text

    def _escaped(self, message: dict) -> dict:
        if message.get("role") == "assistant":
            return message  # the model's own words; in a rollout they never pass through here as text
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": self._escape(content)}
        if isinstance(content, list):
            parts = [
                {**p, "text": self._escape(p["text"])} if isinstance(p, dict) and p.get("type") == "text" else p
                for p in content
            ]
            return {**message, "content": parts}
        return message


def message_images(messages: list[dict]) -> list[Image.Image]:
    """The PIL images of `messages`' image parts, in order."""
    images = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    image = part.get("image")
                    if not isinstance(image, Image.Image):
                        raise TypeError(f"image parts must hold a PIL image under 'image', got {type(image).__name__}")
                    images.append(image)
    return images


def _last_assistant_index(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return -1
