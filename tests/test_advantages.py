"""Advantage estimators against hand-computed values (the arithmetic is in the comments)."""

import random

import pytest
import torch

from algos.advantages import gae_advantages, grpo_advantages, rloo_advantages, whiten


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- GRPO / Dr.GRPO -------------------------------------------------------------------------


def test_grpo_normalises_by_group_mean_and_std_with_interleaved_groups():
    # group 7: rewards [0, 1, 2]: mean 1, unbiased std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1
    #          -> (r - 1) / (1 + eps) = [-1, 0, 1]
    # group 3: rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.5773503
    #          -> +-0.5 / 0.5773503 = +-0.8660254
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 0.0, 1.0])
    groups = torch.tensor([7, 3, 7, 3, 7, 3, 3])
    _close(grpo_advantages(rewards, groups, eps=0.0), [-1.0, 0.8660254, 0.0, -0.8660254, 1.0, -0.8660254, 0.8660254])


def test_grpo_eps_is_added_to_the_std():
    # group [0, 1, 2]: std 1 -> (2 - 1) / (1 + 0.5) = 0.6666667
    _close(grpo_advantages(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3, dtype=torch.long), eps=0.5),
           [-0.6666667, 0.0, 0.6666667])


def test_dr_grpo_only_subtracts_the_group_mean():
    # group 0: [1, 0, 0, 1] mean 0.5 -> [0.5, -0.5, -0.5, 0.5]; group 1: [3, 5] mean 4 -> [-1, 1]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    _close(grpo_advantages(rewards, groups, norm_by_std=False), [0.5, -0.5, -0.5, 0.5, -1.0, 1.0])


def test_grpo_equal_rewards_and_singleton_groups_give_exact_zeros():
    # 0.1 is not exact in float32: a mean computed in floating point can miss it by an ulp, and an
    # ulp divided by a ~0 std would be a large advantage. Equal rewards must give exactly 0.
    rewards = torch.tensor([0.1] * 7 + [0.7] + [5.0, 5.0], dtype=torch.float32)
    groups = torch.tensor([0] * 7 + [1] + [2, 2])
    for norm_by_std in (True, False):
        advantages = grpo_advantages(rewards, groups, norm_by_std=norm_by_std)
        assert torch.equal(advantages, torch.zeros(10))
    assert torch.equal(rloo_advantages(rewards, groups), torch.zeros(10))


def test_grpo_accepts_integer_rewards_and_detaches():
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    advantages = grpo_advantages(rewards, torch.tensor([4, 4]))
    assert not advantages.requires_grad
    # [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.7071068 -> +-0.5 / 0.7071068 = +-0.7071068
    _close(advantages, [0.7071068, -0.7071068], atol=1e-5)
    _close(grpo_advantages(torch.tensor([1, 0]), torch.tensor([4, 4])), [0.7071068, -0.7071068], atol=1e-5)


def test_grpo_rejects_bad_inputs_with_clear_messages():
    with pytest.raises(ValueError, match="one group id per reward"):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite values at indices \\[1\\]"):
        grpo_advantages(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long))


# --- RLOO -----------------------------------------------------------------------------------


def test_rloo_subtracts_the_mean_of_the_other_rollouts():
    # group 0: [0, 1, 2]: A_0 = 0 - (1+2)/2 = -1.5, A_1 = 1 - (0+2)/2 = 0, A_2 = 2 - (0+1)/2 = 1.5
    # group 5: [1, 0, 0, 0]: A = 1 - 0 = 1; each 0: 0 - (1+0+0)/3 = -0.3333333
    # group 9: [4] alone: no other rollout to compare with -> 0
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 5, 0, 5, 5, 5, 9])
    _close(rloo_advantages(rewards, groups), [-1.5, 0.0, 1.0, 1.5, -0.3333333, -0.3333333, -0.3333333, 0.0])


# --- GAE ------------------------------------------------------------------------------------


def _trajectory_batch():
    """Row 0: 2 prompt tokens, turn 1 (2 tokens, tool penalty -0.5), 2 tool-response tokens,
    turn 2 (2 tokens, outcome +1). Row 1: three sampled tokens then padding. Row 2: fully masked.
    Values at masked-out positions are junk (9, 7) that must never be read."""
    mask = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1],
                         [1, 1, 1, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 1.0],
                            [0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                            [0.0] * 8])
    values = torch.tensor([[9.0, 9.0, 0.1, 0.2, 9.0, 9.0, 0.3, 0.4],
                           [0.5, 1.0, 1.5, 7.0, 7.0, 7.0, 7.0, 7.0],
                           [3.0] * 8])
    return rewards, values, mask


def test_gae_mid_trajectory_rewards_skip_tool_tokens():
    rewards, values, mask = _trajectory_batch()
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # gamma * lam = 0.72. Row 0, sampled positions 2, 3 | 6, 7 (V = .1, .2, .3, .4; r = 0, -.5, 0, 1):
    #   d7 = 1 + 0.9*0 - 0.4 = 0.6          A7 = 0.6
    #   d6 = 0 + 0.9*0.4 - 0.3 = 0.06       A6 = 0.06 + 0.72*0.6 = 0.492
    #   d3 = -0.5 + 0.9*0.3 - 0.2 = -0.43   A3 = -0.43 + 0.72*0.492 = -0.07576   (next value: V6, not V4)
    #   d2 = 0 + 0.9*0.2 - 0.1 = 0.08       A2 = 0.08 + 0.72*(-0.07576) = 0.0254528
    #   returns = A + V: 0.1254528, 0.12424, 0.792, 1.0
    # Row 1, positions 0, 1, 2 (V = .5, 1, 1.5; r = 0, 0, 2):
    #   d2 = 2 - 1.5 = 0.5                  A2 = 0.5
    #   d1 = 0.9*1.5 - 1.0 = 0.35           A1 = 0.35 + 0.72*0.5 = 0.71
    #   d0 = 0.9*1.0 - 0.5 = 0.4            A0 = 0.4 + 0.72*0.71 = 0.9112
    #   returns: 1.4112, 1.71, 2.0
    _close(advantages, [[0, 0, 0.0254528, -0.07576, 0, 0, 0.492, 0.6],
                        [0.9112, 0.71, 0.5, 0, 0, 0, 0, 0],
                        [0] * 8])
    _close(returns, [[0, 0, 0.1254528, 0.12424, 0, 0, 0.792, 1.0],
                     [1.4112, 1.71, 2.0, 0, 0, 0, 0, 0],
                     [0] * 8])


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = _trajectory_batch()
    advantages, returns = gae_advantages(rewards, values, mask.bool())
    # Row 0 reward-to-go at 2, 3, 6, 7: -0.5+1 = 0.5, 0.5, 1, 1; minus V (.1, .2, .3, .4)
    # Row 1 reward-to-go: 2, 2, 2; minus V (.5, 1, 1.5)
    _close(advantages[:2], [[0, 0, 0.4, 0.3, 0, 0, 0.7, 0.6], [1.5, 1.0, 0.5, 0, 0, 0, 0, 0]])
    _close(returns[:2], [[0, 0, 0.5, 0.5, 0, 0, 1.0, 1.0], [2.0, 2.0, 2.0, 0, 0, 0, 0, 0]])


def test_gae_with_lam_zero_is_the_one_step_td_error():
    rewards, values, mask = _trajectory_batch()
    advantages, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.0)
    # the deltas of the first test: row 0: 0.08, -0.43, 0.06, 0.6; row 1: 0.4, 0.35, 0.5
    _close(advantages[:2], [[0, 0, 0.08, -0.43, 0, 0, 0.06, 0.6], [0.4, 0.35, 0.5, 0, 0, 0, 0, 0]])


def _reference_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's sampled tokens, copied out of the row and back in, in Python."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        positions = [t for t, m in enumerate(mask[b]) if m]
        running, next_value = 0.0, 0.0
        for t in reversed(positions):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
            next_value = values[b][t]
    return advantages


def test_gae_matches_textbook_gae_on_compacted_rows():
    rng = random.Random(0)
    batch, length = 5, 23
    mask = [[int(rng.random() < 0.6) for _ in range(length)] for _ in range(batch)]
    rewards = [[rng.uniform(-1, 1) if m and rng.random() < 0.3 else 0.0 for m in row] for row in mask]
    values = [[rng.uniform(-2, 2) for _ in range(length)] for _ in range(batch)]
    expected = _reference_gae(rewards, values, mask, gamma=0.97, lam=0.9)
    rewards_BT, values_BT = torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    advantages, returns = gae_advantages(rewards_BT, values_BT, torch.tensor(mask), gamma=0.97, lam=0.9)
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(returns, (advantages + values_BT) * torch.tensor(mask))


def test_gae_outputs_are_detached():
    rewards, values, mask = _trajectory_batch()
    advantages, returns = gae_advantages(rewards, values.requires_grad_(), mask)
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_rejects_a_reward_on_a_masked_out_token():
    rewards, values, mask = _trajectory_batch()
    rewards[0, 4] = 0.25  # on a tool-response token: it would be silently lost
    with pytest.raises(ValueError, match="reward 0.25 sits at row 0, position 4.*last sampled token"):
        gae_advantages(rewards, values, mask)


def test_gae_rejects_bad_shapes_and_coefficients():
    rewards, values, mask = _trajectory_batch()
    with pytest.raises(ValueError, match="same \\[batch, tokens\\] shape"):
        gae_advantages(rewards, values[:, :5], mask)
    with pytest.raises(ValueError, match="\\[batch, tokens\\]"):
        gae_advantages(rewards[0], values[0], mask[0])
    with pytest.raises(ValueError, match="gamma and lam must lie in \\[0, 1\\]"):
        gae_advantages(rewards, values, mask, gamma=1.5)


# --- whiten ---------------------------------------------------------------------------------


def test_whiten_uses_masked_statistics():
    # masked-in [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]; masked-out -> 0
    _close(whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])), [-1.0, 0.0, 1.0, 0.0])
    # shift_mean=False only rescales: [1, 2, 3] / 1
    _close(whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0]), shift_mean=False),
           [1.0, 2.0, 3.0, 0.0])
    # no mask: [[2, 4], [6, 8]]: mean 5, var (9 + 1 + 1 + 9) / 3 = 6.6666667, std 2.5819889
    _close(whiten(torch.tensor([[2.0, 4.0], [6.0, 8.0]])), [[-1.1618950, -0.3872983], [0.3872983, 1.1618950]])


def test_whiten_degenerate_inputs_stay_finite():
    assert torch.equal(whiten(torch.full((4,), 3.0)), torch.zeros(4))
    assert torch.equal(whiten(torch.tensor([5.0, 1.0]), torch.tensor([1, 0])), torch.zeros(2))
    assert torch.equal(whiten(torch.tensor([5.0, 1.0]), torch.tensor([0, 0])), torch.zeros(2))
