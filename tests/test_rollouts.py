"""The rollout-side pieces GRPO and PPO share: group numbering, step figures, the run summary."""

from __future__ import annotations

import math

import torch

from agents.trajectory import Trajectory
from algos.rollouts import group_index, loss_keep_mask, step_metrics
from algos.tracking import PROGRESS_KEYS, print_run_summary


def _trajectory(group: str, reward: float, sampled: int, calls: int = 0, failed: int = 0, truncated: bool = False):
    n = 3 + sampled  # a 3-token prompt, then the sampled tokens
    return Trajectory(
        task_id="t", group_id=group, category="charts", token_ids=list(range(n)), loss_mask=[0] * 3 + [1] * sampled,
        sampler_logprobs=[0.0] * n, token_rewards=[0.0] * (n - 1) + [reward], turn_ends=[n - 1],
        turn_rewards=[reward], reward=reward, reward_components={"acc": reward, "total": reward}, images=[],
        image_grid_thw=[], pixel_values=None, success=reward > 0, num_turns=1, num_tool_calls=calls,
        truncated=truncated, truncation="max_turns" if truncated else "", prompt_length=3, num_failed_calls=failed,
        used_ops=["crop"] if calls else [],
    )


def test_groups_are_numbered_in_order_of_first_appearance():
    trajectories = [_trajectory(g, 0.0, 1) for g in ("b", "a", "b", "c", "a")]
    assert group_index(trajectories).tolist() == [0, 1, 0, 2, 1]


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    trajectories = [_trajectory("x", 1.0, 1), _trajectory("y", 0.5, 1), _trajectory("x", 0.0, 1), _trajectory("y", 0.5, 1)]
    rewards_G = torch.tensor([1.0, 0.5, 0.0, 0.5])
    assert loss_keep_mask(trajectories, rewards_G, mask_truncated=False, dynamic_sampling=True) == [True, False, True, False]


def test_step_metrics_use_the_updates_rewards_and_the_rollout_time():
    trajectories = [_trajectory("a", 1.0, 4, calls=2, failed=1), _trajectory("a", 0.0, 6, truncated=True)]
    rewards_G = torch.tensor([1.5, 0.0])  # group terms added: what the update used, not t.reward
    timings = {"time/rollout": 2.0, "time/sandbox": 0.5, "time/update": 1.0}
    m = step_metrics(trajectories, rewards_G, adjustments=[0.5, 0.0], beta=0.25, timings=timings, trajectories_in_loss=1)
    assert m["reward/total"] == 0.75 and m["reward/acc"] == 0.5
    assert m["reward/necessity"] == (0.5 + 0.0) / 2 / 0.25
    assert m["throughput/tokens_per_s"] == (4 + 6) / 2.0 and m["throughput/episodes_per_s"] == 1.0
    assert m["tool/calls_per_episode"] == 1.0 and m["tool/exec_success"] == 0.5 and m["tool/op/crop"] == 0.5
    assert m["episode/truncated"] == 0.5 and m["data/trajectories_in_loss"] == 1.0
    assert {k: m[k] for k in timings} == timings
    assert "reward/necessity" not in step_metrics(trajectories, rewards_G, [0.0, 0.0], 0.0, timings, 2)


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
