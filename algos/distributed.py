"""Data-parallel training across processes: `torchrun` in, `torch.distributed` underneath.

    info = init_distributed()          # reads RANK / WORLD_SIZE / LOCAL_RANK; no-op without them
    model = wrap_model(model, info)     # FSDP2 on CUDA, DDP on CPU, unchanged in one process
    with fsdp2_gathered(model): ...     # full weights for forwards that ranks run unequally often
    stats = all_reduce_mean({"reward/total": 0.4, "actor/kl": 0.01})
    if is_main(): tracker.log(stats, step)

Every rank runs its own rollouts on its own prompts and trains on them; gradients are averaged
by DDP or FSDP2. Nothing here is a distributed layer of its own: these are thin, tested helpers
over `torch.distributed` so the trainers read the same on one CPU and on many GPU nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "destroy_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_reduce_sums",
    "all_reduce_max",
    "all_reduce_gradients",
    "gather_lists",
    "broadcast_object",
    "wrap_model",
    "fsdp2_wrap",
    "fsdp2_gathered",
    "is_fsdp2",
    "unwrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that logs and writes checkpoint metadata."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that `torchrun` describes in the environment.

    Without `WORLD_SIZE` (or with `WORLD_SIZE=1`) this is a no-op returning rank 0 of 1, on
    `cuda` when available, else `cpu`. Otherwise it initialises `torch.distributed` once (a second
    call returns the same info) with NCCL when CUDA is available and gloo on CPU, and binds this
    process to GPU `LOCAL_RANK`.

    Args:
        backend: force a backend ("nccl" or "gloo"); None picks by device.
        timeout_s: how long a collective may wait for the other ranks before failing.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent: need 0 <= RANK < WORLD_SIZE")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc_per_node <= GPUs)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return DistInfo(0, 1, 0, device)
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun")
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU up front
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_distributed() -> None:
    """Leave the process group (call once at the end of training); no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group of more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank: from the process group when active, else `RANK` (0 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main() -> bool:
    """True on global rank 0: the one rank that logs, prints and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank reaches this point; no-op in one process."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(metrics: Mapping[str, float]) -> dict[str, float]:
    """Average a dict of scalars over all ranks (every rank gets the result).

    Every rank must pass the same keys (they are sorted, so order does not matter). Values are
    reduced in float64 so per-rank means of a few thousand tokens do not lose digits. In one
    process the dict is returned as floats, unchanged.
    """
    keys = sorted(metrics)
    values = [float(metrics[k]) for k in keys]
    if not is_distributed():
        return dict(zip(keys, values))
    # A checksum of the key names rides along: ranks that passed different names would
    # otherwise average unrelated numbers without a word.
    checksum = float(zlib.crc32("\0".join(keys).encode()))
    tensor = torch.tensor(values + [checksum], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    if tensor[-1].item() != checksum * world:
        raise RuntimeError(f"all_reduce_mean: ranks passed different metric names (this rank: {keys}); log the same keys on every rank")
    return dict(zip(keys, (tensor[:-1] / world).tolist()))


def all_reduce_sum(value: float) -> float:
    """The sum of a scalar over all ranks, in float64 (every rank gets it); the value itself in one process."""
    return all_reduce_sums([value])[0]


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """Element-wise sums of a list of scalars over all ranks, in float64, in one collective (every
    rank passes as many values, in the same order); the values themselves in one process."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int) -> int:
    """The largest of an integer over all ranks (every rank gets it); the value itself in one process."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_gradients(params: Sequence[torch.Tensor], bucket_bytes: int = 256 * 2**20) -> None:
    """Average gradients over data-parallel ranks (a parameter without a gradient counts as 0).

    For models that are not wrapped in DDP/FSDP (whose hooks already reduce): every rank must
    call it with the same parameters in the same order. Gradients travel in flat buckets of
    about `bucket_bytes` (one collective per bucket, not per tensor). No-op in one process.
    """
    if not is_distributed():
        return
    world = get_world_size()
    grads = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[]])
    for grad in grads:
        bucket = buckets[(grad.dtype, grad.device)]
        if bucket[-1] and sum(g.numel() * g.element_size() for g in bucket[-1]) >= bucket_bytes:
            bucket.append([])
        bucket[-1].append(grad)
    for bucket_list in buckets.values():
        for bucket in bucket_list:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()


def gather_lists(items: Sequence[Any]) -> list[Any]:
    """Concatenate every rank's list of picklable items, in rank order (on every rank).

    For per-episode summaries, whose metric names (categories, ops) differ between ranks and so
    cannot be averaged key by key. Returns the list unchanged in one process.
    """
    if not is_distributed():
        return list(items)
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for rank_items in gathered for item in rank_items]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to every rank; returns it on all ranks.

    For small control data (a seed, a checkpoint path, a stop flag), not tensors of weights.
    """
    if not is_distributed():
        return obj
    holder = [obj if dist.get_rank() == src else None]
    kwargs = {"device": _collective_device()} if dist.get_backend() == "nccl" else {}
    dist.broadcast_object_list(holder, src=src, **kwargs)
    return holder[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are the model itself and stay as they are)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _layer_classes(model: nn.Module, layer_cls: Iterable[type | str] | None) -> tuple[set[type], set[str]]:
    if layer_cls is None:
        # Hugging Face models list their repeated blocks (decoder layers, vision blocks) here.
        layer_cls = getattr(model, "_no_split_modules", None) or []
    types = {c for c in layer_cls if isinstance(c, type)}
    names = {c for c in layer_cls if isinstance(c, str)}
    return types, names


def fsdp2_wrap(
    model: nn.Module,
    layer_cls: Iterable[type | str] | None = None,
    mixed_precision: torch.dtype | None = torch.bfloat16,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` with FSDP2 (`torch.distributed.fsdp.fully_shard`): each layer, then the root.

    Sharding every repeated block separately lets FSDP gather one layer's weights at a time; the
    root call picks up the rest (embeddings, norms, head). The LM head must stay in the root unit:
    `agents.policy.Policy.logprobs` applies it outside the model's forward and gathers the root
    for it. Requires an active process group (NCCL on GPUs; gloo on CPU works too, which is how
    the tests exercise it).

    Args:
        model: the policy, on this rank's device.
        layer_cls: classes (or class names) of the blocks to shard one by one; default: the
            model's `_no_split_modules` (Hugging Face's list of its decoder and vision blocks).
        mixed_precision: dtype of parameters in forward/backward (gradients are reduced in
            float32); None keeps the parameters' dtype.
        reshard_after_forward: free gathered weights after each layer's forward (saves memory,
            costs a second gather in backward).

    Returns:
        The same module object, now sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 needs a process group: call init_distributed() under torchrun first")
    types, names = _layer_classes(model, layer_cls)
    mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    layers = [m for m in model.modules() if m is not model and (type(m) in types or type(m).__name__ in names)]
    if not layers:
        raise ValueError(
            f"no layer of {type(model).__name__} matches {sorted(names) + [t.__name__ for t in types]}: "
            "pass layer_cls=[<decoder layer class>] so FSDP2 can shard layer by layer"
        )
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_model(
    model: nn.Module,
    info: DistInfo | None = None,
    layer_cls: Iterable[type | str] | None = None,
    mixed_precision: torch.dtype | None = torch.bfloat16,
) -> nn.Module:
    """Wrap the policy for data-parallel training on this process's device.

    One process: the model unchanged. Several, on CUDA: FSDP2 (`fsdp2_wrap`). Several, on CPU:
    `DistributedDataParallel` over gloo. Move the model to `info.device` first.
    """
    info = info or DistInfo(get_rank(), get_world_size())
    if info.world_size == 1 or not is_distributed():
        return model
    if info.device.type == "cuda":
        return fsdp2_wrap(model, layer_cls=layer_cls, mixed_precision=mixed_precision)
    return nn.parallel.DistributedDataParallel(model)


def is_fsdp2(model: nn.Module) -> bool:
    """True when `model` (or any module inside it) is sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def fsdp2_gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Every FSDP2 unit of `model` gathered (full weights on this rank) for the duration, and no
    collective in its forward passes; a no-op for a model that is not sharded.

    FSDP2 gathers each unit's weights in its forward, a collective that every rank must join
    equally often. Rollouts and scoring do not fit that: each rank generates until its own
    sequences stop and scores as many micro-batches as it kept. Inside this context those
    forwards run on the gathered weights, any number of times per rank. Enter it on every rank
    together (gathering is a collective); use it without gradients (it holds the full weights,
    so training's memory saving is suspended while it lasts).
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    # FSDP2 finds its root at the first forward; generation may first call an inner unit (e.g. the
    # vision tower) directly, which would then claim to be a root: settle the root here.
    units[0]._get_fsdp_state()._lazy_init()
    reshards = [any(g.post_forward_mesh_info is not None for g in unit._get_fsdp_state()._fsdp_param_groups)
                for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit, reshard in zip(units, reshards):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)
