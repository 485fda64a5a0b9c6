"""The PPO critic: values at the right (target-aligned) positions, one forward shared with the
policy, and gradients that reach only what the configuration says they reach."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from agents.policy import Policy  # noqa: E402
from tests.trajectories import from_tokens  # noqa: E402
from algos.critic import Critic, ValueHead, load_critic, logprobs_and_values, token_values  # noqa: E402
from algos.ppo_config import load_ppo_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def policy():
    return Policy.load("tiny:qwen2_5_vl", dtype="float32")


def _trajectory(ids: list[int], mask: list[int]):
    return from_tokens(ids, mask)


def _batch(policy: Policy) -> dict:
    # Two rows of different lengths: prompt, sampled turn, "tool" tokens (mask 0), sampled turn.
    return policy.collate([
        _trajectory([5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 1, 1, 0, 0, 1, 1]),
        _trajectory([5, 6, 13, 14, 15], [0, 0, 1, 1, 1]),
    ])


def test_token_values_reads_the_hidden_state_before_each_wanted_token():
    head = ValueHead(2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 2.0]]))
        head.linear.bias.fill_(0.5)
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0]]])  # [1, 4, 2]
    positions = torch.tensor([[True, True, False, True]])
    values = token_values(hidden, head, positions, chunk_size=1)
    # t=0 has no state before it; t=1 reads h0: 1 + 0 + 0.5; t=2 unwanted; t=3 reads h2: 2 + 4 + 0.5.
    assert values.tolist() == [[0.0, 1.5, 0.0, 6.5]]
    assert values.dtype == torch.float32


def test_a_fresh_head_predicts_zero_and_rejects_a_wrong_width():
    head = ValueHead(4)
    assert torch.equal(head(torch.randn(3, 4)), torch.zeros(3))
    with pytest.raises(ValueError, match="reads 4-dim hidden states but the model gives 3"):
        token_values(torch.zeros(1, 2, 3), head, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        ValueHead(0)


def test_shared_critic_gives_logprobs_and_values_from_one_forward(policy):
    critic = load_critic(load_ppo_config(["+exp=tiny_ppo"]), policy)
    assert critic.kind == "shared" and [n for n, _ in critic.named_parameters()] == ["head.linear.weight", "head.linear.bias"]
    torch.nn.init.normal_(critic.head.linear.weight)
    batch = _batch(policy)
    with torch.no_grad():
        logprobs_BT, entropy_BT, values_BT = logprobs_and_values(policy, critic, batch)
        expected_logprobs, expected_entropy = policy.logprobs(batch)
        hidden = policy.hidden_states(batch)
    mask = batch["loss_mask"] > 0
    assert values_BT.shape == batch["input_ids"].shape == logprobs_BT.shape
    assert torch.allclose(logprobs_BT, expected_logprobs, atol=1e-6) and torch.allclose(entropy_BT, expected_entropy, atol=1e-6)
    assert torch.all(values_BT[~mask] == 0) and torch.all(values_BT[mask] != 0)
    b, t = 0, 7  # row 0's last sampled token: the value of the state that chose it reads h[6]
    assert values_BT[b, t].item() == pytest.approx(critic.head(hidden[b, t - 1:t]).item(), rel=1e-5)


def test_frozen_trunk_sends_the_value_gradient_to_the_head_only(policy):
    critic = load_critic(load_ppo_config(["+exp=tiny_ppo"]), policy)
    torch.nn.init.normal_(critic.head.linear.weight)
    batch = _batch(policy)
    policy.model.zero_grad(set_to_none=True)
    _, _, values_BT = logprobs_and_values(policy, critic, batch, value_grad_to_trunk=False)
    values_BT.sum().backward()
    assert critic.head.linear.weight.grad is not None and critic.head.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.model.parameters())

    critic.zero_grad(set_to_none=True)
    _, _, values_BT = logprobs_and_values(policy, critic, batch, value_grad_to_trunk=True)
    values_BT.sum().backward()
    trunk_grads = [p.grad for n, p in policy.model.named_parameters() if "language_model" in n and p.grad is not None]
    assert trunk_grads and any(g.abs().sum() > 0 for g in trunk_grads)
    policy.model.zero_grad(set_to_none=True)


def test_separate_critic_runs_its_own_model(policy):
    cfg = load_ppo_config(["+exp=tiny_ppo", "critic.kind=separate"])
    critic = load_critic(cfg, policy)
    assert critic.kind == "separate" and critic.backbone is not policy.model
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert "head.linear.weight" in trainable
    assert not any("lm_head" in n or "visual" in n for n in trainable)  # unused LM head, frozen vision tower
    torch.nn.init.normal_(critic.head.linear.weight)
    batch = _batch(policy)
    policy.model.zero_grad(set_to_none=True)
    _, _, values_BT = logprobs_and_values(policy, critic, batch)
    values_BT.sum().backward()
    assert all(p.grad is None for p in policy.model.parameters())  # the policy is not the critic
    backbone_grads = [p.grad for n, p in critic.named_parameters() if n.startswith("backbone.") and p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)
    with pytest.raises(ValueError, match="runs its own model"):
        critic.values(batch, hidden_BTH=torch.zeros(1))


def test_misuse_is_explained(policy):
    shared = Critic(ValueHead(4))
    with pytest.raises(ValueError, match="pass hidden_BTH"):
        shared.values(_batch(policy))
    with pytest.raises(ValueError, match="critic.path"):
        load_ppo_config(["+exp=tiny_ppo", "critic.path=tiny:qwen2_vl"])
    with pytest.raises(ValueError, match="critic.kind"):
        load_ppo_config(["+exp=tiny_ppo", "critic.kind=value_head"])
