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

Text that the environment shows (tool output, questions) may spell a special token such as
`<|image_pad|>` (a program can print anything). Such strings are escaped before rendering so
that an image placeholder can only come from an image part: otherwise a printed placeholder
would demand image features that do not exist.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from cv_env.protocol import TOOL_SCHEMA

_ZERO_WIDTH_SPACE = "\u200b"
# A fast tokenizer resets its padding/truncation state on every call, which raises "Already
# borrowed" when two threads tokenize at once; the rollout engine renders from a thread pool, so
# tokenization is serialised (template rendering and everything else is not).
_TOKENIZE_LOCK = threading.Lock()


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
        self.token_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([1] * len(ids))
        self.sampler_logprobs.extend(float(x) for x in logprobs)
        self.turn_ends.append(len(self.token_ids) - 1)
        self.turn_open = True

    def append_context(self, ids: list[int]) -> None:
        """Append tokens the model did not sample (template, env messages): mask 0."""
        self.token_ids.extend(int(i) for i in ids)
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
    """

    def __init__(self, processor, tools: list[dict] | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tools = [TOOL_SCHEMA] if tools is None else list(tools)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge_size = int(getattr(processor.image_processor, "merge_size", 2))
        # Longest first, so "<|im_start|>" is escaped whole and not as a shorter token inside it.
        specials = {t for t in self.tokenizer.get_added_vocab() if t.startswith("<|") and t.endswith("|>")}
        self._specials = sorted(specials, key=len, reverse=True)
        self.closing_ids = self._assistant_closing_ids()

    # -- rendering ------------------------------------------------------------------------------

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat-template text of `messages` (env text escaped, images as placeholders)."""
        return self.processor.apply_chat_template(
            [self._escaped(m) for m in messages], tools=self.tools, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, text: str, images: list[Image.Image]) -> Delta:
        """Tokenize template text with its images (placeholders expanded to the image grids)."""
        if images:
            with _TOKENIZE_LOCK:
                out = self.processor(text=[text], images=images, return_tensors="pt")
            ids = out["input_ids"][0].tolist()
            grids = out["image_grid_thw"].tolist()
            check_image_tokens(ids, grids, self.image_token_id, self.merge_size, "rendered text")
            return Delta(ids, list(images), out["pixel_values"], grids)
        with _TOKENIZE_LOCK:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.image_token_id in ids:
            raise ImageTokenMismatch("rendered text has image placeholders but no image was given")
        return Delta(ids, [], None, [])

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
        prefix = self.render_text(messages[: last + 1])
        full = self.render_text(messages, add_generation_prompt=True)
        if not full.startswith(prefix):
            raise ValueError(
                "the chat template re-renders earlier messages when new ones follow, so the conversation cannot be "
                "extended token-exactly: use a template whose render of a conversation cut after an assistant turn "
                "is a prefix of every longer render (agents/chat_template.jinja is one)"
            )
        text = full[len(prefix):]
        if text and not any(text.startswith(s) for s in self._specials):
            # Tokenizing the delta alone equals tokenizing it in context only when it starts at a
            # token boundary that BPE cannot merge across; a special token guarantees one.
            raise ValueError(
                f"the template delta {text[:40]!r} does not start with a special token: tokenizing it apart from "
                "the history could merge differently than a full render"
            )
        return self.encode(text, message_images(messages[last + 1:]))

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

    def _assistant_closing_ids(self) -> list[int]:
        probe = "\x00PROBE\x00"
        before = self.render_text([{"role": "user", "content": "x"}], add_generation_prompt=True)
        after = self.render_text([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}])
        if not after.startswith(before) or probe not in after:
            raise ValueError("the chat template does not render an assistant turn after its generation prompt")
        closing = after[after.index(probe) + len(probe):]
        ids = self.tokenizer(closing, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("the chat template writes nothing after an assistant turn: it has no end-of-turn token")
        return ids

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
