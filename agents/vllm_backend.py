"""vLLM generation backend (GPU): multi-modal token prompts, sampled ids and their log-probs.

    backend = VLLMBackend(policy, gpu_memory_utilization=0.5)     # beside the trainer, on its GPU
    engine = RolloutEngine(backend, sandbox=sandbox, ...)
    ...; backend.update_weights(policy.model)                     # after each optimizer step

Requires `pip install -e '.[vllm]'` and a CUDA GPU; importing this module without vLLM is fine,
building a backend then raises a clear error. Verified against the vLLM versions in
`VERIFIED_VLLM` (tests/test_vllm_surface.py reads their sources); `bash scripts/gpu_check.sh`
runs it on a GPU.

Token exactness: the engine's prompts hold image placeholders already expanded to each image's
grid; vLLM expands placeholders itself, so each run is collapsed to one `<|image_pad|>` before the
call and vLLM's own expansion is checked to give back exactly the engine's ids (the same processor
config computes the same grids); a mismatch is an error, never a silent drift.

Log-probs follow the convention of `agents.generation`: the engine runs with
`logprobs_mode="processed_logprobs"`, the vision ids get a -100 logit bias (vLLM ignores
generation_config.suppress_tokens), and each sampled token's log-prob is returned. With top-k /
top-p, vLLM's processed log-probs are taken after truncation, which the trainer cannot recompute:
keep top_k=0, top_p=1.0 for on-policy log-probs, or recompute them with `Policy.logprobs`.

Placement (`engine_placement`): in one process the engine takes `tensor_parallel_size` GPUs from
cuda:0 (the trainer's GPU is cuda:0 too). Under `torchrun` with several ranks every rank runs its
own engine on its own GPU (cuda:LOCAL_RANK) through vLLM's `external_launcher` executor, which
keeps the ranks' engines independent (each samples its own prompts); tensor parallelism would tie
ranks together, so it is refused there.

Weights (`update_weights`): the trainer's weights stream to vLLM one layer at a time
(`agents.weight_stream`: LoRA merged out of place, FSDP2 shards gathered a layer at a time, cast to
vLLM's dtype), each chunk loaded by every vLLM worker through `LLM.collective_rpc` and the worker
extension `agents.vllm_worker.WeightLoader`. Then every cache computed with the old weights goes:
the prefix cache (KV blocks) and the encoder cache (vision embeddings, which vLLM otherwise reuses
for an image it has seen before).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from agents.conversation import image_token_spans
from agents.generation import (STOP_TOKENS, GenerationRequest, GenerationResult, OnFinish, SamplingParams,
                               stop_token_ids)
from agents.vllm_worker import EXTENSION, pack_chunk
from agents.weight_stream import Chunk, SyncStats, stream_weights

__all__ = ["VLLMBackend", "VERIFIED_VLLM", "Placement", "engine_placement", "engine_kwargs", "sampling_kwargs",
           "vllm_prompt", "collapse_image_spans", "vllm_available"]

# The vLLM releases whose call surface this module was checked against (setup.py admits these).
VERIFIED_VLLM = ("0.32.0", "0.33.0", "0.34.0")
SUPPRESS_BIAS = -100.0  # vLLM's logit bias range is [-100, 100]; exp(-100) is 0 in float32 softmax
MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"  # 0: vLLM's engine core runs in this process
LOAD_WEIGHTS = "codevision_load_weights"  # agents.vllm_worker.WeightLoader's method


def vllm_available() -> bool:
    """Whether vLLM is importable and a CUDA device exists."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Placement:
    """Where this process's engine runs: extra `LLM` arguments, environment variables to set
    before vLLM starts, and whether its one worker shares this process (then weights pass as
    tensors, without a copy; otherwise as bytes)."""

    llm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)
    in_process: bool = True


def engine_placement(tensor_parallel_size: int, world_size: int, visible_gpus: int,
                     environ: Mapping[str, str]) -> Placement:
    """The placement of this process's engine (see the module docstring).

    world_size: ranks launched by torchrun (1 without it). environ: the current environment (a
    user's VLLM_ENABLE_V1_MULTIPROCESSING=1 is kept in one process, and works, but costs a copy
    of each weight chunk).
    """
    if tensor_parallel_size < 1:
        raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if world_size > 1:
        if tensor_parallel_size != 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={tensor_parallel_size} under torchrun with {world_size} ranks: each rank "
                "samples its own prompts with its own vLLM engine on its own GPU, and tensor parallelism would make "
                "ranks share one engine. Use rollout.tensor_parallel_size=1 under torchrun, or run one process "
                "(python -m algos.grpo ...) whose engine spans the GPUs"
            )
        missing = [name for name in ("RANK", "LOCAL_RANK") if name not in environ]
        if missing:
            raise RuntimeError(f"{world_size} ranks but {', '.join(missing)} unset: launch with torchrun")
        # vLLM's torchrun executor: this rank's engine on cuda:LOCAL_RANK, independent of the others.
        return Placement({"distributed_executor_backend": "external_launcher"}, {MULTIPROCESSING: "0"}, True)
    if tensor_parallel_size > visible_gpus:
        raise ValueError(f"rollout.tensor_parallel_size={tensor_parallel_size} but this process sees {visible_gpus} "
                         "GPU(s): lower it or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    multiprocessing = environ.get(MULTIPROCESSING, "0")
    return Placement({}, {MULTIPROCESSING: multiprocessing},
                     in_process=tensor_parallel_size == 1 and multiprocessing == "0")


def engine_kwargs(model: str, dtype: str, gpu_memory_utilization: float = 0.5, max_model_len: int = 16384,
                  max_images: int = 16, enable_prefix_caching: bool = True, enforce_eager: bool = False,
                  tensor_parallel_size: int = 1, **llm_kwargs: Any) -> dict[str, Any]:
    """The arguments of `vllm.LLM` for a policy checkpoint (`llm_kwargs` passed on as they are)."""
    return dict(
        model=model,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": max_images},
        enable_prefix_caching=enable_prefix_caching,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=EXTENSION,
        **llm_kwargs,
    )


def sampling_kwargs(sampling: SamplingParams, max_tokens: int, stop_ids: Sequence[int],
                    logit_bias: Mapping[int, float], seed: int | None) -> dict[str, Any]:
    """The arguments of `vllm.SamplingParams` for one request: one sample, its own log-prob, ids only."""
    return dict(
        n=1,
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        top_k=int(sampling.top_k),  # 0 = off, as ours
        max_tokens=int(max_tokens),
        stop_token_ids=list(stop_ids),
        logit_bias=dict(logit_bias),
        logprobs=0,  # the sampled token's own log-prob
        seed=seed,
        skip_special_tokens=False,
        detokenize=False,
    )


class VLLMBackend:
    """Samples with a vLLM `LLM` that holds its own copy of the policy's weights."""

    def __init__(self, policy, stop_tokens: Sequence[str] = STOP_TOKENS, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 16384, max_images: int = 16,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, tensor_parallel_size: int = 1,
                 **llm_kwargs: Any):
        """policy: the `Policy` being trained (its spec names the checkpoint vLLM loads).

        dtype: vLLM's dtype (default: the policy model's); weights are cast to it on every update.
        gpu_memory_utilization / max_model_len / enable_prefix_caching / enforce_eager /
        tensor_parallel_size / llm_kwargs: passed to `vllm.LLM`. max_images: images per prompt.
        """
        import torch

        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "the vLLM backend needs vLLM: pip install -e '.[vllm]' (on a machine with a CUDA GPU), "
                "or sample with agents.generation.HFBackend"
            ) from error
        from agents.loading import resolve_model_path

        if policy.spec is None:
            raise ValueError("VLLMBackend needs a Policy made by Policy.load(spec): vLLM loads the checkpoint itself")
        self.policy = policy
        self.processor = policy.processor
        self.tokenizer = policy.tokenizer
        self.stop_ids = stop_token_ids(self.tokenizer, stop_tokens)
        self.image_token_id = policy.image_token_id
        self.suppress_bias = {int(i): SUPPRESS_BIAS for i in policy.suppressed_ids}
        dtype = dtype or str(next(policy.model.parameters()).dtype).removeprefix("torch.")
        self.dtype = getattr(torch, dtype)
        placement = engine_placement(tensor_parallel_size, _world_size(), torch.cuda.device_count(), os.environ)
        os.environ.update(placement.environ)
        self.in_process = placement.in_process
        self._updated = False  # whether update_weights has sent every weight once
        self.llm = LLM(**engine_kwargs(
            resolve_model_path(policy.spec), dtype, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, max_images=max_images, enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
            **placement.llm_kwargs, **llm_kwargs,
        ))

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams,
                 seed: int | None = None, on_finish: OnFinish | None = None) -> list[GenerationResult]:
        """Sample all requests in one `LLM.generate` call (on_finish runs after it: vLLM's offline
        API returns all completions together)."""
        from vllm import SamplingParams as VLLMSamplingParams

        if not requests:
            return []
        prompts = [vllm_prompt(request, self.image_token_id) for request in requests]
        params = [VLLMSamplingParams(**sampling_kwargs(
            sampling, min(int(request.max_new_tokens), sampling.max_new_tokens), self.stop_ids, self.suppress_bias,
            None if seed is None else seed * 1_000_003 + i)) for i, request in enumerate(requests)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for request, output in zip(requests, outputs):
            if list(output.prompt_token_ids) != list(request.token_ids):
                raise ValueError(
                    "vLLM expanded the image placeholders differently from the policy's processor "
                    f"({len(output.prompt_token_ids)} vs {len(request.token_ids)} prompt tokens): both must read the "
                    "same processor config (max_pixels, patch and merge size) from the checkpoint folder"
                )
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs or [])]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(ids)} tokens")
            reason = "stop" if ids and ids[-1] in self.stop_ids else "length"
            results.append(GenerationResult(ids, logprobs, reason))
            if on_finish is not None:
                on_finish(len(results) - 1, results[-1])
        return results

    def update_weights(self, model) -> SyncStats:
        """Load the trainer's weights into vLLM, one layer at a time, then drop the caches computed
        with the old ones. Every rank calls it together (FSDP2 gathers are collectives). The first
        update sends every weight (a resumed run's frozen weights may differ from the checkpoint
        vLLM loaded); later ones only what training changes (`trainable_only`)."""
        stats = stream_weights(model, self._load, dtype=self.dtype, trainable_only=self._updated)
        self._updated = True
        self.drop_caches()
        return stats

    def drop_caches(self) -> None:
        """Forget the KV blocks (prefix cache) and vision embeddings (encoder cache) vLLM computed:
        after a weight update both are stale."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running): update weights "
                               "between generate calls")
        self.llm.llm_engine.reset_encoder_cache()

    def _load(self, chunk: Chunk) -> None:
        loaded = self.llm.collective_rpc(LOAD_WEIGHTS, args=(chunk if self.in_process else pack_chunk(chunk),))
        if not all(loaded):
            raise RuntimeError(f"vLLM's model loaded none of {[name for name, _ in chunk][:4]}: their names do not "
                               "match its checkpoint format (is the engine serving the policy's model family?)")


def vllm_prompt(request: GenerationRequest, image_token_id: int) -> dict[str, Any]:
    """vLLM's prompt for a request: its ids with each image's placeholders collapsed, and its images."""
    prompt: dict[str, Any] = {"prompt_token_ids": collapse_image_spans(request.token_ids, image_token_id)}
    if request.images:
        prompt["multi_modal_data"] = {"image": list(request.images)}
    return prompt


def collapse_image_spans(token_ids: Sequence[int], image_token_id: int) -> list[int]:
    """The ids with every run of image placeholders reduced to one (vLLM expands them itself)."""
    out, previous_end = [], 0
    for start, end in image_token_spans(list(token_ids), image_token_id):
        out.extend(token_ids[previous_end:start + 1])
        previous_end = end
    out.extend(token_ids[previous_end:])
    return out


def _world_size() -> int:
    """Ranks of this job: the process group's when there is one, else torchrun's WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
