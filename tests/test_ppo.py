"""The PPO trainer: GAE wiring of the env's dense turn rewards (hand-computed, and on a real
tokenized conversation with a failed tool call), critic warm-up, one update that learns, and a
tiny end-to-end run with its resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from agents.generation import ScriptedBackend  # noqa: E402
from agents.policy import Policy  # noqa: E402
from agents.rollout import RolloutEngine  # noqa: E402
from tests.trajectories import from_tokens  # noqa: E402
from agents.scripted import OracleAgent, tool_call_turn  # noqa: E402
from algos.critic import load_critic, score_values  # noqa: E402
from algos.groups import make_groups  # noqa: E402
from algos.ppo import critic_checkpoint_path, ppo_update, run, token_advantages  # noqa: E402
from algos.config import conf_dir  # noqa: E402
from algos.ppo_config import PPOConfig, load_ppo_config  # noqa: E402
from algos.tracking import read_metrics  # noqa: E402
from algos.optim import build_optimizer, build_scheduler  # noqa: E402
from cv_env.reward import RewardConfig  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trajectory(ids, mask, rewards, logprobs=None, group="g", turn_ends=None):
    trajectory = from_tokens(ids, mask, rewards, logprobs, group_id=group)
    assert turn_ends is None or trajectory.turn_ends == turn_ends
    return trajectory


# --------------------------------------------------------------------------------------------
# GAE over the dense turn rewards
# --------------------------------------------------------------------------------------------

# prompt 0-2 | turn 1 sampled 3-5 (its tool call failed: -0.5 on 5) | tool response 6-7 | turn 2
# sampled 8-9 (the outcome, 1.0, on 9).
MASK = [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
REWARDS = [0, 0, 0, 0, 0, -0.5, 0, 0, 0, 1.0]
# Values at the prompt and tool-response positions must be ignored: they are not decisions.
VALUES = torch.tensor([9.0, 9.0, 9.0, 0.1, 0.2, 0.3, 9.0, 9.0, 0.4, 0.5])


def test_gae_with_a_mid_trajectory_penalty_and_masked_tool_tokens_by_hand():
    trajectory = _trajectory(range(10), MASK, REWARDS, turn_ends=[5, 9])
    (advantages,), (returns,) = token_advantages([trajectory], [VALUES], gamma=1.0, lam=0.5)
    # Sampled positions 3, 4, 5, 8, 9; the next value after 5 is V[8] (the tool tokens are skipped):
    #   A9 = 1.0 - 0.5                       = 0.5
    #   A8 = (0 + 0.5 - 0.4) + 0.5 * 0.5     = 0.35
    #   A5 = (-0.5 + 0.4 - 0.3) + 0.5 * 0.35 = -0.225
    #   A4 = (0 + 0.3 - 0.2) + 0.5 * -0.225  = -0.0125
    #   A3 = (0 + 0.2 - 0.1) + 0.5 * -0.0125 = 0.09375
    expected = [0, 0, 0, 0.09375, -0.0125, -0.225, 0, 0, 0.35, 0.5]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)
    expected_returns = [0, 0, 0, 0.19375, 0.1875, 0.075, 0, 0, 0.75, 1.0]  # A + V on sampled tokens
    assert returns.tolist() == pytest.approx(expected_returns, abs=1e-6)


def test_gae_discounts_per_sampled_token():
    trajectory = _trajectory(range(10), MASK, REWARDS, turn_ends=[5, 9])
    (advantages,), _ = token_advantages([trajectory], [torch.zeros(10)], gamma=0.5, lam=1.0)
    # With V = 0: A_t = sum of later rewards, discounted by 0.5 per sampled token (not per position).
    expected = [0, 0, 0, -0.5 * 0.25 + 0.0625, -0.5 * 0.5 + 0.125, -0.5 + 0.25, 0, 0, 0.5, 1.0]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)


def test_group_terms_and_kl_in_the_reward_reach_the_advantages():
    trajectory = _trajectory(range(10), MASK, REWARDS, turn_ends=[5, 9])
    kl = torch.tensor([0, 0, 0, 0.1, 0.1, 0.1, 0, 0, 0.1, 0.1])
    (advantages,), _ = token_advantages([trajectory], [torch.zeros(10)], gamma=1.0, lam=1.0,
                                        adjustments=[0.25], kl=[kl], kl_coef=1.0)
    # The group term is paid on the final token (1.0 + 0.25), the KL on every sampled token (-0.1).
    #   A9 = 1.15, A8 = 1.05, A5 = -0.6 + 1.05 = 0.45, A4 = 0.35, A3 = 0.25
    assert advantages.tolist() == pytest.approx([0, 0, 0, 0.25, 0.35, 0.45, 0, 0, 1.05, 1.15], abs=1e-6)
    with pytest.raises(ValueError, match="one per trajectory"):
        token_advantages([trajectory], [], gamma=1.0, lam=1.0)


class _FailThenOracle:
    """A scripted agent whose first tool call crashes, then plays the oracle's ideal episode."""

    def __init__(self):
        self.oracle, self.failed = OracleAgent(), False

    def reset(self, task):
        self.oracle.reset(task)
        self.failed = False

    def act(self, observation=None):
        if not self.failed:
            self.failed = True
            return tool_call_turn("result = undefined_name", description="a call that fails")
        return self.oracle.act()


def test_gae_on_a_real_conversation_puts_the_tool_penalty_where_it_happened():
    policy = Policy.load("tiny:qwen2_5_vl")
    task = next(t for t in load_tasks("synthetic", split="validation") if t.required_ops)
    with Sandbox(workers=1) as sandbox, RolloutEngine(
            ScriptedBackend(policy.processor, agent_factory=_FailThenOracle), sandbox=sandbox,
            env_kwargs=dict(max_turns=4, max_pixels=128 * 128), sampling=dict(max_new_tokens=1024)) as engine:
        (trajectory,) = engine.rollout([task], n=1)
    assert trajectory.num_turns >= 3 and trajectory.turn_rewards[0] == pytest.approx(-0.05)  # exec_fail, paid at once
    mask = torch.tensor(trajectory.loss_mask, dtype=torch.bool)
    ends = trajectory.turn_ends
    assert not mask[ends[0] + 1:ends[1]].all()  # the tool response between turns 1 and 2 is masked out

    # lam = 0 and a constant critic c: each advantage is one TD error r_t + c - c, so the reward
    # shows exactly where it was earned, the last token carries r - c, and the tool tokens'
    # (absurd) values are never read.
    c = 0.3
    values = torch.where(mask, torch.tensor(c), torch.tensor(100.0))
    (advantages,), (returns,) = token_advantages([trajectory], [values], gamma=1.0, lam=0.0)
    expected = torch.zeros(len(trajectory))
    for end, reward in zip(ends, trajectory.turn_rewards):
        expected[end] = reward
    expected[ends[-1]] -= c
    assert torch.allclose(advantages, expected, atol=1e-6)

    # gamma = lam = 1 and V = 0: every token of turn i gets the rewards of turns i, i+1, ... .
    (advantages,), (returns,) = token_advantages([trajectory], [torch.zeros(len(trajectory))], gamma=1.0, lam=1.0)
    starts = [int(mask.nonzero()[0])] + [int(mask[end + 1:].nonzero()[0]) + end + 1 for end in ends[:-1]]
    for turn, (start, end) in enumerate(zip(starts, ends)):
        to_go = sum(trajectory.turn_rewards[turn:])
        assert torch.allclose(advantages[start:end + 1], torch.tensor(to_go), atol=1e-6), turn
    assert torch.all(advantages[~mask] == 0) and torch.allclose(returns, advantages)
    assert advantages[starts[0]] == pytest.approx(trajectory.reward)  # the first turn sees the penalty too


# --------------------------------------------------------------------------------------------
# Updates: critic warm-up, one update that learns
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def update_setup():
    cfg = load_ppo_config(["+exp=tiny_ppo", "algo.mini_batch_size=1", "rollout.prompts_per_step=2",
                           "algo.micro_batch_size=2", "algo.lr=1e-2", "critic.lr=1e-3", "algo.kl.coef=0",
                           "algo.whiten_advantages=false"])
    policy = Policy.load("tiny:qwen2_5_vl", dtype="float32")
    prompt = policy.tokenizer("Pick a letter:", add_special_tokens=False)["input_ids"]
    token_a = policy.tokenizer("A", add_special_tokens=False)["input_ids"][-1]
    token_b = policy.tokenizer("B", add_special_tokens=False)["input_ids"][-1]
    return cfg, policy, prompt, token_a, token_b


def _one_token(prompt, token, reward, group):
    ids = list(prompt) + [token]
    n = len(ids)
    return _trajectory(ids, [0] * (n - 1) + [1], [0.0] * (n - 1) + [reward], group=group)


def _optimizers(cfg, policy, critic):
    actor = build_optimizer(policy.named_parameters(), cfg.algo)
    critic_optimizer = build_optimizer(critic.named_parameters(), cfg.critic_optim())
    return (actor, critic_optimizer), (build_scheduler(actor, cfg.algo, 10), build_scheduler(critic_optimizer, cfg.critic_optim(), 10))


def test_critic_warmup_moves_the_value_toward_the_return_and_leaves_the_policy(update_setup):
    cfg, policy, prompt, token_a, _ = update_setup
    critic = load_critic(cfg, policy)
    trajectories = [_one_token(prompt, token_a, 1.0, "p0"), _one_token(prompt, token_a, 1.0, "p1")]
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    old_values, _ = score_values(policy, critic, trajectories, 2)
    advantages, returns = token_advantages(trajectories, old_values, cfg.algo.gamma, cfg.algo.lam)
    optimizers, schedulers = _optimizers(cfg, policy, critic)
    metrics = ppo_update(policy, critic, optimizers, schedulers, make_groups(trajectories, RewardConfig()), advantages, returns, old_values, cfg,
                         train_policy=False)
    # Two updates; the first sees the fresh head's 0.5 (0 - 1)^2, the second a value a little closer to 1.
    assert metrics["data/updates"] == 2 and 0.3 < metrics["critic/value_loss"] < 0.5
    assert metrics["critic/grad_norm"] > 0 and not any(k.startswith("actor/") for k in metrics)
    assert all(torch.equal(p, before[n]) for n, p in policy.model.named_parameters())
    new_values, _ = score_values(policy, critic, trajectories, 2)
    last = len(trajectories[0]) - 1
    assert 0 < new_values[0][last] <= cfg.critic.clip_range + 1e-6  # toward the return 1, at most one clip step


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_one_ppo_update_raises_the_rewarded_token_and_fits_the_critic(update_setup, kind):
    cfg, policy, prompt, token_a, token_b = update_setup
    cfg = dataclasses.replace(cfg, critic=dataclasses.replace(cfg.critic, kind=kind))
    critic = load_critic(cfg, policy)
    trajectories = [_one_token(prompt, token_a, 1.0, "p0"), _one_token(prompt, token_b, 0.0, "p0"),
                    _one_token(prompt, token_a, 1.0, "p1"), _one_token(prompt, token_b, 0.0, "p1")]
    values, logprobs = score_values(policy, critic, trajectories, 4, with_logprobs=True)
    advantages, returns = token_advantages(trajectories, values, cfg.algo.gamma, cfg.algo.lam)
    optimizers, schedulers = _optimizers(cfg, policy, critic)
    metrics = ppo_update(policy, critic, optimizers, schedulers, make_groups(trajectories, RewardConfig()), advantages, returns, values, cfg,
                         old_logprobs=logprobs)
    for name in ("actor/loss", "actor/pg_loss", "actor/entropy", "actor/grad_norm", "critic/value_loss",
                 "critic/grad_norm", "lr", "critic/lr"):
        assert math.isfinite(metrics[name]), name
    _, new_logprobs = score_values(policy, critic, trajectories, 4, with_logprobs=True)
    last = len(trajectories[0]) - 1
    assert new_logprobs[0][last] > logprobs[0][last]  # the rewarded answer became more likely
    assert new_logprobs[0][last] - new_logprobs[1][last] > logprobs[0][last] - logprobs[1][last]  # than the other
    new_values, _ = score_values(policy, critic, trajectories, 4)
    assert all(new_values[i][last] != values[i][last] for i in range(4))  # the critic stepped too


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

TINY_RUN = [
    "+exp=tiny_ppo",
    "rollout.prompts_per_step=2",
    "rollout.n=2",
    "rollout.max_new_tokens=16",
    "algo.mini_batch_size=1",
    "algo.micro_batch_size=2",
    "algo.entropy_coef=0.01",  # a policy gradient on every step, whatever the (random) rewards
    "algo.lr=1e-3",
    # KL in the reward: once the policy has moved, every sampled token carries a reward for the critic
    "algo.kl.in_loss=false",
    "algo.kl.kind=k1",
    "algo.kl.coef=0.5",
    "critic.warmup_steps=0",
    "env.max_turns=2",
    "env.sandbox.workers=1",
    "trainer.val_size=2",
    "trainer.val_every=2",
    "trainer.val_before_train=false",
    "trainer.save_every=1",
    "trainer.keep_last=5",
    "trainer.sample_table_every=2",
    "trainer.sample_table_rows=2",
    "logger.mode=disabled",
    "logger.progress_bar=false",
]

LOGGED = [
    "reward/total", "episode/response_length", "actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy",
    "actor/clipfrac", "actor/approx_kl", "actor/grad_norm", "lr", "critic/value_loss", "critic/vf_clipfrac",
    "critic/values_mean", "critic/grad_norm", "critic/lr", "critic/explained_variance", "critic/returns_mean",
    "time/rollout", "time/update", "throughput/tokens_per_s", "data/critic_warmup",
]


def test_tiny_ppo_run_trains_policy_and_critic_logs_and_checkpoints(tmp_path, caplog):
    out = tmp_path / "run"
    summary = run(load_ppo_config(TINY_RUN + ["trainer.total_steps=2", f"trainer.output_dir={out}"]))
    assert summary["steps"] == 2 and "PPO finished at step 2" in caplog.text
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and "val/acc" in records[-1]
    for record in records:
        missing = [name for name in LOGGED if name not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        assert all(v is None or math.isfinite(v) for v in record.values() if isinstance(v, float))
        assert record["actor/grad_norm"] > 0 and record["lr"] == pytest.approx(1e-3)
    assert records[1]["actor/kl"] != 0 and records[1]["critic/value_loss"] > 0  # step 2: the moved policy pays KL
    assert records[1]["critic/grad_norm"] > 0
    assert len((out / "tables" / "samples_train.jsonl").read_text().splitlines()) == 2

    # The policy checkpoint is a plain policy checkpoint (algos.evaluate loads it); its critic sits beside it.
    policy_ckpt = out / "checkpoints" / "step_00000002"
    critic_ckpt = critic_checkpoint_path(policy_ckpt)
    assert (policy_ckpt / "COMPLETE").is_file() and (critic_ckpt / "COMPLETE").is_file()
    trained = load_file(str(policy_ckpt / "model.safetensors"))
    initial = Policy.load("tiny:qwen2_5_vl", dtype="float32").model.state_dict()
    assert set(trained) == set(initial)
    assert len([k for k, v in trained.items() if not torch.equal(v, initial[k])]) > len(trained) // 2
    head = load_file(str(critic_ckpt / "model.safetensors"))["head.linear.weight"]
    assert head.abs().sum() > 0  # the zero-initialised value head learned



@pytest.mark.slow
def test_tiny_ppo_run_resumes_policy_and_critic_through_a_critic_warmup(tmp_path):
    out = tmp_path / "run"
    run(load_ppo_config(TINY_RUN + ["trainer.total_steps=2", "trainer.val_every=0", f"trainer.output_dir={out}"]))
    # Resume from both checkpoints, with a critic warm-up over step 3: only the critic trains there.
    # A changed setting (the warm-up) continues a run only from a checkpoint named explicitly.
    summary = run(load_ppo_config(TINY_RUN + ["trainer.total_steps=4", "critic.warmup_steps=3", "trainer.val_every=0",
                                              f"trainer.output_dir={out}",
                                              f"trainer.resume={out / 'checkpoints' / 'step_00000002'}"]))
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("step_00000002")
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    warmup, after = read_metrics(out / "metrics.jsonl")[2:]
    assert warmup["data/critic_warmup"] == 1.0 and "actor/pg_loss" not in warmup and warmup["critic/grad_norm"] > 0
    assert after["data/critic_warmup"] == 0.0 and after["actor/grad_norm"] > 0
    ckpt = out / "checkpoints"
    step2, step3 = (load_file(str(ckpt / f"step_0000000{i}" / "model.safetensors")) for i in (2, 3))
    assert all(torch.equal(step2[k], step3[k]) for k in step2)  # the policy stood still during the warm-up
    adam_steps = [{float(s["step"]) for s in torch.load(path / "optimizer.pt", weights_only=True)["state"].values()}
                  for path in (ckpt / "step_00000004", critic_checkpoint_path(ckpt / "step_00000004"))]
    assert adam_steps == [{6.0}, {8.0}]  # policy: 3 training steps x 2 updates; critic: 4 x 2

    (out / "critic" / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="has no critic"):
        run(load_ppo_config(TINY_RUN + ["trainer.total_steps=5", "critic.warmup_steps=3", "trainer.val_every=0",
                                         f"trainer.output_dir={out}"]))


def test_ppo_yaml_documents_every_schema_field():
    # rollout, algo and trainer come from the groups GRPO shares (test_config checks those files).
    documented = yaml.safe_load((conf_dir() / "ppo.yaml").read_text())
    assert set(documented["critic"]) == set(vars(PPOConfig().critic))
    cfg = load_ppo_config(["+exp=tiny_ppo", "rollout.n=1"])  # PPO needs no groups
    assert cfg.rollout.n == 1 and cfg.algo.gamma == 1.0 and cfg.algo.lam == 0.95
    for override, message in (("algo.lam=1.5", "algo.lam"), ("critic.clip_range=0", "critic.clip_range"),
                              ("critic.warmup_steps=4", "leaves no step"), ("algo.clip_ratio_low=1.0", "clip_ratio_low"),
                              ("algo.lr=0", "algo.lr"), ("rollout.n=0", "rollout.n: must be >= 1"),
                              ("algo.micro_batch_size=3", "algo.micro_batch_size: 3 trajectories must divide"),
                              # FSDP2 sharding is GRPO's: PPO says so when the config is read, not at run time.
                              ("trainer.fsdp=true", "trainer.fsdp: FSDP2 sharding is implemented by algos.grpo only")):
        with pytest.raises(ValueError, match=message):
            load_ppo_config(["+exp=tiny_ppo", override])
