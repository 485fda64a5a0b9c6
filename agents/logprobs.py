"""Token log-probs and entropy from hidden states, a chunk of tokens at a time.

The language-model head of a Qwen-VL model maps each hidden state to ~152k logits. For an
8k-token batch the naive `log_softmax(model(...).logits)` holds several [tokens x vocab] float
tensors (logits, log-softmax, their gradients): tens of GiB. Here the head is applied to
`chunk_size` tokens at a time, in place; a custom autograd function keeps only the inputs and,
in backward, recomputes each chunk's log-softmax and turns it into that chunk's logit gradient in
place, so forward and backward peak at about two [chunk x vocab] float32 tensors.

Under FSDP2 the head's weight must be unsharded while this runs (it is read outside
`lm_head.forward`): e.g. keep `lm_head` in the root FSDP unit.

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


def _chunk_log_softmax(hidden_NH, weight_VH, bias_V, temperature: float, suppressed: torch.Tensor | None):
    """log-softmax of one chunk's sampler logits, computed in place: one [chunk, vocab] tensor."""
    logits = F.linear(hidden_NH, weight_VH, bias_V).float()
    if temperature != 1.0:
        logits.div_(temperature)
    if suppressed is not None:
        # A finite floor instead of -inf keeps p*log(p) at 0 (not nan) in the entropy.
        logits.index_fill_(-1, suppressed, torch.finfo(logits.dtype).min)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


class _ChunkedLogprobs(torch.autograd.Function):
    """Log-probs and entropies whose forward and backward each hold O(chunk x vocab) memory.

    Backward recomputes a chunk's log-softmax and forms the logit gradient in place:
    d logp_target / dz = onehot - p, d H / dz = -p * (log p + H), for z = logits / temperature.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, targets_N, temperature, suppressed, chunk_size):
        logprobs, entropies = [], []
        for start in range(0, hidden_NH.shape[0], chunk_size):
            logp = _chunk_log_softmax(hidden_NH[start:start + chunk_size], weight_VH, bias_V, temperature, suppressed)
            logprobs.append(logp.gather(-1, targets_N[start:start + chunk_size].unsqueeze(-1)).squeeze(-1))
            entropies.append(-logp.exp().mul_(logp).sum(-1))
            del logp
        entropy_N = torch.cat(entropies)
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, targets_N, entropy_N)
        ctx.temperature, ctx.suppressed, ctx.chunk_size = temperature, suppressed, chunk_size
        return torch.cat(logprobs), entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        hidden_NH, weight_VH, bias_V, targets_N, entropy_N = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden_NH) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight_VH, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias_V, dtype=torch.float32) if bias_V is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden_NH.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden_NH[rows]
            logp = _chunk_log_softmax(h, weight_VH, bias_V, ctx.temperature, ctx.suppressed)
            p = logp.exp()
            g_lp = grad_logprobs_N[rows].float().unsqueeze(-1)
            if ctx.suppressed is not None:  # a suppressed token's log-prob is a constant (-inf in truth)
                g_lp = g_lp * ~torch.isin(targets_N[rows], ctx.suppressed).unsqueeze(-1)
            g_ent = grad_entropy_N[rows].float().unsqueeze(-1)
            # grad_z = g_lp * (onehot - p) - g_ent * p * (logp + H), built in place in `p`.
            logp.add_(entropy_N[rows].unsqueeze(-1)).mul_(p).mul_(g_ent)
            p.mul_(g_lp).add_(logp).neg_()
            del logp
            p.scatter_add_(-1, targets_N[rows].unsqueeze(-1), g_lp)
            if ctx.suppressed is not None:
                p.index_fill_(-1, ctx.suppressed, 0.0)  # the floor is a constant: no gradient flows there
            if ctx.temperature != 1.0:
                p.div_(ctx.temperature)
            if grad_hidden is not None:
                grad_hidden[rows] = (p.to(weight_VH.dtype) @ weight_VH).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(p.t(), h.float())
            if grad_bias is not None:
                grad_bias += p.sum(0)
            del p
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VH.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_V.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


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
    Differentiable with respect to `hidden_NH` and the head; forward and backward hold
    O(chunk_size x vocab) memory beyond the inputs and their gradients.
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
    if hidden_NH.shape[0] == 0:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        return empty, empty
    suppressed = None
    if suppressed_ids is not None and len(suppressed_ids):
        suppressed = torch.as_tensor(suppressed_ids, dtype=torch.long, device=hidden_NH.device)
    return _ChunkedLogprobs.apply(hidden_NH, weight_VH, bias_V, targets_N, float(temperature), suppressed,
                                  int(chunk_size))


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
