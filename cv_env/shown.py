"""The copy of an image the model sees: RGB, downscaled (aspect kept) to at most `max_pixels`.

    shown = shown_copy(result.image, max_pixels)          # a tool's new image
    shown = shown_task_copy(task.images[0], max_pixels)   # a task's input, at reset

Always a copy: the episode's own images stay private (the sandbox keeps their pixels). Downscaling
a large input is most of a reset's time (a 1800x1200 photo to 256x256-scale takes ~10 ms), and a
GRPO group resets the same task n times in a row, so `shown_task_copy` keeps recent results,
keyed by the image object itself (checked through a weak reference, so a new image that reuses a
freed one's id is never mistaken for it), and hands out a private copy of the kept one.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict

from PIL import Image

__all__ = ["shown_copy", "shown_task_copy"]

CACHE_BYTES = 64 * 2**20  # shown task images kept across resets (a few groups' worth at paper sizes)


def shown_copy(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` as the model sees it: RGB, at most `max_pixels` (BICUBIC), always a new image."""
    w, h = image.size
    if w * h <= max_pixels:
        return image.convert("RGB") if image.mode != "RGB" else image.copy()
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    if size[0] * size[1] > max_pixels:  # an extreme aspect: one side was held at 1 pixel
        size = (1, max_pixels) if size[0] == 1 else (max_pixels, 1)
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # resize makes the new image
    return rgb.resize(size, Image.Resampling.BICUBIC)


_kept: OrderedDict[tuple[int, int], tuple[weakref.ref, Image.Image]] = OrderedDict()
_kept_bytes = 0
_lock = threading.Lock()


def shown_task_copy(image: Image.Image, max_pixels: int) -> Image.Image:
    """`shown_copy(image, max_pixels)` for a task's input image, computed once per image and size."""
    global _kept_bytes
    key = (id(image), int(max_pixels))
    with _lock:
        entry = _kept.get(key)
        if entry is not None and entry[0]() is image:
            _kept.move_to_end(key)
            return entry[1].copy()
    shown = shown_copy(image, max_pixels)
    try:
        ref = weakref.ref(image)
    except TypeError:  # an image type without weak references: not kept
        return shown
    size = _nbytes(shown)
    with _lock:
        old = _kept.pop(key, None)
        if old is not None:
            _kept_bytes -= _nbytes(old[1])
        _kept[key] = (ref, shown)
        _kept_bytes += size
        while _kept_bytes > CACHE_BYTES and len(_kept) > 1:
            _, (_, dropped) = _kept.popitem(last=False)
            _kept_bytes -= _nbytes(dropped)
    return shown.copy()


def _nbytes(image: Image.Image) -> int:
    return image.width * image.height * 3
