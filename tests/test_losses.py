"""Losses against hand-computed values (the arithmetic is in the comments), plus a toy GRPO run."""

import math

import pytest
import torch

from algos.advantages import grpo_advantages, rloo_advantages
from algos.losses import aggregate, entropy_from_logits, kl_in_reward, kl_penalty, policy_loss, value_loss


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- aggregate ------------------------------------------------------------------------------

LOSS_BT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
MASK_BT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # row 2: excluded (e.g. truncated)


@pytest.mark.parametrize("mode, max_len, expected", [
    ("token-mean", None, 3.4),                # (1 + 2 + 3 + 5 + 6) / 5 tokens = 17 / 5
    ("seq-mean-token-sum", None, 8.5),        # row sums 6 and 11 -> (6 + 11) / 2 sequences
    ("seq-mean-token-mean", None, 3.75),      # row means 6/3 = 2 and 11/2 = 5.5 -> (2 + 5.5) / 2
    ("seq-mean-token-sum-norm", 4, 2.125),    # (6/4 + 11/4) / 2 = (1.5 + 2.75) / 2
    ("seq-mean-token-sum-norm", 10, 0.85),    # (6/10 + 11/10) / 2
])
def test_aggregate_modes(mode, max_len, expected):
    _close(aggregate(LOSS_BT, MASK_BT, mode, max_len=max_len), expected)
    _close(aggregate(LOSS_BT, MASK_BT.bool(), mode, max_len=max_len), expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_fully_masked_batch_is_a_differentiable_zero(mode):
    loss_BT = LOSS_BT.clone().requires_grad_()
    loss = aggregate(loss_BT, torch.zeros_like(MASK_BT), mode, max_len=4)
    assert loss.item() == 0.0
    loss.backward()  # every rank of a DDP run must be able to call backward
    assert torch.equal(loss_BT.grad, torch.zeros_like(LOSS_BT))


def test_aggregate_rejects_unknown_mode_and_missing_max_len():
    with pytest.raises(ValueError, match="unknown aggregation mode 'token_mean'"):
        aggregate(LOSS_BT, MASK_BT, "token_mean")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(LOSS_BT, MASK_BT, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="same \\[batch, tokens\\] shape"):
        aggregate(LOSS_BT, MASK_BT[:, :2])


# --- policy loss ----------------------------------------------------------------------------

# Tokens, with clip 0.2 / 0.28 (ratio range [0.8, 1.28]) and dual clip 10:
#   (0,0) ratio 1.1,  A=+1: inside the range          -> -1 * 1.1                 = -1.1
#   (0,1) ratio 1.5,  A=+1: clipped high              -> -1 * 1.28                = -1.28
#   (0,2) ratio 0.7,  A=-1: clipped low               -> max(0.7, 0.8)            =  0.8
#   (1,0) ratio 20,   A=-1: dual clip                 -> min(max(20, 1.28), 10)   = 10
#   (1,1) ratio 0.5,  A=+1: PPO never clips this side -> max(-0.5, -0.8)          = -0.5
#   (1,2) ratio 50,   A=+5: masked out
RATIOS = torch.tensor([[1.1, 1.5, 0.7], [20.0, 0.5, 50.0]])
ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 5.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _logprobs():
    old = torch.full((2, 3), -1.0)
    return (old + RATIOS.log()).requires_grad_(), old


def test_policy_loss_clip_higher_and_dual_clip():
    logprobs, old = _logprobs()
    loss, metrics = policy_loss(logprobs, old, ADVANTAGES, MASK)
    # token-mean: (-1.1 - 1.28 + 0.8 + 10 - 0.5) / 5 = 7.92 / 5
    _close(loss, 1.584, atol=1e-5)
    loss.backward()
    # Gradient only where no clip binds: d(-A * ratio) / dlogp = -A * ratio, over 5 tokens:
    # (0,0): -1.1 / 5 = -0.22; (1,1): -0.5 / 5 = -0.1
    _close(logprobs.grad, [[-0.22, 0.0, 0.0], [0.0, -0.1, 0.0]], atol=1e-5)
    _close(metrics["clipfrac"], 0.4)       # (0,1), (0,2) of 5 tokens
    _close(metrics["dual_clipfrac"], 0.2)  # (1,0)
    # k3 = (r - 1) - ln r: 1.1: 0.1 - 0.0953102 = 0.0046898; 1.5: 0.5 - 0.4054651 = 0.0945349;
    # 0.7: -0.3 + 0.3566749 = 0.0566749; 20: 19 - 2.9957323 = 16.0042677; 0.5: -0.5 + 0.6931472 = 0.1931472
    # sum 16.3533145 / 5
    _close(metrics["approx_kl"], 3.2706629, atol=1e-5)
    _close(metrics["ratio_mean"], 4.76, atol=1e-5)  # (1.1 + 1.5 + 0.7 + 20 + 0.5) / 5 = 23.8 / 5
    _close(metrics["ratio_min"], 0.5)
    _close(metrics["ratio_max"], 20.0, atol=1e-4)  # the masked 50 does not count
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


def test_policy_loss_without_dual_clip():
    logprobs, old = _logprobs()
    loss, metrics = policy_loss(logprobs, old, ADVANTAGES, MASK, clip_ratio_c=None)
    # (1,0) now costs max(20, 1.28) = 20: (-1.1 - 1.28 + 0.8 + 20 - 0.5) / 5 = 17.92 / 5
    _close(loss, 3.584, atol=1e-5)
    assert metrics["dual_clipfrac"].item() == 0.0


def test_policy_loss_symmetric_clip_and_seq_mean_token_mean():
    logprobs, old = _logprobs()
    loss, _ = policy_loss(logprobs, old, ADVANTAGES, MASK, clip_ratio_low=0.2, clip_ratio_high=0.2,
                          agg="seq-mean-token-mean")
    # (0,1) now clipped at 1.2: row 0 mean (-1.1 - 1.2 + 0.8) / 3 = -0.5; row 1 (10 - 0.5) / 2 = 4.75
    # -> (-0.5 + 4.75) / 2
    _close(loss, 2.125, atol=1e-5)


def test_policy_loss_broadcasts_sequence_advantages():
    logprobs, old = _logprobs()
    per_sequence, _ = policy_loss(logprobs, old, torch.tensor([2.0, -3.0]), MASK)
    per_token, _ = policy_loss(logprobs, old, torch.tensor([[2.0] * 3, [-3.0] * 3]), MASK)
    _close(per_sequence, per_token.item())


def test_policy_loss_on_policy_gradient_is_the_policy_gradient():
    # ratio = 1 everywhere: loss = mean(-A * ratio), d/dlogp_t = -A_t / N (N = 3 tokens)
    logprobs = torch.tensor([[-0.5, -2.0, -1.0]], requires_grad=True)
    loss, metrics = policy_loss(logprobs, logprobs.detach(), torch.tensor([[3.0, -1.5, 0.6]]), torch.ones(1, 3))
    _close(loss, -0.7)  # -(3 - 1.5 + 0.6) / 3
    loss.backward()
    _close(logprobs.grad, [[-1.0, 0.5, -0.2]])
    assert metrics["clipfrac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0


def test_policy_loss_stays_finite_for_exploded_ratios_and_empty_masks():
    logprobs = torch.tensor([[100.0, -100.0]], requires_grad=True)  # log-ratios far beyond exp's range
    for dual in (10.0, None):
        loss, metrics = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2),
                                    clip_ratio_c=dual)
        assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values())
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([1.0]), torch.zeros(1, 2))
    assert loss.item() == 0.0 and all(m.item() == 0.0 for m in metrics.values())
    loss.backward()


def test_policy_loss_rejects_bad_arguments():
    logprobs, old = _logprobs()
    with pytest.raises(ValueError, match="advantages must be \\[B\\].*or \\[B, T\\]"):
        policy_loss(logprobs, old, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logprobs, old, ADVANTAGES, MASK, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        policy_loss(logprobs, old, ADVANTAGES, MASK, clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="same \\[batch, tokens\\] shape"):
        policy_loss(logprobs, old[:, :2], ADVANTAGES, MASK)


# --- KL -------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # policy p = 0.5, reference q = 0.25: log_r = ln(q/p) = -0.6931472
    #   k1 = -log_r = 0.6931472; k2 = 0.5 * 0.4804530 = 0.2402265; k3 = 0.5 - 1 + 0.6931472 = 0.1931472
    # policy p = 0.25, reference q = 0.5: log_r = +0.6931472
    #   k1 = -0.6931472; k2 = 0.2402265; k3 = 2 - 1 - 0.6931472 = 0.3068528
    logp = torch.tensor([math.log(0.5), math.log(0.25), -1.3])
    ref = torch.tensor([math.log(0.25), math.log(0.5), -1.3])
    _close(kl_penalty(logp, ref, "k1"), [0.6931472, -0.6931472, 0.0])
    _close(kl_penalty(logp, ref, "k2"), [0.2402265, 0.2402265, 0.0])
    _close(kl_penalty(logp, ref, "k3"), [0.1931472, 0.3068528, 0.0])
    _close(kl_penalty(logp, ref), [0.1931472, 0.3068528, 0.0])  # k3 is the default


def test_kl_estimators_expectations_and_gradients_over_a_categorical():
    # Exact expectations over the 4 outcomes of p (no sampling): E_p[k1] = E_p[k3] = KL(p || q);
    # as losses, E_p[grad k1] = 0, E_p[grad k2] = grad KL(p || q), E_p[grad k3] = grad KL(q || p).
    theta = torch.tensor([0.3, -1.0, 0.8, 0.1], requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([0.0, 0.5, -0.4, 0.2]), dim=0)

    def expectation(kind):
        logp = torch.log_softmax(theta, dim=0)
        return (logp.exp().detach() * kl_penalty(logp, ref_logp, kind)).sum()

    def grad(value):
        return torch.autograd.grad(value, theta, retain_graph=True)[0]

    logp = torch.log_softmax(theta, dim=0)
    kl_policy_ref = (logp.exp() * (logp - ref_logp)).sum()   # KL(p || q)
    kl_ref_policy = (ref_logp.exp() * (ref_logp - logp)).sum()  # KL(q || p)
    _close(expectation("k1"), kl_policy_ref.item())
    _close(expectation("k3"), kl_policy_ref.item())
    _close(grad(expectation("k1")), [0.0] * 4)
    torch.testing.assert_close(grad(expectation("k2")), grad(kl_policy_ref))
    torch.testing.assert_close(grad(expectation("k3")), grad(kl_ref_policy))


def test_kl_penalty_is_finite_when_the_policy_abandons_a_token():
    # the policy gives the token e^-200 while the reference gives it 0.5: k3 would be exp(199.3)
    assert torch.isfinite(kl_penalty(torch.tensor([-200.0]), torch.tensor([math.log(0.5)]), "k3")).all()
    with pytest.raises(ValueError, match="unknown KL estimator 'low_var'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "low_var")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))


def test_kl_in_reward_penalises_sampled_tokens_only():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], requires_grad=True)
    shaped = kl_in_reward(rewards, kl, torch.tensor([[1, 1, 1], [1, 1, 0]]), coef=0.5)
    # r - 0.5 * kl: [0 - .05, 0 - .1, 1 - .15], [0 - .2, 2 - .25, (masked) 0]
    _close(shaped, [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]])
    assert not shaped.requires_grad
    with pytest.raises(ValueError, match=">= 0"):
        kl_in_reward(rewards, kl, torch.ones(2, 3), coef=-1.0)


# --- entropy --------------------------------------------------------------------------------


def test_entropy_by_hand():
    inf = float("inf")
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],                             # uniform over 4: ln 4 = 1.3862944
        [math.log(0.5), math.log(0.25), math.log(0.25), -inf],  # 0.5 ln 2 + 2 * 0.25 ln 4 = 1.0397208
        [3.0, -inf, -inf, -inf],                          # one possible token: 0
        [1000.0, 1000.0, -1000.0, -inf],                  # two equal huge logits: ln 2 = 0.6931472
    ], requires_grad=True)
    entropy = entropy_from_logits(logits)
    _close(entropy, [1.3862944, 1.0397208, 0.0, 0.6931472], atol=1e-5)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_matches_torch_categorical_on_batched_logits():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)


# --- value loss -----------------------------------------------------------------------------


def test_value_loss_clips_like_ppo2():
    values = torch.tensor([[1.0, 1.0, 0.6, 5.0]], requires_grad=True)
    old = torch.full((1, 4), 0.5)
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: v clipped to 0.5 + 0.2 = 0.7: max((1-2)^2 = 1, (0.7-2)^2 = 1.69) = 1.69 (clip binds)
    # token 1: max((1-0)^2 = 1, (0.7-0)^2 = 0.49) = 1
    # token 2: within the clip: (0.6-2)^2 = 1.96
    # 0.5 * (1.69 + 1 + 1.96) / 3 = 0.5 * 4.65 / 3
    _close(loss, 0.775, atol=1e-6)
    loss.backward()
    # gradient 0.5 * 2 * (v - R) / 3 where the clip does not bind: token 1: 1/3, token 2: -1.4/3
    _close(values.grad, [[0.0, 0.3333333, -0.4666667, 0.0]])
    _close(metrics["vf_clipfrac"], 0.3333333)
    _close(metrics["values_mean"], 0.8666667)  # (1 + 1 + 0.6) / 3

    loss, metrics = value_loss(values, old, returns, mask, clip_range=None)
    _close(loss, 0.66)  # 0.5 * (1 + 1 + 1.96) / 3
    assert metrics["vf_clipfrac"].item() == 0.0
    with pytest.raises(ValueError, match="clip_range"):
        value_loss(values, old, returns, mask, clip_range=0.0)


# --- toy GRPO sanity ------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_updates_raise_the_probability_of_the_rewarded_output(estimator):
    """A categorical policy over 4 outputs; output 2 earns reward 1. Sample a group of 8, compute
    advantages, take 2 clipped-surrogate SGD steps on the group, repeat: p(output 2) must rise."""
    advantage_fns = {
        "grpo": grpo_advantages,
        "dr_grpo": lambda r, g: grpo_advantages(r, g, norm_by_std=False),
        "rloo": rloo_advantages,
    }
    logits = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([logits], lr=0.5)
    generator = torch.Generator().manual_seed(0)
    group_size, rewarded = 8, 2
    history = [torch.softmax(logits, 0)[rewarded].item()]
    for _ in range(6):
        with torch.no_grad():
            samples_G = torch.multinomial(torch.softmax(logits, 0), group_size, replacement=True, generator=generator)
            old_logprobs_G1 = torch.log_softmax(logits, 0)[samples_G][:, None]
        rewards_G = (samples_G == rewarded).float()
        advantages_G = advantage_fns[estimator](rewards_G, torch.zeros(group_size, dtype=torch.long))
        for _ in range(2):  # two PPO epochs on the same group: the ratio leaves 1 and the clip matters
            logprobs_G1 = torch.log_softmax(logits, 0)[samples_G][:, None]
            loss, _ = policy_loss(logprobs_G1, old_logprobs_G1, advantages_G, torch.ones(group_size, 1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append(torch.softmax(logits, 0)[rewarded].item())
    # Every step moves toward the rewarded output (or stays put when a group held no contrast).
    assert all(after >= before - 1e-7 for before, after in zip(history, history[1:])), history
    assert history[-1] > 0.6 > history[0] == 0.25, history
