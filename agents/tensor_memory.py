"""Peak memory of the tensors a block of torch code allocates, on any device (CPU included).

    with TensorMemoryMeter() as meter:
        stream_weights(model, send)
    meter.peak_bytes       # the most bytes of new tensor storage alive at once inside the block

On CPU, torch has no allocator statistics and a process's resident size is far too coarse for a
model of a few megabytes, so the meter watches torch itself: every operator's output that owns new
storage (not a view or an in-place result of an input) counts from its creation until the last
tensor over that storage is freed. Storage made outside torch operators (from numpy, by a C
extension) is not seen; everything a weight sync allocates (gathers, casts, merges) is. On a GPU
`torch.cuda.max_memory_allocated` measures the same thing and more cheaply.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["TensorMemoryMeter"]


class TensorMemoryMeter(TorchDispatchMode):
    """A context manager that records `peak_bytes` (and `live_bytes` at any moment) of the tensor
    storage torch operators allocate while it is active."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[tuple, int] = {}  # storage -> live tensors over it
        self._sizes: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if _is_plain_tensor(t)}
        for tensor in tree_leaves(out):
            if _is_plain_tensor(tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set) -> None:
        key = _storage_key(tensor)
        if key not in self._refs:
            if key in inputs:  # a view or an in-place result of storage made before the block
                return
            self._refs[key] = 0
            self._sizes[key] = tensor.untyped_storage().nbytes()
            self.live_bytes += self._sizes[key]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: tuple) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live_bytes -= self._sizes.pop(key)


def _is_plain_tensor(value: Any) -> bool:
    # Wrapper subclasses (DTensor) hold no storage of their own: their local tensors are counted.
    return isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter) \
        and value.device.type != "meta"


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr()
