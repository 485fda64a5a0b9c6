"""Images to Qwen-VL vision patches: the image processor's output, computed in fewer passes.

    pixel_values, grids = image_patches(processor.image_processor, images)

Equal, value for value, to `image_processor(images=images, return_tensors="pt")` (a property
test holds them equal for every family on random images). The stock PIL-backend processor
walks each image through numpy and back to PIL, casts it to float64 to rescale, to float32 to
normalize, and copies it again to patchify; on the rollout engine's small images that is most
of its time. Here an image is resized once in PIL (the same call, so the same pixels), its uint8
bytes go through one table lookup each to their normalized value, and are copied once into patch order:
rescale and normalize are elementwise over 256 possible inputs, so a 256-entry table per channel,
computed with the processor's own float64/float32 arithmetic, gives exactly its results.

The fast path covers `Qwen2VLImageProcessorPil` with its standard steps (resize, rescale,
normalize, RGB); any other processor, setting or input goes through the processor's own call.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["image_patches"]


def image_patches(image_processor: Any, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[list[int]]]:
    """(pixel_values, image_grid_thw as lists) of `images`, as the image processor gives them."""
    if not _fast_path_applies(image_processor, images):
        out = image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].tolist()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    p = image_processor
    patch, merge, temporal = int(p.patch_size), int(p.merge_size), int(p.temporal_patch_size)
    columns = _normalize_columns(float(p.rescale_factor), tuple(_per_channel(p.image_mean)),
                                 tuple(_per_channel(p.image_std)))
    resized = []
    for image in images:
        image = p.convert_to_rgb(image) if p.do_convert_rgb else image
        height, width = smart_resize(image.height, image.width, factor=patch * merge,
                                     min_pixels=p.size.shortest_edge, max_pixels=p.size.longest_edge)
        resized.append(image.resize((width, height), resample=p.resample))
    grids = [[1, image.height // patch, image.width // patch] for image in resized]
    # One output array, written in place: a fresh array per step would cost its page faults again.
    out = np.empty((sum(t * h * w for t, h, w in grids), 3 * temporal * patch * patch), dtype=np.float32)
    row = 0
    for image, (_, gh, gw) in zip(resized, grids):
        planes = np.empty((3, image.height, image.width), dtype=np.float32)
        for c, band in enumerate(image.split()):  # each uint8 band -> its normalized values
            np.take(columns[c], np.asarray(band), out=planes[c])
        # (3, H, W) -> (gh/m, gw/m, m, m, 3, P, P): the processor's patch order.
        ordered = planes.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch).transpose(1, 4, 2, 5, 0, 3, 6)
        # Each patch repeats over the temporal axis (a still image is `temporal` identical frames).
        target = out[row:row + gh * gw].reshape(*ordered.shape[:5], temporal, patch, patch)
        np.copyto(target, ordered[:, :, :, :, :, None])
        row += gh * gw
    return torch.from_numpy(out), grids


def _fast_path_applies(p: Any, images: Sequence[Image.Image]) -> bool:
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # a transformers without the PIL backend: its own call
        return False
    return (type(p) is Qwen2VLImageProcessorPil and p.do_resize and p.do_rescale and p.do_normalize
            and p.size.shortest_edge and p.size.longest_edge and len(images) > 0
            and all(isinstance(im, Image.Image) and (im.mode == "RGB" or p.do_convert_rgb) for im in images)
            and len(_per_channel(p.image_mean)) == 3 and len(_per_channel(p.image_std)) == 3)


def _per_channel(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


@lru_cache(maxsize=8)
def _normalize_columns(scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Per channel, a (256,) float32 table: byte value v -> its rescaled, normalized value, computed
    as the processor computes it (rescale in float64 then cast to float32; normalize in float32)."""
    rescaled = (np.arange(256, dtype=np.uint8).astype(np.float64) * scale).astype(np.float32)
    table = (rescaled[:, None] - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    columns = tuple(np.ascontiguousarray(table[:, c]) for c in range(3))
    for column in columns:
        column.setflags(write=False)
    return columns
