"""The trainer's weights as a stream of one-layer chunks: what a separate generator (vLLM) loads
after each optimizer step, without a second copy of the model in memory.

    stats = stream_weights(policy.model, send, dtype=torch.bfloat16, trainable_only=True)
    stats.chunks, stats.bytes, stats.largest_chunk_bytes, stats.seconds

`send(chunk)` receives one layer at a time as (name, tensor) pairs and must be done with the
tensors when it returns: the stream drops them before it builds the next layer, so the extra memory
of a sync is one layer (or the largest single tensor, the embedding), never the model.

* **Names** are the model's parameter names without peft's wrapping (`base_model.model.`,
  `.base_layer.`): the names transformers gives the family (`model.language_model.layers.0...`,
  `model.visual...`, `lm_head.weight`), which vLLM's Qwen-VL loaders map.
* **LoRA**: an adapted linear layer's weight comes merged, ``W + scale * B @ A``, computed in float32
  beside the trainer's weights. Nothing is merged in place: merging and unmerging a bf16 weight in
  place rounds it twice, and the frozen base would drift a little at every sync. Adapter tensors
  are not sent.
* **FSDP2**: a sharded parameter (a DTensor) is gathered with `full_tensor()` when its layer's chunk
  is built and released once `send` returns. The gathers are collectives in parameter order: every
  rank calls `stream_weights` together.
* **trainable_only**: only what training can change (trainable parameters and LoRA-merged weights).
  Frozen weights (a frozen vision tower, the base of a LoRA model) still equal what the generator
  loaded from the same checkpoint, so they need not travel.
* **dtype**: each tensor is cast to it (the generator's dtype). A tensor that is already in it and
  needs no gather or merge is sent as it is, without a copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Chunk", "SyncStats", "stream_weights", "export_name", "layer_of", "chunk_bytes"]

Chunk = list[tuple[str, Tensor]]

# peft's wrapping of the model's own names: `base_model.model.<name>`, `<module>.base_layer.<param>`.
_PEFT_PREFIX = "base_model.model."
_PEFT_BASE_LAYER = ".base_layer."
# peft wrappers whose weights the stream cannot express in the base model's names.
_UNSUPPORTED_PEFT_PARTS = (".modules_to_save.", ".original_module.")


@dataclass(frozen=True)
class SyncStats:
    """What one `stream_weights` call sent: chunks (layers), tensors, their bytes, the largest
    chunk's bytes (what bounds the sync's extra memory, transient gathers aside) and the wall time."""

    chunks: int
    tensors: int
    bytes: int
    largest_chunk_bytes: int
    seconds: float


def export_name(name: str) -> str:
    """A parameter's name as the base model's checkpoint spells it (peft's wrapping removed)."""
    if any(part in name for part in _UNSUPPORTED_PEFT_PARTS):
        raise NotImplementedError(
            f"{name}: peft modules_to_save wrappers cannot be streamed to the generator; train those "
            "modules without modules_to_save (LoRA targets only) or sample with rollout.backend=hf"
        )
    return name.removeprefix(_PEFT_PREFIX).replace(_PEFT_BASE_LAYER, ".")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name up to the first numeric part
    (`model.language_model.layers.3`), or its module when there is none (`lm_head`)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1])


def chunk_bytes(chunk: Sequence[tuple[str, Tensor]]) -> int:
    """The bytes of a chunk's tensors."""
    return sum(t.numel() * t.element_size() for _, t in chunk)


def stream_weights(model: nn.Module, send: Callable[[Chunk], None], dtype: torch.dtype | None = None,
                   trainable_only: bool = False) -> SyncStats:
    """Call `send` once per layer with that layer's weights; returns what was sent.

    model: the trainer's model (plain, peft-wrapped, FSDP2-sharded, or both).
    send: receives a list of (name, tensor) pairs; it must not keep the tensors.
    dtype: cast every tensor to it (None keeps each parameter's dtype).
    trainable_only: send only trainable parameters and LoRA-merged weights.
    """
    start = time.perf_counter()
    with torch.no_grad():
        stats = _stream(model, send, dtype, trainable_only)
    return SyncStats(*stats, time.perf_counter() - start)


# -- internals ----------------------------------------------------------------------------------


def _stream(model: nn.Module, send: Callable[[Chunk], None], dtype: torch.dtype | None,
            trainable_only: bool) -> tuple[int, int, int, int]:
    lora_by_weight = _lora_layers(model)
    adapter_params = {id(p) for module in lora_by_weight.values() for p in _adapter_parameters(module)}
    chunks = tensors = total = largest = 0
    for layer in _layers(model, lora_by_weight, adapter_params, trainable_only):
        chunk = [(export_name(name), _materialize(param, lora_by_weight.get(name), dtype)) for name, param in layer]
        size = chunk_bytes(chunk)
        send(chunk)
        chunks, tensors, total, largest = chunks + 1, tensors + len(chunk), total + size, max(largest, size)
        chunk.clear()  # the gathered and merged tensors go now, before the next layer is built
    return chunks, tensors, total, largest


def _layers(model: nn.Module, lora_by_weight: dict, adapter_params: set[int],
            trainable_only: bool) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """The parameters to send, grouped by layer in the model's parameter order (the same order on
    every rank, which the FSDP2 gathers need)."""
    current, group = None, []
    for name, param in model.named_parameters():
        if id(param) in adapter_params:
            continue
        if trainable_only and not param.requires_grad and name not in lora_by_weight:
            continue
        layer = layer_of(export_name(name))
        if group and layer != current:
            yield group
            group = []
        current = layer
        group.append((name, param))
    if group:
        yield group


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor on this rank: a DTensor is gathered (a collective), others are detached."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor.detach()


def _materialize(param: nn.Parameter, lora: nn.Module | None, dtype: torch.dtype | None) -> Tensor:
    full = _full(param)
    if lora is not None:
        delta = _lora_delta(lora)
        if delta is not None:
            full = full.float() + delta
    return full if dtype is None or full.dtype == dtype else full.to(dtype)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name of the base weight: its peft LoRA layer} for every LoRA layer of the model."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return {}
    layers = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise NotImplementedError(
                f"{module_name} is a LoRA {type(module).__name__} layer: only LoRA on linear layers can be merged "
                "for the generator; target linear modules only (model.lora.target_modules)"
            )
        layers[f"{module_name}.base_layer.weight"] = module
    return layers


def _adapter_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    for container in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        part = getattr(module, container, None)
        if part is not None:
            yield from part.parameters()


def _lora_delta(module: nn.Module) -> Tensor | None:
    """The float32 sum of the active adapters' ``scale * B @ A`` (None: nothing to add, because
    the adapters are disabled or already merged into the weight)."""
    if module.disable_adapters or module.merged:
        return None
    delta = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if getattr(module, "lora_variant", {}).get(adapter) is not None or getattr(module, "use_dora", {}).get(adapter):
            raise NotImplementedError(f"adapter {adapter!r} is a LoRA variant (e.g. DoRA) that cannot be merged for "
                                      "the generator: use plain LoRA or rollout.backend=hf")
        if getattr(module, "lora_bias", {}).get(adapter):
            raise NotImplementedError(f"adapter {adapter!r} trains a LoRA bias, which the generator cannot receive: "
                                      "use bias-free LoRA or rollout.backend=hf")
        a = _full(module.lora_A[adapter].weight).float()
        b = _full(module.lora_B[adapter].weight).float()
        term = (b @ a) * module.scaling[adapter]
        if module.fan_in_fan_out:
            term = term.T
        delta = term if delta is None else delta + term
    return delta
