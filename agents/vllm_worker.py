"""What runs inside vLLM's workers: loading a chunk of the trainer's weights.

`VLLMBackend` starts vLLM with ``worker_extension_cls="agents.vllm_worker.WeightLoader"``, vLLM's
public hook for adding methods to its workers, and calls them by name through
`LLM.collective_rpc`, which reaches every worker whatever the executor (one process, tensor
parallel processes, torchrun's external launcher). A worker loads the full tensors it is given
with the model's own `load_weights`, which maps checkpoint names and takes this worker's
tensor-parallel slice.

A chunk travels as a list of (name, tensor) pairs when the worker shares the trainer's process
(no copy), else as safetensors bytes (`pack_chunk`): plain bytes cross every transport vLLM uses
between processes.

Imports nothing from vLLM, so it is importable (and testable) on any machine.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["WeightLoader", "EXTENSION", "pack_chunk", "unpack_chunk"]

EXTENSION = "agents.vllm_worker.WeightLoader"


class WeightLoader:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in every worker.

    Names start with `codevision_` so they never collide with the worker's own (vLLM refuses an
    extension that would shadow one).
    """

    def codevision_load_weights(self, chunk: bytes | Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load one chunk of weights in place; returns how many of the model's parameters took them."""
        weights = unpack_chunk(chunk) if isinstance(chunk, (bytes, bytearray, memoryview)) else list(chunk)
        loaded = self.get_model().load_weights(weights)
        return len(loaded) if loaded is not None else len(weights)

    def codevision_device(self) -> str:
        """The CUDA device this worker runs on (placement checks)."""
        return f"cuda:{torch.cuda.current_device()}"


def pack_chunk(chunk: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    """A chunk as safetensors bytes (tensors copied to the CPU)."""
    from safetensors.torch import save

    names = [name for name, _ in chunk]
    if len(set(names)) != len(names):
        raise ValueError(f"a weight chunk names a tensor twice: {sorted(n for n in names if names.count(n) > 1)}")
    return save({name: tensor.detach().to("cpu").contiguous() for name, tensor in chunk})


def unpack_chunk(data: bytes | bytearray | memoryview) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of `pack_chunk`'s bytes, on the CPU."""
    from safetensors.torch import load

    return list(load(bytes(data)).items())
