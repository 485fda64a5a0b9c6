"""The rollout-side pieces GRPO and PPO share: group numbering, step figures, the run summary."""

from __future__ import annotations

import math

import torch

from algos.groups import group_index, loss_keep_mask, make_groups
from algos.metrics import step_metrics
from agents.trajectory import TrajectoryGroup
from cv_env.reward import RewardConfig
from tests.trajectories import from_tokens
from algos.tracking import PROGRESS_KEYS, print_run_summary


def _trajectory(group: str, reward: float, sampled: int, calls: int = 0, failed: int = 0, truncated: bool = False):
    n = 3 + sampled  # a 3-token prompt, then the sampled tokens
    return from_tokens(list(range(n)), [0] * 3 + [1] * sampled, [0.0] * (n - 1) + [reward], task_id="t",
                       group_id=group, category="charts", reward_components={"acc": reward, "total": reward},
                       success=reward > 0, num_tool_calls=calls, truncation="max_turns" if truncated else "",
                       num_failed_calls=failed, used_ops=("crop",) if calls else ())


def test_groups_are_numbered_in_order_of_first_appearance():
    groups = make_groups([_trajectory(g, 0.0, 1) for g in ("b", "a", "b", "c", "a")], RewardConfig(beta=0))
    assert [g.trajectories_G[0].group_id for g in groups] == ["b", "a", "c"] and [len(g) for g in groups] == [2, 2, 1]
    assert group_index(groups).tolist() == [0, 0, 1, 1, 2]


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    trajectories = [_trajectory("x", 1.0, 1), _trajectory("y", 0.5, 1), _trajectory("x", 0.0, 1), _trajectory("y", 0.5, 1)]
    groups = make_groups(trajectories, RewardConfig(beta=0))  # x (1.0, 0.0), then y (0.5, 0.5)
    assert loss_keep_mask(groups, mask_truncated=False, dynamic_sampling=True) == [True, True, False, False]


def test_step_metrics_use_the_updates_rewards_and_the_rollout_time():
    trajectories = [_trajectory("a", 1.0, 4, calls=2, failed=1), _trajectory("a", 0.0, 6, truncated=True)]
    groups = [TrajectoryGroup(tuple(trajectories), (0.5, 0.0))]  # rewards_G 1.5, 0.0: what the update used, not t.reward
    timings = {"time/rollout": 2.0, "time/sandbox": 0.5, "time/update": 1.0}
    m = step_metrics(groups, beta=0.25, timings=timings, trajectories_in_loss=1)
    assert m["reward/total"] == 0.75 and m["reward/acc"] == 0.5
    assert m["reward/necessity"] == (0.5 + 0.0) / 2 / 0.25
    assert m["throughput/tokens_per_s"] == (4 + 6) / 2.0 and m["throughput/episodes_per_s"] == 1.0
    assert m["tool/calls_per_episode"] == 1.0 and m["tool/exec_success"] == 0.5 and m["tool/op/crop"] == 0.5
    assert m["episode/truncated"] == 0.5 and m["data/trajectories_in_loss"] == 1.0
    assert {k: m[k] for k in timings} == timings
    assert "reward/necessity" not in step_metrics([TrajectoryGroup(tuple(trajectories), (0.0, 0.0))], 0.0, timings, 2)


def test_run_summary_shows_the_finite_figures_and_how_to_continue(caplog):
    summary = {"steps": 3, "resumed_from": "out/checkpoints/step_00000001", "output_dir": "out", "metrics_path": None,
               "checkpoint": "out/checkpoints/step_00000003", "wandb_mode": "offline",
               "last_metrics": {"actor/loss": 0.123456, "val/loss": math.nan, "reward/total": 1}}
    print_run_summary("SFT", summary, ("actor/loss", "val/loss", "val/acc"), "run it again to continue",
                      ["  HF model:      out/hf/step_3"])
    lines = caplog.messages[-1].splitlines()  # said through logging (console and run log), see algos.tracking.say
    assert lines[0] == "SFT finished at step 3 (resumed from out/checkpoints/step_00000001)"
    assert lines[1] == "  last figures:  actor/loss=0.1235"  # nan and absent figures are left out
    assert "off (logger.metrics_jsonl=null)" in lines[3] and lines[4] == "  HF model:      out/hf/step_3"
    assert lines[5].endswith("(run it again to continue)") and "wandb sync" in lines[6]


def test_the_sft_losses_show_on_the_progress_bar():
    assert PROGRESS_KEYS["actor/loss"] and PROGRESS_KEYS["val/loss"]
