"""Reward terms with hand-computed values (the paper's E, U, n notation; see cv_env/reward.py)."""

import re
from pathlib import Path

import pytest

from cv_env.reward import (
    EpisodeOutcome,
    RewardConfig,
    apply_necessity,
    emerge_reward,
    episode_components,
    exact_reward,
    exec_fail_reward,
    format_reward,
    gated_accuracy,
    iou,
    mandatory_reward,
    necessity,
    spurious_penalty,
    usage_cost,
    uses_tools,
)
from cv_env.task import Task

CONF = Path(__file__).resolve().parents[1] / "conf" / "reward"
CFG = RewardConfig()
THINK = "<think>look</think>"
CALL = THINK + '<tool_call>{"name": "code_image_tool", "arguments": {"code": "x"}}</tool_call>'
ANSWER = THINK + "<answer>B</answer>"


# -- IoU -------------------------------------------------------------------------------------------


def test_iou_hand_computed():
    assert iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges share no area
    assert iou([10, 10, 0, 0], [5, 5, 15, 15]) == pytest.approx(25 / 175)  # corner order free
    assert iou([3, 3, 3, 9], [3, 3, 3, 9]) == 0.0  # zero-area boxes overlap nothing


# -- fmt ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "turns",
    [
        [ANSWER],
        ["  \n" + ANSWER + "\n "],  # whitespace around the turn
        [CALL, CALL, ANSWER],
        ["<think>a</think> text <think>b</think>\n<answer>12 cm</answer>"],  # two think blocks
    ],
)
def test_format_accepts_think_then_answer(turns):
    assert format_reward(turns) == 1.0


@pytest.mark.parametrize(
    "turns",
    [
        [],
        ["<answer>B</answer>"],  # no think
        ["Sure! " + ANSWER],  # does not start with <think>
        [CALL.replace(THINK, ""), ANSWER],  # an earlier turn without think
        ["<think>a<think>b</think></think><answer>B</answer>"],  # nested think
        ["<think>a</think></think><answer>B</answer>"],  # stray close
        ["<think>a<answer>B</answer>"],  # answer inside an unclosed think
        ["<think>a <answer>B</answer></think>"],  # answer inside think
        [THINK + "<answer>A</answer><answer>B</answer>"],  # two answers
        [THINK + "<answer>B</answer>", ANSWER],  # answer in an earlier turn too
        [THINK + "<answer>B</answer> because ..."],  # answer not at the end
        [THINK + "<answer>B"],  # unclosed answer
        [CALL],  # no answer at all
    ],
)
def test_format_rejects(turns):
    assert format_reward(turns) == 0.0


# -- mandatory and the crop gate ----------------------------------------------------------------


def test_mandatory_shares():
    assert mandatory_reward([], {"rotate_90"}) == 0.0  # nothing required
    assert mandatory_reward(["rotate_270"], {"rotate_270"}) == 1.0
    assert mandatory_reward(["rotate_270"], set()) == 0.0
    assert mandatory_reward(["rotate_270"], {"rotate_90"}) == 0.0  # the wrong way round
    assert mandatory_reward(["rotate_270", "flip_horizontal"], {"rotate_270", "blur"}) == 0.5


def test_mandatory_crop_scored_by_best_iou():
    # E = {rotate_90, crop}; IoUs with the bbox: 25/175 and 50/100 -> best 0.5 -> (1 + 0.5) / 2
    boxes = [[5, 5, 15, 15], [0, 0, 10, 5]]
    assert mandatory_reward(["rotate_90", "crop"], {"rotate_90", "crop"}, boxes, [0, 0, 10, 10]) == 0.75
    # crop required, op used but no box reached the bbox: only the rotation counts
    assert mandatory_reward(["rotate_90", "crop"], {"rotate_90", "crop"}, [[50, 50, 60, 60]], [0, 0, 10, 10]) == 0.5
    # crop boxes alone do not count: U decides whether a crop happened
    assert mandatory_reward(["crop"], set(), [[0, 0, 10, 10]], [0, 0, 10, 10]) == 0.0
    # a crop task without a bbox cannot be scored: using crop earns its share (the release: none)
    assert mandatory_reward(["crop"], {"crop"}, [[0, 0, 1, 1]], None) == 1.0
    assert mandatory_reward(["rotate_90", "crop"], {"rotate_90", "crop"}, [], None, crop_without_bbox=0.0) == 0.5


def test_crop_gate_scales_accuracy():
    assert gated_accuracy(True, ["crop"], 0.0, CFG) == 0.0  # correct but never cropped
    assert gated_accuracy(True, ["crop"], 0.05, CFG) == 0.05  # a crop far from the target
    assert gated_accuracy(True, ["crop"], 0.1, CFG) == 1.0  # at the gate: not gated
    assert gated_accuracy(True, ["rotate_90"], 0.0, CFG) == 1.0  # the gate is for crops only
    assert gated_accuracy(False, ["crop"], 1.0, CFG) == 0.0


# -- exact, emerge, usage_cost, spurious, exec_fail -------------------------------------------------


def test_exact():
    assert exact_reward(["rotate_90"], {"rotate_90", "contrast"}, CFG) == 0.1  # non-core ops free
    assert exact_reward(["rotate_90"], {"rotate_90", "crop"}, CFG) == 0.0  # one core op too many
    assert exact_reward(["rotate_90", "crop"], {"rotate_90"}, CFG) == 0.0  # one missing
    assert exact_reward(["crop"], {"crop"}, CFG) == 0.1
    assert exact_reward([], set(), CFG) == 0.0  # nothing required: nothing to match


def test_emerge():
    assert emerge_reward(True, {"contrast"}, CFG) == 0.2
    assert emerge_reward(True, {"rotate_90", "crop"}, CFG) == 0.0  # core ops only
    assert emerge_reward(False, {"contrast"}, CFG) == 0.0


def test_usage_cost():
    assert usage_cost(1, [], CFG) == 0.0
    assert usage_cost(2, [], CFG) == 0.0  # two free calls
    assert usage_cost(3, [], CFG) == 1.0
    assert usage_cost(5, ["rotate_90", "flip_vertical", "crop"], CFG) == 2.0  # budget |E| = 3


def test_spurious():
    assert spurious_penalty([], {"rotate_90", "flip_vertical", "crop", "blur"}) == 2.0
    assert spurious_penalty(["crop"], {"rotate_90"}) == 1.0  # crop is not an orientation op
    assert spurious_penalty(["rotate_90"], {"rotate_90", "flip_vertical"}) == 0.0


def test_exec_fail_per_call():
    assert exec_fail_reward(True, CFG) == 0.0
    assert exec_fail_reward(False, CFG) == -0.05
    assert exec_fail_reward(False, RewardConfig.preset("codevision_release")) == 0.0


# -- whole episodes --------------------------------------------------------------------------------


def test_rotate_then_crop_chain_with_a_failed_call():
    # Task rotated by 90 then needs a crop: E = [rotate_270, crop]. Three calls, one failed;
    # the crop (mapped into the bbox frame) [10,10,30,30] vs bbox [10,10,30,40]: IoU 400/600.
    task = Task("t", [_image()], "q", "B", transforms=["rotate_90", "crop"], bbox=[10, 10, 30, 40])
    outcome = EpisodeOutcome(
        [CALL, CALL, CALL, ANSWER], True, task.required_ops, {"rotate_270", "crop"},
        [[10, 10, 30, 30]], task.bbox, n_calls=3, n_failed=1,
    )
    c = episode_components(outcome, CFG)
    assert c["mandatory"] == pytest.approx((1 + 2 / 3) / 2)
    expected = {"acc": 1.0, "fmt": 1.0, "necessity": 0.0, "exact": 0.1, "emerge": 0.0,
                "usage_cost": 1.0, "spurious": 0.0, "exec_fail": -0.05}
    assert {k: c[k] for k in expected} == pytest.approx(expected)
    # 1 + 0.1 + 5/6 + 0.1 - 0.5*1 - 0.05
    assert c["total"] == pytest.approx(1.4833333333)
    release = episode_components(outcome, RewardConfig.preset("codevision_release"))
    assert release["exec_fail"] == 0.0 and release["total"] == pytest.approx(1.5333333333)


def test_oracle_reaches_the_maximum():
    outcome = EpisodeOutcome([CALL, ANSWER], True, ["rotate_270"], {"rotate_270"}, n_calls=1)
    assert episode_components(outcome)["total"] == pytest.approx(1 + 0.1 + 1 + 0.1)


def test_no_op_or_described_crop_does_not_count():
    # The code's description said "crop" but nothing was cropped: U is empty, so the crop task
    # earns no mandatory share and its correct answer is gated to 0.
    outcome = EpisodeOutcome([CALL, ANSWER], True, ["crop"], set(), [], [0, 0, 5, 5], n_calls=1)
    c = episode_components(outcome)
    assert (c["acc"], c["mandatory"], c["exact"], c["total"]) == (0.0, 0.0, 0.0, pytest.approx(0.1))


def test_spurious_rotation_with_emergent_op():
    # E empty; the model rotated for nothing and raised the contrast: 1 + 0.1 + 0.2 - 0.5
    outcome = EpisodeOutcome([CALL, ANSWER], True, [], {"rotate_90", "contrast"}, n_calls=1)
    c = episode_components(outcome)
    assert (c["spurious"], c["emerge"], c["total"]) == (1.0, 0.2, pytest.approx(0.8))


def test_step_rewards_sum_to_the_total():
    outcome = EpisodeOutcome([CALL] * 4 + [ANSWER], False, [], {"blur"}, n_calls=4, n_failed=3)
    steps = [exec_fail_reward(ok, CFG) for ok in (False, True, False, False)]
    total = episode_components(outcome, CFG)["total"]
    steps.append(total - sum(steps))  # what the env pays at the terminal step
    assert sum(steps) == pytest.approx(total) == pytest.approx(0.1 - 0.5 * 2 - 0.15)


def test_outcome_validation():
    with pytest.raises(ValueError, match="n_failed"):
        EpisodeOutcome([ANSWER], True, n_calls=1, n_failed=2)
    with pytest.raises(ValueError, match="bbox"):
        EpisodeOutcome([ANSWER], True, bbox=[1, 2, 3])
    with pytest.raises(TypeError, match="list of turns"):
        EpisodeOutcome(ANSWER, True)


# -- necessity (group term) ------------------------------------------------------------------------


def _ep(correct, n_calls, n_failed=0):
    return {"correct": correct, "n_calls": n_calls, "n_failed": n_failed}


def test_necessity_pays_correct_tool_users():
    # with tools: 3/4 correct; without: 1/2 -> 0.25 to each correct tool-using rollout
    group = [_ep(True, 1), _ep(True, 2), _ep(True, 1), _ep(False, 3), _ep(True, 0), _ep(False, 0)]
    assert necessity(group) == [0.25, 0.25, 0.25, 0.0, 0.0, 0.0]
    assert apply_necessity(group, RewardConfig(beta=0.5)) == [0.125, 0.125, 0.125, 0.0, 0.0, 0.0]
    assert apply_necessity(group) == [0.0] * 6  # off by default (beta 0, as in the release)


def test_necessity_conditions():
    two_free_correct = [_ep(True, 1), _ep(True, 0), _ep(True, 0), _ep(False, 0)]
    assert necessity(two_free_correct) == [0.0] * 4  # answerable without tools
    assert necessity([_ep(True, 1), _ep(False, 1)]) == [0.0, 0.0]  # no tool-free rollout
    assert necessity([_ep(False, 1), _ep(True, 0)]) == [0.0, 0.0]  # tools did worse: max(0, .)
    # every call failed: the rollout answered without tools
    assert not uses_tools(_ep(True, 2, n_failed=2))
    assert necessity([_ep(True, 1), _ep(False, 2, n_failed=2)]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="group\\[1\\] needs 'correct' and 'n_calls'"):
        necessity([_ep(True, 1), {"correct": True}])


# -- config ----------------------------------------------------------------------------------------


def test_config_from_dict_and_presets():
    assert RewardConfig.from_dict({"beta": 0.3}).beta == 0.3
    assert RewardConfig.preset() == RewardConfig()
    assert RewardConfig.preset("codevision_release") == RewardConfig(
        exec_fail_penalty=0.0, crop_frame="source", crop_without_bbox=0.0, answer_rules="release",
        format_rules="release", tool_use="call", last_turn_call="skip")
    with pytest.raises(ValueError, match="'answer_rules' is 'strict': choose one of codevision, release"):
        RewardConfig(answer_rules="strict")
    with pytest.raises(ValueError, match=r"unknown reward config key\(s\) \['gama'\]; valid keys are: .*gamma"):
        RewardConfig.from_dict({"gama": 0.5})
    with pytest.raises(ValueError, match="unknown reward preset 'deepeyes'"):
        RewardConfig.preset("deepeyes")
    with pytest.raises(ValueError, match="'gamma' is -1"):
        RewardConfig(gamma=-1)


@pytest.mark.parametrize("name", ["codevision", "codevision_release"])
def test_yaml_presets_match_the_dataclass(name):
    yaml = pytest.importorskip("yaml")
    path = CONF / f"{name}.yaml"
    assert RewardConfig.from_dict(yaml.safe_load(path.read_text())) == RewardConfig.preset(name)
    keys = [line for line in path.read_text().splitlines() if re.match(r"^\w+:", line)]
    assert len(keys) == len(RewardConfig().to_dict())
    assert all("  # " in line for line in keys), "every YAML key carries a one-line comment"


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 50))


def test_the_release_format_reads_the_whole_response():
    later_turn_without_think = EpisodeOutcome([CALL, "<answer>B</answer>"], True, ["rotate_270"], {"rotate_270"}, n_calls=1)
    assert episode_components(later_turn_without_think)["fmt"] == 0.0  # ours: every turn opens with <think>
    release = RewardConfig.preset("codevision_release")
    assert episode_components(later_turn_without_think, release)["fmt"] == 1.0  # the release: one pair in all


def test_necessity_follows_tool_use_and_the_crop_gate():
    # The release counts any call as tool use, failed ones included
    group = [_ep(True, 1), _ep(True, 2, n_failed=2), _ep(False, 0)]
    assert necessity(group) == [0.5, 0.0, 0.0]  # ours: the all-failed rollout answered without tools
    assert necessity(group, tool_use="call") == [1.0, 1.0, 0.0]
    assert uses_tools(_ep(True, 2, n_failed=2), "call")
    # a correct answer whose accuracy the crop gate cut earns no necessity (acc < 1)
    gated = [{**_ep(True, 1), "acc": 0.05}, _ep(True, 1), _ep(False, 0)]
    assert necessity(gated) == [0.0, 1.0, 0.0]
