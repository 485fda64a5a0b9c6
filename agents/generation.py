"""Generation backends: one interface, a transformers implementation here, vLLM in `vllm_backend`.

A backend turns a batch of token prompts (with their images) into sampled continuations and the
sampler's log-prob of every sampled token:

    backend = HFBackend(policy)
    results = backend.generate([GenerationRequest(ids, images, pixel_values, grids, max_new_tokens)],
                               SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256))
    results[0].token_ids, results[0].logprobs, results[0].finish_reason   # "stop" or "length"

Prompts are token ids, never text: the rollout engine owns tokenization (see agents.conversation).
A turn ends at `<|im_end|>` or `</tool_call>` (the stop token is kept) or at max_new_tokens.

Log-prob convention, shared with `Policy.logprobs`: log-softmax of the float32 logits divided by
the temperature, with the vision placeholder ids suppressed, *before* top-k / top-p truncation
(truncation changes which tokens can be drawn, not the policy being trained). Greedy decoding
(temperature 0) reports log-probs at temperature 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol, Sequence

import torch
from PIL import Image

from agents.conversation import ChatRenderer, check_image_tokens
from agents.policy import _core
from agents.templates import after_prefill

STOP_TOKENS = ("<|im_end|>", "</tool_call>")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one assistant turn.

    temperature: 0 for greedy decoding; top_p: nucleus mass (1.0 = off); top_k: 0 = off;
    max_new_tokens: the most tokens one turn may have.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_dict(cls, d: "SamplingParams | dict | None") -> "SamplingParams":
        """Build from a config mapping; unknown keys are an error that lists the valid ones."""
        if isinstance(d, SamplingParams):
            return d
        d = dict(d or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**d)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature the reported log-probs are computed at."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: token ids with expanded image placeholders, and the images they stand for.

    pixel_values / image_grid_thw: the processor's outputs for `images` (the HF backend uses them;
    vLLM re-processes `images` itself). max_new_tokens: this prompt's own limit (e.g. what is left
    of an episode's token budget), at most the sampling's. key / task: which episode asks (model
    backends ignore them; `ScriptedBackend` plays the task's scripted agent).
    """

    token_ids: list[int]
    images: list[Image.Image]
    pixel_values: torch.Tensor | list[torch.Tensor] | None  # a list: chunks in order, concatenated once per batch
    image_grid_thw: list[list[int]]
    max_new_tokens: int
    key: str = ""
    task: Any = None


@dataclass(frozen=True)
class GenerationResult:
    """The sampled ids (stop token included), their sampler log-probs, and why sampling ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)


OnFinish = Callable[[int, GenerationResult], None]


class GenerationBackend(Protocol):
    """What the rollout engine needs from a generator."""

    processor: Any

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams,
                 seed: int | None = None, on_finish: OnFinish | None = None) -> list[GenerationResult]:
        """Sample one continuation per request, all in one batched call.

        on_finish(i, result), when given, is called exactly once per request, as soon as request
        i's turn is complete (possibly while other rows are still generating), so the caller can
        start that episode's env step early.
        """

    def update_weights(self, model) -> None:
        """Load the trainer's current weights into the generator (no-op when they are shared)."""


def stop_token_ids(tokenizer, stop_tokens: Sequence[str] = STOP_TOKENS) -> list[int]:
    """Ids of the stop tokens (each must be a single token of `tokenizer`)."""
    ids = []
    for token in stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"stop token {token!r} is not a single token of this tokenizer: add it as a special token")
        ids.append(int(token_id))
    return ids


class _LogprobRecorder:
    """A logits processor that records each sampled token's log-prob and reports finished rows early.

    At step t it sees the logits of step t (vision ids already suppressed) and keeps their
    log-softmax; at step t+1 the token sampled at t is the last input id, and is scored then. Only
    one [B, vocab] tensor is alive at a time. A row whose last token is a stop token, or which
    reached its own token limit, is complete: `on_finish` gets it at once, while the batch goes on.
    """

    def __init__(self, temperature: float, width: int, limits: list[int], stop_ids: list[int],
                 on_finish: OnFinish | None):
        self.temperature = temperature
        self.width, self.limits, self.on_finish = width, limits, on_finish
        self.stop_ids, self.stop_set = stop_ids, set(stop_ids)
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # [B] log-probs per decoding step, on the model's device
        self.results: dict[int, GenerationResult] = {}
        self._device_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._score(input_ids[:, -1]):
            self._report(input_ids)
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _score(self, tokens: torch.Tensor) -> bool:
        if self.previous is None:
            return False
        self.steps.append(self.previous.gather(1, tokens.unsqueeze(1)).squeeze(1))
        self.previous = None
        return True

    def _report(self, input_ids: torch.Tensor, final: bool = False) -> None:
        """Hand over every row that is complete now (every remaining row when final).

        The check runs on the device and costs one scalar transfer per step; token ids and
        log-probs are copied to the host only for rows that just finished.
        """
        if self._device_state is None:
            device = input_ids.device
            self._device_state = (torch.tensor(self.stop_ids, device=device),
                                  torch.tensor(self.limits, device=device),
                                  torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device))
        stop_ids, limits, reported = self._device_state
        n = input_ids.shape[1] - self.width
        done = torch.ones_like(reported) if final else torch.isin(input_ids[:, -1], stop_ids) | (n >= limits)
        done &= ~reported
        if not bool(done.any()):
            return
        reported |= done
        rows = done.nonzero().flatten().tolist()
        new = input_ids[rows, self.width:].cpu()
        logprobs = torch.stack(self.steps, 1)[rows].cpu()
        for k, b in enumerate(rows):
            ids = new[k, : self.limits[b]].tolist()
            end, reason = len(ids), "length"
            for i, token in enumerate(ids):
                if token in self.stop_set:
                    end, reason = i + 1, "stop"
                    break
            self.results[b] = GenerationResult(ids[:end], logprobs[k, :end].tolist(), reason)
            if self.on_finish is not None:
                self.on_finish(b, self.results[b])

    def finish(self, sequences: torch.Tensor) -> list[GenerationResult]:
        """Score the last step and complete every row still open; results in row order."""
        self._score(sequences[:, -1])
        self._report(sequences, final=True)
        return [self.results[b] for b in range(sequences.shape[0])]


class _RowLimits:
    """A stopping criterion: each row stops at its own max_new_tokens (the batch runs to the longest)."""

    def __init__(self, width: int, limits: list[int]):
        self.width, self.limits = width, torch.tensor(limits)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.width >= self.limits).to(input_ids.device)


class HFBackend:
    """Batched, left-padded `model.generate` on the policy's own model (weights are shared)."""

    def __init__(self, policy, stop_tokens: Sequence[str] = STOP_TOKENS, logits_processors: Sequence = ()):
        """policy: the `agents.policy.Policy` to sample from.

        stop_tokens: tokens that end a turn (kept in the output).
        logits_processors: extra `transformers` logits processors run after the log-prob recorder
        (constrained decoding): they steer which token is drawn, while the reported log-probs stay
        those of the policy's own distribution.
        """
        self.policy = policy
        self.processor = policy.processor
        self.stop_ids = stop_token_ids(policy.tokenizer, stop_tokens)
        self.logits_processors = list(logits_processors)

    def update_weights(self, model) -> None:
        """No-op: the HF backend samples from the very model the trainer updates."""

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams,
                 seed: int | None = None, on_finish: OnFinish | None = None) -> list[GenerationResult]:
        if not requests:
            return []
        policy = self.policy
        device = policy.device
        lengths = [len(r.token_ids) for r in requests]
        width = max(lengths)
        input_ids = torch.full((len(requests), width), policy.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(requests), width, dtype=torch.long)
        pixel_values, grids = [], []
        for b, request in enumerate(requests):
            check_image_tokens(request.token_ids, request.image_grid_thw, policy.image_token_id, policy.merge_size,
                               f"generation prompt {b}")
            input_ids[b, width - lengths[b]:] = torch.tensor(request.token_ids, dtype=torch.long)
            attention_mask[b, width - lengths[b]:] = 1
            if request.image_grid_thw:
                if request.pixel_values is None:
                    pixel_values.append(policy.pixel_values(request.images))
                elif isinstance(request.pixel_values, (list, tuple)):
                    pixel_values.extend(request.pixel_values)
                else:
                    pixel_values.append(request.pixel_values)
                grids.extend(request.image_grid_thw)
        inputs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "mm_token_type_ids": (input_ids == policy.image_token_id).long().to(device),
        }
        if pixel_values:
            inputs["pixel_values"] = torch.cat(pixel_values, 0).to(device)
            inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long, device=device)

        limits = [min(int(r.max_new_tokens), sampling.max_new_tokens) for r in requests]
        if min(limits) < 1:
            raise ValueError(f"every request needs max_new_tokens >= 1, got {limits}")
        recorder = _LogprobRecorder(sampling.logprob_temperature, width, limits, self.stop_ids, on_finish)
        if seed is not None:
            torch.manual_seed(seed)
        with self._generation_config(sampling, max(limits)), torch.inference_mode(), _eval_mode(policy.model):
            sequences = policy.model.generate(**inputs, logits_processor=[recorder, *self.logits_processors],
                                              stopping_criteria=[_RowLimits(width, limits)])
            return recorder.finish(sequences)

    @contextlib.contextmanager
    def _generation_config(self, sampling: SamplingParams, max_new_tokens: int):
        """Swap in a clean generation config: a checkpoint's own defaults (repetition penalty,
        top-k, ...) would change the distribution behind the trainer's back."""
        from transformers import GenerationConfig

        model = _core(self.policy.model)  # under peft the wrapped model is the one generate() reads
        config = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=sampling.top_k if not sampling.greedy else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.policy.pad_token_id,
            suppress_tokens=self.policy.suppressed_ids,
            use_cache=True,
        )
        previous = model.generation_config
        model.generation_config = config
        try:
            yield config
        finally:
            model.generation_config = previous


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class ScriptedBackend:
    """A backend whose "model" is a scripted agent (e.g. `OracleAgent`) per episode.

    Each turn is the agent's text, tokenized canonically and ended with the end-of-turn token,
    with log-prob 0.0 (nothing was sampled). Under a template whose generation prompt pre-fills
    the turn's opening (Qwen3-VL-Thinking's "<think>\\n"), the agent's own opening is left out:
    the template already wrote it. Through the rollout engine this yields token-exact
    demonstrations (SFT data: `python -m agents.collect`) and measures the engine's own overhead
    with zero model time. Observations are not passed to the agent (the oracle needs none).
    """

    def __init__(self, processor, agent_factory=None, end_of_turn: str = "<|im_end|>"):
        from agents.scripted import OracleAgent

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.agent_factory = agent_factory or OracleAgent
        self.end_of_turn = end_of_turn
        self.prefill = ChatRenderer(processor).prefill
        self._agents: dict[str, Any] = {}

    def update_weights(self, model) -> None:
        """No-op: a scripted agent has no weights."""

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams,
                 seed: int | None = None, on_finish: OnFinish | None = None) -> list[GenerationResult]:
        results = []
        for index, request in enumerate(requests):
            if request.task is None or not request.key:
                raise ValueError("ScriptedBackend needs requests with a task and an episode key (the rollout "
                                 "engine sets both)")
            agent = self._agents.get(request.key)
            if agent is None:  # the episode's first turn
                agent = self._agents[request.key] = self.agent_factory()
                agent.reset(request.task)
            text = agent.act()
            written = after_prefill(text, self.prefill)  # None: the agent did not write the opening
            ids = self.tokenizer((text if written is None else written) + self.end_of_turn,
                                 add_special_tokens=False)["input_ids"]
            limit = min(int(request.max_new_tokens), sampling.max_new_tokens)
            reason = "stop" if len(ids) <= limit else "length"
            ids = ids[:limit]
            results.append(GenerationResult(ids, [0.0] * len(ids), reason))
            if on_finish is not None:
                on_finish(index, results[-1])
        return results

    def reset(self) -> None:
        """Forget every episode's agent (the rollout engine calls it at the start of each rollout,
        whose episode keys start again)."""
        self._agents.clear()
