"""A rollout survives any one episode (issue 17): an exception while one episode's turn is
stepped or rendered ends that episode only (truncated "error", the error in its record, left out
of the loss, counted in rollout/episode_errors); a systemic failure stops the rollout with a
message that says why."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from agents.generation import ScriptedBackend  # noqa: E402
from agents.policy import Policy  # noqa: E402
from agents.jsonl import read_jsonl, write_jsonl  # noqa: E402
from agents.rollout import RolloutEngine  # noqa: E402
from agents.scripted import ScriptAgent, answer_turn, tool_call_turn  # noqa: E402
from algos.groups import loss_keep_mask, make_groups  # noqa: E402
from cv_env.reward import RewardConfig  # noqa: E402
from algos.metrics import episode_summary, rollout_metrics  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ENV = dict(max_turns=3, max_pixels=128 * 128)


def _engine(sandbox, scripts):
    """An engine whose k-th episode plays scripts[k] (the scripted backend makes agents in episode order)."""
    order = iter(scripts)
    processor = Policy.load("tiny:qwen2_5_vl").processor
    backend = ScriptedBackend(processor, agent_factory=lambda: ScriptAgent(next(order)))
    return RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV, sampling=dict(max_new_tokens=512))


@pytest.fixture(scope="module")
def tasks():
    source = load_tasks("synthetic", split="test")
    return [source[i] for i in range(3)]


def test_one_failing_episode_ends_alone_and_is_recorded(env_bug, tasks, tmp_path):
    rotate = tool_call_turn("result = image.rotate(90, expand=True)")
    scripts = [[rotate, answer_turn("7")], [rotate, answer_turn(env_bug)], [answer_turn("A")]]
    with Sandbox(workers=1) as sandbox, _engine(sandbox, scripts) as engine:
        trajectories = engine.rollout(tasks, n=1)
    ok, failed, answered = trajectories
    assert (failed.truncated, failed.truncation) == (True, "error") and failed.error == "KeyError: 'an env bug'"
    assert failed.num_turns == 2 and failed.num_tool_calls == 1 and len(failed.images) == 2
    # settled by the env as a truncated episode: the rewards still sum to its total
    assert failed.reward == pytest.approx(sum(failed.turn_rewards)) == pytest.approx(failed.reward_components["total"])
    assert not failed.success and failed.reward_components["acc"] == 0.0
    for other in (ok, answered):
        assert not other.truncated and not other.error and other.num_turns == len(other.turn_rewards)
    assert ok.num_turns == 2 and answered.num_turns == 1

    assert loss_keep_mask(make_groups(trajectories, RewardConfig(beta=0)), mask_truncated=False,
                          dynamic_sampling=False) == [True, False, True]
    metrics = rollout_metrics([episode_summary(t) for t in trajectories])
    assert metrics["rollout/episode_errors"] == 1.0
    again = read_jsonl(write_jsonl(trajectories, tmp_path / "rollouts.jsonl"))
    assert [t.error for t in again] == ["", "KeyError: 'an env bug'", ""]


def test_every_episode_failing_stops_the_rollout_with_the_reason(env_bug, tasks):
    with Sandbox(workers=1) as sandbox, _engine(sandbox, [[answer_turn(env_bug)]] * 3) as engine:
        with pytest.raises(RuntimeError, match=r"every episode of the rollout \(3\) ended by an error.*an env bug"):
            engine.rollout(tasks, n=1)


def test_a_sandbox_gone_stops_the_rollout_with_the_reason(tasks):
    sandbox = Sandbox(workers=1)
    rotate = tool_call_turn("result = image.rotate(90, expand=True)")
    with _engine(sandbox, [[rotate, answer_turn("7")], [answer_turn("A")], [rotate, answer_turn("7")]]) as engine:
        sandbox.close()  # e.g. killed under the trainer: the episodes that call the tool fail
        with pytest.raises(RuntimeError, match=r"the shared sandbox no longer runs code \(RuntimeError: this Sandbox "
                                               r"is closed.*2 of 3 episodes ended by an error.*Start a new Sandbox"):
            engine.rollout(tasks, n=1)
