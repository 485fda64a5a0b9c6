"""vLLM generation backend (GPU): multi-modal token prompts, sampled ids and their log-probs.

    backend = VLLMBackend(policy, gpu_memory_utilization=0.5)     # or VLLMBackend.from_spec(...)
    engine = RolloutEngine(backend, sandbox=sandbox, ...)
    ...; backend.update_weights(policy.model)                     # after each optimizer step

Requires `pip install vllm` (the `[vllm]` extra) and a CUDA GPU; importing this module without
vLLM is fine, building a backend then raises a clear error. Tested only where a GPU exists
(tests marked `gpu`).

Token exactness: the engine's prompts hold image placeholders already expanded to each image's
grid; vLLM expands placeholders itself, so each run is collapsed to one `<|image_pad|>` before the
call and vLLM's own expansion is checked to give back exactly the engine's ids (the same processor
config computes the same grids); a mismatch is an error, never a silent drift.

Log-probs follow the convention of `agents.generation`: the engine runs with
`logprobs_mode="processed_logprobs"`, the vision ids get a -100 logit bias (vLLM ignores
generation_config.suppress_tokens), and each sampled token's log-prob is returned. With top-k /
top-p, vLLM's processed log-probs are taken after truncation, which the trainer cannot recompute:
keep top_k=0, top_p=1.0 for on-policy log-probs, or recompute them with `Policy.logprobs`.

Weights: `update_weights(model)` loads the trainer's parameters into the vLLM model in place (LoRA
adapters merged first) and clears the prefix cache. It reaches the model through the in-process
engine, so it needs `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set by this module before vLLM starts).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from agents.conversation import image_token_spans
from agents.generation import (STOP_TOKENS, GenerationRequest, GenerationResult, OnFinish, SamplingParams,
                               stop_token_ids)

SUPPRESS_BIAS = -100.0  # vLLM's logit bias range is [-100, 100]; exp(-100) is 0 in float32 softmax


def vllm_available() -> bool:
    """Whether vLLM is importable and a CUDA device exists."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class VLLMBackend:
    """Samples with a vLLM `LLM` that holds its own copy of the policy's weights."""

    def __init__(self, policy, stop_tokens: Sequence[str] = STOP_TOKENS, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 16384, max_images: int = 16,
                 enable_prefix_caching: bool = True, **llm_kwargs: Any):
        """policy: the `Policy` being trained (its spec names the checkpoint vLLM loads).

        dtype: vLLM's dtype (default: the policy model's). gpu_memory_utilization / max_model_len /
        enable_prefix_caching / llm_kwargs: passed to `vllm.LLM`. max_images: images per prompt.
        """
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the model reachable in-process
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
        model_dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(
            model=resolve_model_path(policy.spec),
            dtype=dtype or model_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images},
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams,
                 seed: int | None = None, on_finish: OnFinish | None = None) -> list[GenerationResult]:
        """Sample all requests in one `LLM.generate` call (on_finish runs after it: vLLM's offline
        API returns all completions together)."""
        from vllm import SamplingParams as VLLMSamplingParams

        if not requests:
            return []
        prompts, params = [], []
        for i, request in enumerate(requests):
            prompt: dict[str, Any] = {"prompt_token_ids": collapse_image_spans(request.token_ids, self.image_token_id)}
            if request.images:
                prompt["multi_modal_data"] = {"image": list(request.images)}
            prompts.append(prompt)
            params.append(VLLMSamplingParams(
                n=1,
                temperature=float(sampling.temperature),
                top_p=float(sampling.top_p),
                top_k=int(sampling.top_k) if sampling.top_k > 0 else -1,
                max_tokens=min(int(request.max_new_tokens), sampling.max_new_tokens),
                stop_token_ids=list(self.stop_ids),
                logit_bias=dict(self.suppress_bias),
                logprobs=0,  # the sampled token's own log-prob
                seed=None if seed is None else seed * 1_000_003 + i,
                skip_special_tokens=False,
                detokenize=False,
            ))
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

    def update_weights(self, model) -> None:
        """Copy the trainer's weights into vLLM in place (LoRA merged), then drop the prefix cache."""
        import torch

        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            state = model.state_dict()
            # A model sharded with FSDP2 holds DTensor shards: gather each (every rank calls this together).
            state = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in state.items()}
            if merged:  # peft names: base_model.model.<name> and <module>.base_layer.<param>
                state = {
                    name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor
                    for name, tensor in state.items() if "lora_" not in name
                }
            with torch.no_grad():
                self._vllm_model().load_weights(weights=list(state.items()))
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()

    def _vllm_model(self):
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        if executor is None:
            executor = engine.engine_core.engine_core.model_executor  # vLLM V1, in-process core
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)
        return worker.model_runner.model


def collapse_image_spans(token_ids: Sequence[int], image_token_id: int) -> list[int]:
    """The ids with every run of image placeholders reduced to one (vLLM expands them itself)."""
    out, previous_end = [], 0
    for start, end in image_token_spans(list(token_ids), image_token_id):
        out.extend(token_ids[previous_end:start + 1])
        previous_end = end
    out.extend(token_ids[previous_end:])
    return out
