"""Gymnasium spaces for CodeVision observations and actions.

An observation is a message: `{"role": str, "text": str, "images": tuple of HxWx3 uint8 arrays}`.
Images have variable sizes, so they live in `ImageList`, a custom space with the batching and
shared-memory rules Gymnasium's vector environments need (`make_vec(..., "sync" | "async")`).
Text spaces use an explicit charset that covers code, newlines and printable Unicode; text that
falls outside it is replaced by U+FFFD before it reaches an observation (`sanitize_text`).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence as SequenceABC
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from gymnasium.spaces import Dict, Space, Text
from gymnasium.vector.utils import (
    create_shared_memory,
    read_from_shared_memory,
    write_to_shared_memory,
)

REPLACEMENT_CHAR = "\ufffd"


@lru_cache(maxsize=1)
def text_charset() -> str:
    """Tab, newline and every printable character of the Basic Multilingual Plane."""
    return "\t\n" + "".join(chr(c) for c in range(0x20, 0x10000) if chr(c).isprintable())


@lru_cache(maxsize=1)
def _charset_members() -> frozenset[str]:
    return frozenset(text_charset())


def sanitize_text(text: str, max_chars: int) -> str:
    """Replace characters outside `text_charset()` and bound the length (marking the cut)."""
    members = _charset_members()
    if not all(c in members for c in text):
        text = "".join(c if c in members else REPLACEMENT_CHAR for c in text)
    if len(text) > max_chars:
        marker = "\n…[truncated]"
        text = text[: max_chars - len(marker)] + marker
    return text


class MessageText(Text):
    """Model-facing text (may be empty) over `text_charset()`.

    A subclass only so that async vector envs read it from shared memory live (see below).
    """

    def __init__(self, max_length: int, min_length: int = 0, charset: str | None = None, seed=None):
        charset = text_charset() if charset is None else charset
        super().__init__(max_length=max_length, min_length=min_length, charset=charset[:1], seed=seed)
        # Text builds four tables over the charset (~40 ms for the default 55k characters,
        # several times per env): built once per charset, shared read-only by every space.
        self._char_set, self._char_list, self._char_index, self._char_str = _charset_tables(charset)

    def __repr__(self) -> str:
        # Text's own repr prints every character: 55 KB for the default charset.
        charset = "text_charset()" if self.characters == text_charset() else repr(self.characters)
        if len(charset) > 40:
            charset = f"<{len(self.characters)} characters>"
        return f"MessageText(min_length={self.min_length}, max_length={self.max_length}, charset={charset})"


@lru_cache(maxsize=8)
def _charset_tables(charset: str) -> tuple:
    """Gymnasium's lookup tables for a charset (what `Text.__init__` computes)."""
    probe = Text(1, min_length=0, charset=charset)
    return probe._char_set, probe._char_list, probe._char_index, probe._char_str


def text_space(max_length: int) -> MessageText:
    """A Text space for model-facing text (may be empty)."""
    return MessageText(max_length)


class ImageList(Space[tuple]):
    """A tuple of up to `max_images` RGB images (HxWx3 uint8 arrays) of at most `max_pixels` each."""

    def __init__(self, max_images: int, max_pixels: int, seed: int | np.random.Generator | None = None):
        if max_images < 1 or max_pixels < 1:
            raise ValueError(f"ImageList needs max_images >= 1 and max_pixels >= 1, got {max_images}, {max_pixels}")
        self.max_images = int(max_images)
        self.max_pixels = int(max_pixels)
        super().__init__(shape=None, dtype=np.uint8, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        if not isinstance(x, (tuple, list)) or len(x) > self.max_images:
            return False
        return all(
            isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
            and a.shape[0] >= 1 and a.shape[1] >= 1 and a.shape[0] * a.shape[1] <= self.max_pixels
            for a in x
        )

    def sample(self, mask: Any = None, probability: Any = None) -> tuple:
        n = int(self.np_random.integers(0, self.max_images + 1))
        side = max(1, min(64, int(self.max_pixels**0.5)))
        return tuple(
            self.np_random.integers(0, 256, size=(int(self.np_random.integers(1, side + 1)),
                                                  int(self.np_random.integers(1, side + 1)), 3), dtype=np.uint8)
            for _ in range(n)
        )

    def __repr__(self) -> str:
        return f"ImageList(max_images={self.max_images}, max_pixels={self.max_pixels})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ImageList) and (other.max_images, other.max_pixels) == (self.max_images, self.max_pixels)

    def to_jsonable(self, sample_n: Sequence[tuple]) -> list:
        return [[a.tolist() for a in sample] for sample in sample_n]

    def from_jsonable(self, sample_n: list) -> list[tuple]:
        return [tuple(np.asarray(a, dtype=np.uint8) for a in sample) for sample in sample_n]


def observation_space(max_images: int, max_pixels: int, max_text_chars: int) -> Dict:
    """The space of one message: role, text and the images it introduces."""
    return Dict({
        "role": MessageText(max_length=16, min_length=1, charset="abcdefghijklmnopqrstuvwxyz"),
        "text": text_space(max_text_chars),
        "images": ImageList(max_images, max_pixels),
    })


# -- shared memory for AsyncVectorEnv -------------------------------------------------------
# AsyncVectorEnv reads its observation buffer once, at construction, and relies on the result
# being a *view* that later writes show through (true of numpy arrays for Box spaces). Gymnasium's
# readers for Text build strings, frozen at that moment, so we read both our text and our images
# through `_LiveBatch`: a sequence that decodes env i from the buffer when it is accessed, and
# becomes a plain tuple when the vector env deep-copies its observations (its default).
#
# Image buffer: one flat uint8 slot per env: [count: int32][(height, width): int32 x max_images]
# [pixels]. Images are variable-size, so each slot reserves max_images * max_pixels * 3 bytes.


class _LiveBatch(SequenceABC):
    """A read-through view of a batch in shared memory (one item per env)."""

    def __init__(self, decode: Callable[[int], Any], n: int):
        self._decode, self._n = decode, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self._decode(i) for i in range(self._n)[index])
        if not -self._n <= index < self._n:
            raise IndexError(f"env index {index} out of range for {self._n} envs")
        return self._decode(index % self._n)

    def __deepcopy__(self, memo) -> tuple:
        return tuple(self)

    def __eq__(self, other: Any) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, SequenceABC) else NotImplemented

    def __repr__(self) -> str:
        return f"_LiveBatch({tuple(self)!r})"


@read_from_shared_memory.register(MessageText)
def _read_text_live(space: MessageText, shared_memory, n: int = 1) -> _LiveBatch:
    codes = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape(n, space.max_length)
    characters, size = space.character_list, len(space.character_set)

    def decode(index: int) -> str:
        row = codes[index]
        return "".join(characters[c] for c in row[row < size])

    return _LiveBatch(decode, n)

def _slot_layout(space: ImageList) -> tuple[int, int]:
    header = 4 + 8 * space.max_images
    return header, header + space.max_images * space.max_pixels * 3


@create_shared_memory.register(ImageList)
def _create_image_list_shared_memory(space: ImageList, n: int = 1, ctx=mp):
    _, slot = _slot_layout(space)
    return ctx.Array("B", n * slot)


@write_to_shared_memory.register(ImageList)
def _write_image_list(space: ImageList, index: int, value: tuple, shared_memory) -> None:
    if not space.contains(value):
        raise ValueError(f"observation images do not fit {space}")
    header, slot = _slot_layout(space)
    buffer = np.frombuffer(shared_memory.get_obj(), dtype=np.uint8)[index * slot:(index + 1) * slot]
    meta = buffer[:header].view(np.int32)
    meta[0] = len(value)
    offset = header
    for i, image in enumerate(value):
        h, w, _ = image.shape
        meta[1 + 2 * i], meta[2 + 2 * i] = h, w
        buffer[offset:offset + h * w * 3] = np.ascontiguousarray(image).reshape(-1)
        offset += h * w * 3


@read_from_shared_memory.register(ImageList)
def _read_image_list(space: ImageList, shared_memory, n: int = 1) -> _LiveBatch:
    header, slot = _slot_layout(space)
    buffer = np.frombuffer(shared_memory.get_obj(), dtype=np.uint8)

    def decode(index: int) -> tuple:
        env_buffer = buffer[index * slot:(index + 1) * slot]
        meta = env_buffer[:header].view(np.int32)
        offset, images = header, []
        for i in range(int(meta[0])):
            h, w = int(meta[1 + 2 * i]), int(meta[2 + 2 * i])
            images.append(env_buffer[offset:offset + h * w * 3].reshape(h, w, 3).copy())
            offset += h * w * 3
        return tuple(images)

    return _LiveBatch(decode, n)
