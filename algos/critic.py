"""The PPO critic: V(s) at every token the policy sampled, from a value head on hidden states.

Two places for the value function, chosen by `critic.kind`:

* ``"shared"``: a value head on the policy's own last hidden states. One decoder forward gives
  both the policy's log-probs and the values (:func:`logprobs_and_values`); the value loss may
  also train the policy's trunk (`value_grad_to_trunk`), as in the actor-critic networks of PPO.
* ``"separate"``: a model of the same family (loaded from `critic.path`, by default the policy's
  starting weights) with its own value head; it shares nothing with the policy but the tokens.

    critic = load_critic(cfg, policy)                          # a torch module: head (+ backbone)
    values, _ = score_values(policy, critic, trajectories, 8)   # at rollout time, no gradients
    logprobs_BT, entropy_BT, values_BT = logprobs_and_values(policy, critic, batch)   # in the loss

Alignment follows `agents.logprobs`: `values_BT[b, t]` is the value of the state in which the
policy chose `input_ids[b, t]`, read from the hidden state at `t - 1` (the one that predicted
that token). So a loss mask of sampled tokens indexes log-probs, values and GAE's advantages
alike, and the value of a turn's first token has already seen the tool response before it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from agents.policy import Policy
from algos.scoring import score_rows

__all__ = ["ValueHead", "Critic", "token_values", "logprobs_and_values", "score_values", "load_critic"]


class ValueHead(nn.Module):
    """``V = w . h + b`` on a hidden state, in float32 whatever the trunk's dtype.

    Zero-initialised: the critic starts by predicting 0 for every state (it knows nothing of the
    reward scale yet), and its first update sends no gradient into a shared trunk (the gradient
    into the hidden states is ``w``).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features

    def forward(self, hidden_NH: Tensor) -> Tensor:
        """``[N, H]`` hidden states -> ``[N]`` float32 values."""
        return self.linear(hidden_NH.float()).squeeze(-1)


def token_values(hidden_BTH: Tensor, head: ValueHead, positions_BT: Tensor, chunk_size: int = 4096) -> Tensor:
    """Target-aligned values ``[B, T]`` (float32) at `positions_BT`, 0 elsewhere and at position 0.

    ``values_BT[b, t] = head(hidden_BTH[b, t - 1])``: the value of the state before token t.
    Only the wanted positions are read, `chunk_size` at a time; with gradients, autograd keeps
    each chunk's float32 input for the head's backward (the wanted positions x hidden size, as
    the log-probs keep their gathered hidden states).
    """
    B, T, H = hidden_BTH.shape
    if positions_BT.shape != (B, T):
        raise ValueError(f"positions_BT has shape {tuple(positions_BT.shape)} but the hidden states are {(B, T, H)}")
    if H != head.hidden_size:
        raise ValueError(
            f"the value head reads {head.hidden_size}-dim hidden states but the model gives {H}: "
            "build the head for this model (load_critic does)"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    wanted_BT = positions_BT.to(device=hidden_BTH.device, dtype=torch.bool).clone()
    wanted_BT[:, 0] = False
    rows_b, rows_t = wanted_BT.nonzero(as_tuple=True)
    values_N = torch.cat([
        head(hidden_BTH[rows_b[start:start + chunk_size], rows_t[start:start + chunk_size] - 1])
        for start in range(0, rows_b.numel(), chunk_size)
    ]) if rows_b.numel() else hidden_BTH.new_zeros(0, dtype=torch.float32)
    values_BT = torch.zeros(B, T, dtype=torch.float32, device=hidden_BTH.device)
    return values_BT.index_put((rows_b, rows_t), values_N)


class Critic(nn.Module):
    """The value function: a :class:`ValueHead`, and for ``kind="separate"`` the critic's own model.

    A torch module, so `named_parameters`, `state_dict` and `algos.checkpoint` see exactly what
    the critic trains: the head (shared) or the backbone's trainable weights and the head
    (separate). The shared trunk belongs to the policy and is not part of this module.

    Args:
        head: the value head.
        backbone: None for a head on the policy's trunk; a `Policy` (same family and tokenizer as
            the policy) for a separate critic. Its LM head is unused and frozen (with tied word
            embeddings, so are its input embeddings).
    """

    def __init__(self, head: ValueHead, backbone: Policy | None = None):
        super().__init__()
        self.head = head
        self.backbone_policy = backbone  # not a module: its `.model` is registered below
        self.backbone = backbone.model if backbone is not None else None
        if backbone is not None:
            for p in backbone.model.get_output_embeddings().parameters():
                p.requires_grad_(False)

    @property
    def kind(self) -> str:
        return "shared" if self.backbone is None else "separate"

    def values(self, batch: dict[str, Any], hidden_BTH: Tensor | None = None,
               positions: str | Tensor = "loss_mask") -> Tensor:
        """Values ``[B, T]`` of a collated batch (see the module doc for the alignment).

        hidden_BTH: the policy's last hidden states of `batch`; required by a shared critic,
            refused by a separate one (which runs its own model).
        positions: "loss_mask" (the sampled tokens, all that GAE reads) or a ``[B, T]`` bool tensor.
        """
        if isinstance(positions, str):
            if positions != "loss_mask":
                raise ValueError(f"positions must be 'loss_mask' or a bool tensor, got {positions!r}")
            positions = batch["loss_mask"] > 0
        if self.backbone_policy is None:
            if hidden_BTH is None:
                raise ValueError("a shared critic reads the policy's hidden states: pass hidden_BTH "
                                 "(Policy.hidden_states(batch)), or use logprobs_and_values")
        else:
            if hidden_BTH is not None:
                raise ValueError("a separate critic runs its own model: do not pass the policy's hidden_BTH")
            hidden_BTH = self.backbone_policy.hidden_states(batch)
        return token_values(hidden_BTH, self.head, positions)


def logprobs_and_values(policy: Policy, critic: Critic, batch: dict[str, Any],
                        value_grad_to_trunk: bool = True, chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """The policy's log-probs and entropies and the critic's values of a batch, all ``[B, T]``
    target-aligned and computed at the sampled tokens (`batch["loss_mask"]`).

    A shared critic reads the hidden states of the policy's forward (one decoder pass for both);
    `value_grad_to_trunk=False` detaches them for the head, so the value loss trains only the head.
    A separate critic runs its own model. Log-probs use the sampler's conventions, exactly as
    `Policy.logprobs` (temperature of the batch, vision placeholders suppressed).
    """
    positions_BT = batch["loss_mask"] > 0
    if critic.kind == "separate":
        logprobs_BT, entropy_BT = policy.logprobs(batch, chunk_size=chunk_size)
        return logprobs_BT, entropy_BT, critic.values(batch, positions=positions_BT)
    hidden_BTH = policy.hidden_states(batch)
    logprobs_BT, entropy_BT = policy.logprobs(batch, chunk_size=chunk_size, positions=positions_BT, hidden_BTH=hidden_BTH)
    trunk_BTH = hidden_BTH if value_grad_to_trunk else hidden_BTH.detach()
    return logprobs_BT, entropy_BT, critic.values(batch, hidden_BTH=trunk_BTH, positions=positions_BT)


def score_values(policy: Policy, critic: Critic, trajectories: Sequence[Any], micro_batch_size: int,
                 with_logprobs: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The critic's values (and, when asked, the policy's log-probs) of each trajectory's tokens,
    1-D and 0 off the loss mask, without gradients. A shared critic gets both from one forward."""
    def forward(batch: dict[str, Any]) -> tuple[Tensor, ...]:
        if with_logprobs:
            logprobs_BT, _, values_BT = logprobs_and_values(policy, critic, batch)
            return values_BT, logprobs_BT
        if critic.kind == "shared":
            return (critic.values(batch, hidden_BTH=policy.hidden_states(batch)),)
        return (critic.values(batch),)

    rows = score_rows(policy, trajectories, micro_batch_size, forward, modules=[critic])
    values = rows[0] if rows else []
    if not with_logprobs:
        return values, None
    return values, rows[1] if rows else []


def load_critic(cfg: Any, policy: Policy, device: Any = None) -> Critic:
    """The critic `cfg.critic` asks for (`cfg`: a `PPOConfig`), on the policy's device.

    shared: a fresh value head sized to the policy's hidden states. separate: `critic.path` (or
    `model.path`) loaded with the policy's dtype and attention kernel, vision tower frozen when
    `critic.freeze_vision`, and a fresh value head; its tokenizer must be the policy's, since both
    read the same token ids.
    """
    c, m = cfg.critic, cfg.model
    device = torch.device(device) if device is not None else policy.device
    if c.kind == "shared":
        hidden_size = policy.model.get_output_embeddings().weight.shape[1]
        return Critic(ValueHead(hidden_size).to(device))
    if c.kind != "separate":
        raise ValueError(f"critic.kind {c.kind!r} is not one of 'shared', 'separate'")
    backbone = Policy.load(c.path or m.path, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation,
                           gradient_checkpointing=m.gradient_checkpointing, freeze_vision=c.freeze_vision,
                           chat_template=m.chat_template)
    _check_same_tokens(policy, backbone, c.path or m.path)
    hidden_size = backbone.model.get_output_embeddings().weight.shape[1]
    backbone.train()
    return Critic(ValueHead(hidden_size).to(device), backbone)


def _check_same_tokens(policy: Policy, critic: Policy, path: str) -> None:
    mine = (len(policy.tokenizer), policy.image_token_id, policy.merge_size)
    theirs = (len(critic.tokenizer), critic.image_token_id, critic.merge_size)
    if mine != theirs:
        raise ValueError(
            f"the critic {path!r} does not read the policy's tokens: (vocabulary size, image token id, merge size) "
            f"is {theirs} for the critic but {mine} for the policy; give critic.path a model of the policy's family"
        )
