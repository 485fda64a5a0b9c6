"""Token log-probs and entropy from hidden states, a chunk of tokens at a time.

The language-model head of a Qwen-VL model maps each hidden state to ~152k logits. For an
8k-token batch the naive `log_softmax(model(...).logits)` holds several [tokens x vocab] float
tensors (logits, log-softmax, their gradients): tens of GiB. Here the head is applied to
`chunk_size` tokens at a time; under autograd each chunk is checkpointed, so backward recomputes
that chunk's logits instead of keeping them, and the peak is one chunk's logits.

The distribution is the sampler's: logits in float32, divided by `temperature`, with the
suppressed ids (the vision placeholders `generate` never samples) removed. Sampler and trainer
then agree on what a token's log-prob means.

Alignment (used everywhere in agents/ and algos/): `logprobs_BT[b, t]` is the log-prob of
`input_ids[b, t]` given the tokens before it; position 0 has no prediction and is 0. A loss
mask that marks sampled tokens therefore indexes the result directly. A suppressed token (never
sampled) scores the float32 floor, a huge finite negative, so multiplying by a 0 mask stays 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden_NH, targets_N, weight_VH, bias_V, temperature: float, suppressed: torch.Tensor | None):
    logits = F.linear(hidden_NH, weight_VH, bias_V).float()
    if temperature != 1.0:
        logits = logits / temperature
    if suppressed is not None and suppressed.numel():
        # A finite floor instead of -inf keeps p*log(p) at 0 (not nan) in the entropy.
        logits = logits.index_fill(-1, suppressed, torch.finfo(logits.dtype).min)
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def _chunk_logprobs_inplace(hidden_NH, targets_N, weight_VH, bias_V, temperature: float,
                            suppressed: torch.Tensor | None):
    """`_chunk_logprobs` without autograd, holding at most two [chunk, vocab] tensors."""
    logits = F.linear(hidden_NH, weight_VH, bias_V).float()
    if temperature != 1.0:
        logits.div_(temperature)
    if suppressed is not None and suppressed.numel():
        logits.index_fill_(-1, suppressed, torch.finfo(logits.dtype).min)
    logp = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    logprobs = logp.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)
    entropy = -logp.exp().mul_(logp).sum(-1)
    return logprobs, entropy


def token_logprobs(
    hidden_NH: torch.Tensor,
    targets_N: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    suppressed_ids: list[int] | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and the entropy of each distribution, for N hidden states.

    hidden_NH: the hidden state that predicts each target (already shifted), any float dtype.
    weight_VH / bias_V: the LM head (`model.lm_head.weight`). Returns two float32 [N] tensors.
    Differentiable with respect to `hidden_NH` and the head; memory is O(chunk_size x vocab).
    """
    if hidden_NH.dim() != 2 or targets_N.dim() != 1 or hidden_NH.shape[0] != targets_N.shape[0]:
        raise ValueError(
            f"token_logprobs needs hidden [N, H] and targets [N], got {tuple(hidden_NH.shape)} and "
            f"{tuple(targets_N.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs (greedy sampling scores at 1.0), got {temperature}")
    suppressed = None
    if suppressed_ids is not None and len(suppressed_ids):
        suppressed = torch.as_tensor(suppressed_ids, dtype=torch.long, device=hidden_NH.device)
    grad = torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad)
    logprobs, entropies = [], []
    for start in range(0, hidden_NH.shape[0], chunk_size):
        args = (hidden_NH[start:start + chunk_size], targets_N[start:start + chunk_size], weight_VH, bias_V,
                float(temperature), suppressed)
        if grad:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs_inplace(*args)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def sequence_logprobs(
    hidden_BTH: torch.Tensor,
    input_ids_BT: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    *,
    positions_BT: torch.Tensor | None = None,
    temperature: float = 1.0,
    suppressed_ids: list[int] | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-aligned log-probs and entropies [B, T] of a batch (see the module docstring).

    positions_BT: optional bool mask of the target positions to compute (e.g. the loss mask);
    others are 0. Position 0 is always 0.
    """
    B, T, H = hidden_BTH.shape
    if input_ids_BT.shape != (B, T):
        raise ValueError(f"input_ids {tuple(input_ids_BT.shape)} does not match hidden states {(B, T, H)}")
    wanted_BT = torch.ones(B, T, dtype=torch.bool, device=hidden_BTH.device)
    if positions_BT is not None:
        wanted_BT = positions_BT.to(device=hidden_BTH.device, dtype=torch.bool).clone()
    wanted_BT[:, 0] = False
    rows_b, rows_t = wanted_BT.nonzero(as_tuple=True)
    lp_N, ent_N = token_logprobs(
        hidden_BTH[rows_b, rows_t - 1], input_ids_BT[rows_b, rows_t], weight_VH, bias_V,
        temperature=temperature, suppressed_ids=suppressed_ids, chunk_size=chunk_size,
    )
    logprobs_BT = torch.zeros(B, T, dtype=torch.float32, device=hidden_BTH.device)
    entropy_BT = torch.zeros(B, T, dtype=torch.float32, device=hidden_BTH.device)
    logprobs_BT = logprobs_BT.index_put((rows_b, rows_t), lp_N)
    entropy_BT = entropy_BT.index_put((rows_b, rows_t), ent_N)
    return logprobs_BT, entropy_BT


def naive_sequence_logprobs(
    logits_BTV: torch.Tensor,
    input_ids_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
    suppressed_ids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-logits reference of `sequence_logprobs` (for tests and the benchmark)."""
    logits = logits_BTV[:, :-1].float() / temperature
    if suppressed_ids:
        logits[..., list(suppressed_ids)] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, input_ids_BT[:, 1:].unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    zeros = torch.zeros_like(lp[:, :1])
    return torch.cat([zeros, lp], 1), torch.cat([zeros, ent], 1)
