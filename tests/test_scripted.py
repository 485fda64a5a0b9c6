"""Scripted agents through the real env: the oracle earns the ideal reward everywhere; the random
agent's hostile and malformed turns never break an episode."""

import pytest

from agents.rollout import play
from agents.scripted import OracleAgent, RandomAgent, answer_turn, ideal_reward, tool_call_turn
from cv_env.protocol import parse_turn
from cv_env.reward import RewardConfig
from cv_env.sandbox import Sandbox
from cv_env.tasks import CATEGORIES, load_tasks


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0) as shared:
        yield shared


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_oracle_reaches_the_ideal_reward_through_the_env(category, sandbox):
    tasks = [load_tasks(category, split="test")[index] for index in range(4)]
    for task, episode in zip(tasks, play(lambda index: OracleAgent(), tasks, sandbox)):
        components = episode.reward_components
        ideal = ideal_reward(task)
        assert components == pytest.approx(ideal), (task.id, components, ideal)
        assert episode.reward == pytest.approx(ideal["total"])
        assert components["acc"] == 1 and components["fmt"] == 1
        assert components["usage_cost"] == components["spurious"] == components["exec_fail"] == 0
        if task.required_ops:
            assert components["mandatory"] == pytest.approx(1.0) and components["exact"] == pytest.approx(0.1)
        assert episode.num_failed_calls == 0 and episode.num_turns == len(episode.turn_rewards)


def test_ideal_reward_by_hand():
    tasks = load_tasks("synthetic", split="test")
    by_kind = {}
    for task in (tasks[i] for i in range(40)):
        kind = "corrupt" if task.extra.get("corruption") else ("ops" if task.required_ops else "none")
        by_kind.setdefault(kind, task)
    # acc 1 + fmt 0.1 + mandatory 1 + exact 0.1; acc + fmt + emerge 0.2; acc + fmt.
    assert ideal_reward(by_kind["ops"])["total"] == pytest.approx(2.2)
    assert ideal_reward(by_kind["corrupt"])["total"] == pytest.approx(1.3)
    assert ideal_reward(by_kind["none"])["total"] == pytest.approx(1.1)
    release = RewardConfig.preset("codevision_release")
    assert ideal_reward(by_kind["ops"], release)["total"] == pytest.approx(2.2)


def test_random_agent_never_breaks_an_episode(sandbox):
    source = load_tasks("synthetic", split="train")
    tasks = [source[i] for i in range(16)]
    failed_calls = answered = 0
    for episode in play(lambda index: RandomAgent(seed=index), tasks, sandbox, max_turns=4, max_pixels=256 * 256):
        assert episode.reward == pytest.approx(episode.reward_components["total"]) and not episode.error
        failed_calls += episode.num_failed_calls
        answered += episode.answer is not None
    assert failed_calls > 0 and answered > 0  # it does exercise errors and answers


def test_turn_builders_speak_the_protocol():
    call = parse_turn(tool_call_turn("result = image.rotate(90, expand=True)", 1, "fix it"))
    assert (call.kind, call.code, call.image_index, call.description) == (
        "tool_call", "result = image.rotate(90, expand=True)", 1, "fix it")
    answer = parse_turn(answer_turn("42"))
    assert (answer.kind, answer.answer) == ("answer", "42")
    with pytest.raises(RuntimeError, match="call reset"):
        OracleAgent().act()


def test_a_teacher_that_skips_the_tool_answers_at_once_and_earns_the_tool_free_reward(sandbox):
    """OracleAgent(tool_rate) is the teacher of the issue-9 experiment: it knows every answer, but on
    a share of the tasks that need a fix it answers without the tool. Which tasks is a pure function
    of the task id and the seed, so demonstrations are reproducible whatever the order of play."""
    tasks = load_tasks("corner_orientation", split="test")
    teacher = OracleAgent(tool_rate=0.5, seed=3)
    needs_fix = [i for i in range(60) if tasks[i].required_ops]
    skipped = [i for i in needs_fix if not teacher.uses_tool(tasks[i])]
    assert 0.3 < len(skipped) / len(needs_fix) < 0.7  # about half, drawn per task
    assert [OracleAgent(0.5, seed=3).uses_tool(tasks[i]) for i in needs_fix] == [teacher.uses_tool(tasks[i]) for i in needs_fix]
    assert any(OracleAgent(0.5, seed=4).uses_tool(tasks[i]) != teacher.uses_tool(tasks[i]) for i in needs_fix)
    played = [tasks[index] for index in (skipped[0], next(i for i in needs_fix if i not in skipped))]
    for task, episode in zip(played, play(lambda index: OracleAgent(tool_rate=0.5, seed=3), played, sandbox,
                                          max_turns=3)):
        components = episode.reward_components
        uses_tool = teacher.uses_tool(task)
        assert episode.num_turns == (2 if uses_tool else 1)
        assert components == pytest.approx(ideal_reward(task, tools=uses_tool))
        assert components["acc"] == 1  # the answer is right either way; only the fix (mandatory) is missing
    assert ideal_reward(tasks[skipped[0]], tools=False)["total"] == pytest.approx(1.1)  # acc 1 + fmt 0.1
    assert not any(OracleAgent(0.0).uses_tool(tasks[i]) for i in needs_fix)
    assert all(OracleAgent(1.0).uses_tool(tasks[i]) for i in needs_fix)
    with pytest.raises(ValueError, match="tool_rate"):
        OracleAgent(tool_rate=1.5)
