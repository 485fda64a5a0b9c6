"""Chunked log-probs and entropy: hand-computed values, equality with the full-logits computation."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from agents.logprobs import naive_sequence_logprobs, sequence_logprobs, token_logprobs  # noqa: E402


def test_hand_computed_values():
    # Identity head: the hidden state is the logit vector.
    weight = torch.eye(3)
    hidden = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(3.0)]])
    targets = torch.tensor([1, 2])
    lp, ent = token_logprobs(hidden, targets, weight)
    # Uniform over 3: log(1/3), entropy log 3. Logits (0, log2, log3) -> p = (1, 2, 3) / 6.
    p = torch.tensor([1.0, 2.0, 3.0]) / 6
    assert lp.tolist() == pytest.approx([math.log(1 / 3), math.log(3 / 6)], abs=1e-6)
    assert ent.tolist() == pytest.approx([math.log(3), float(-(p * p.log()).sum())], abs=1e-6)
    # Suppressing token 0 renormalises over the other two: p = (2, 3) / 5.
    lp, ent = token_logprobs(hidden, targets, weight, suppressed_ids=[0])
    assert lp.tolist() == pytest.approx([math.log(1 / 2), math.log(3 / 5)], abs=1e-6)
    assert ent[0].item() == pytest.approx(math.log(2), abs=1e-6)
    # Temperature 2 halves the logits: (0, log2/2, log3/2) -> p ∝ (1, √2, √3).
    lp, _ = token_logprobs(hidden[1:], targets[1:], weight, temperature=2.0)
    z = 1 + math.sqrt(2) + math.sqrt(3)
    assert lp.item() == pytest.approx(math.log(math.sqrt(3) / z), abs=1e-6)


def test_alignment_position_zero_and_unscored_positions_are_zero():
    weight = torch.eye(4)
    hidden = torch.randn(1, 5, 4)
    ids = torch.tensor([[3, 1, 2, 0, 1]])
    lp, _ = sequence_logprobs(hidden, ids, weight)
    assert lp[0, 0] == 0
    # [b, t] scores ids[t] from the hidden state at t-1.
    assert lp[0, 2].item() == pytest.approx(torch.log_softmax(hidden[0, 1], -1)[2].item(), abs=1e-6)
    mask = torch.tensor([[0, 0, 1, 0, 1]], dtype=torch.bool)
    masked, _ = sequence_logprobs(hidden, ids, weight, positions_BT=mask)
    assert masked[0, [0, 1, 3]].tolist() == [0, 0, 0]
    assert masked[0, [2, 4]].tolist() == pytest.approx(lp[0, [2, 4]].tolist(), abs=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_full_logits_within_1e5(chunk_size, temperature):
    torch.manual_seed(0)
    B, T, H, V = 3, 37, 32, 1000
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) / math.sqrt(H) * 4
    ids = torch.randint(0, V, (B, T))
    suppressed = [5, 6, 999]
    ids[ids == 5] = 4
    lp, ent = sequence_logprobs(hidden, ids, weight, temperature=temperature, suppressed_ids=suppressed,
                                chunk_size=chunk_size)
    ref_lp, ref_ent = naive_sequence_logprobs(hidden @ weight.T, ids, temperature=temperature,
                                              suppressed_ids=suppressed)
    assert torch.allclose(lp, ref_lp, atol=1e-5, rtol=0)
    assert torch.allclose(ent, ref_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_equal_full_logits(temperature):
    torch.manual_seed(1)
    B, T, H, V = 2, 20, 16, 300
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / 4).requires_grad_()
    bias = torch.randn(V).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    ids[0, 3] = 0  # a suppressed target: its (constant floor) log-prob sends no gradient anywhere
    coeff = torch.randn(B, T)
    lp, ent = sequence_logprobs(hidden, ids, weight, bias, chunk_size=6, suppressed_ids=[0, 7],
                                temperature=temperature)
    ((lp * coeff).sum() + 0.3 * (ent * coeff).sum()).backward()
    grads = hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()
    hidden.grad = weight.grad = bias.grad = None
    ref_lp, ref_ent = naive_sequence_logprobs(hidden @ weight.T + bias, ids, suppressed_ids=[0, 7],
                                              temperature=temperature)
    ref_lp = torch.where(torch.isinf(ref_lp), torch.zeros_like(ref_lp), ref_lp)
    ((ref_lp * coeff).sum() + 0.3 * (ref_ent * coeff).sum()).backward()
    for ours, reference in zip(grads, (hidden.grad, weight.grad, bias.grad)):
        assert torch.allclose(ours, reference, atol=1e-5)


def test_bfloat16_head_runs_forward_and_backward():
    torch.manual_seed(2)
    hidden = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    lp, ent = token_logprobs(hidden, targets, weight, chunk_size=4)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    ref = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-5)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(weight.grad.float()).all()


def test_bad_inputs_are_explained():
    weight = torch.eye(3)
    with pytest.raises(ValueError, match=r"hidden \[N, H\] and targets \[N\]"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), weight)
    with pytest.raises(ValueError, match="greedy sampling scores at 1.0"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), weight, temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), weight, chunk_size=0)
    with pytest.raises(ValueError, match="does not match hidden states"):
        sequence_logprobs(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long), weight)
