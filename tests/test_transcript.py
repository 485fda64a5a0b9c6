"""Transcripts: readable views of trajectories, from scripted agents and from token rollouts alike."""

import json

import gymnasium as gym
import pytest

import cv_env  # noqa: F401
from agents.scripted import OracleAgent, RandomAgent, ScriptAgent, answer_turn, tool_call_turn
from agents.jsonl import trajectory_to_json, write_jsonl
from agents.rollout import play
from agents.transcript import Transcript, read_transcripts
from cv_env.sandbox import Sandbox
from cv_env.tasks import RobustnessWrapper, load_tasks


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0) as shared:
        yield shared


def play_transcript(sandbox, agent, task, agent_name="", **env_kwargs):
    """One episode of `task` played by the scripted `agent` through the rollout engine, as a transcript."""
    (trajectory,) = play(lambda index: agent, [task], sandbox, **env_kwargs)
    return Transcript.of(trajectory, task=task, agent=agent_name)


@pytest.fixture(scope="module")
def variants():
    wrapped = RobustnessWrapper(load_tasks("orientation_ocr,tiny_ocr", split="test"))
    return [wrapped[i] for i in range(12)]


def test_oracle_transcript_records_every_turn(sandbox, variants):
    task = variants[1]  # orientation_ocr under rotate_90
    t = play_transcript(sandbox, OracleAgent(), task, agent_name="oracle")
    assert (t.variant, t.base_id, t.agent) == ("rotate_90", variants[0].extra["robustness"]["base_id"], "oracle")
    assert t.success and t.answer == task.answer and t.ground_truth == task.answer
    assert [turn.kind for turn in t.turns] == ["tool_call", "answer"]
    call = t.turns[0]
    assert call.tool_ok is True and call.thinking and "result" in call.code and call.image_index == 0
    assert call.tool_text.startswith("Image 1 created") and len(call.tool_images) == 1
    assert set(call.ops) == set(t.used_ops) and set(t.used_ops) >= set(task.required_ops)
    assert t.reward == pytest.approx(sum(turn.reward for turn in t.turns))
    assert t.reward == pytest.approx(t.reward_components["total"])
    assert t.num_tool_calls == 1 and t.num_failed_calls == 0 and t.num_turns == 2
    assert task.question in t.question and len(t.input_images) == 1


def test_failed_and_malformed_turns_are_data(sandbox, variants):
    script = ScriptAgent([
        tool_call_turn("result = undefined_name", thought="try"),
        '<tool_call>{"name": "code_image_tool", "arguments": {"code": </tool_call>',
        answer_turn("nope"),
    ])
    t = play_transcript(sandbox, script, variants[0], max_turns=4)
    failed, malformed, answer = t.turns
    assert failed.tool_ok is False and failed.tool_text.startswith("Error:") and failed.ops == []
    assert failed.reward == pytest.approx(-0.05)  # the per-call penalty, paid on that step
    assert malformed.kind == "invalid" and "not valid JSON" in malformed.error and malformed.tool_ok is False
    assert answer.kind == "answer" and answer.answer == "nope" and not t.success
    assert t.num_tool_calls == 2 and t.num_failed_calls == 2 and t.used_ops == []


def test_turn_limit_marks_truncation(sandbox, variants):
    t = play_transcript(sandbox, ScriptAgent([tool_call_turn("result = image")] * 2), variants[0], max_turns=2)
    assert t.truncated and t.truncation == "max_turns" and t.answer is None and t.num_turns == 2


def test_jsonl_round_trip_keeps_text_and_pixels(sandbox, variants, tmp_path):
    originals = [play_transcript(sandbox, OracleAgent(), task, "oracle", max_turns=3) for task in variants[:3]]
    originals.append(play_transcript(sandbox, RandomAgent(seed=1), variants[6], "random", max_turns=3))
    path = write_jsonl(originals, tmp_path / "t.jsonl")
    back = read_transcripts(path)
    assert len(back) == 4
    for a, b in zip(originals, back):
        assert trajectory_to_json(a.trajectory) == trajectory_to_json(b.trajectory) and a.context() == b.context()
        assert [im.tobytes() for im in a.input_images] == [im.tobytes() for im in b.input_images]
        for ta, tb in zip(a.turns, b.turns):
            assert [im.tobytes() for im in ta.tool_images] == [im.tobytes() for im in tb.tool_images]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing field"):
        read_transcripts(tmp_path / "bad.jsonl")


def test_transcript_of_a_token_rollout_matches_the_chat_transcript(sandbox, variants):
    """The oracle through a token backend (ScriptedBackend) reads as the oracle through the chat path."""
    from agents.generation import ScriptedBackend
    from agents.loading import load_processor
    from agents.rollout import RolloutEngine

    processor = load_processor("tiny:qwen2_5_vl")
    tasks = [variants[0], variants[1], variants[7]]
    env_kwargs = dict(max_turns=3, max_pixels=128 * 128)
    with RolloutEngine(ScriptedBackend(processor), sandbox=sandbox, env_kwargs=env_kwargs,
                       sampling=dict(max_new_tokens=4096), max_total_tokens=8192) as engine:
        trajectories = engine.rollout(tasks, n=1)
    for trajectory, task in zip(trajectories, tasks):
        decoded = Transcript.of(trajectory, task=task, agent="oracle")
        played = play_transcript(sandbox, OracleAgent(), task, "oracle", **env_kwargs)
        assert (decoded.variant, decoded.base_id, decoded.success) == (played.variant, played.base_id, True)
        assert decoded.question == played.question and decoded.question.startswith(task.question)
        assert decoded.reward == pytest.approx(played.reward)
        assert decoded.num_tool_calls == played.num_tool_calls and decoded.num_failed_calls == 0
        assert len(decoded.turns) == len(played.turns)
        for a, b in zip(decoded.turns, played.turns):
            assert (a.kind, a.thinking, a.code, a.answer, a.reward) == (b.kind, b.thinking, b.code, b.answer, b.reward)
            assert a.tool_text == b.tool_text and a.tool_ok == b.tool_ok
            assert [im.size for im in a.tool_images] == [im.size for im in b.tool_images]
        assert [im.size for im in decoded.input_images] == [im.size for im in played.input_images]


def test_recorded_ops_and_failures_of_a_trajectory_are_used(sandbox, variants):
    """The ops and failed calls the env saw reach the transcript through the trajectory."""
    from agents.generation import ScriptedBackend
    from agents.loading import load_processor
    from agents.rollout import RolloutEngine

    processor = load_processor("tiny:qwen2_5_vl")
    with RolloutEngine(ScriptedBackend(processor), sandbox=sandbox, env_kwargs=dict(max_turns=3, max_pixels=128 * 128),
                       sampling=dict(max_new_tokens=4096), max_total_tokens=8192) as engine:
        (trajectory,) = engine.rollout([variants[1]], n=1)
    assert trajectory.num_failed_calls == 0 and trajectory.turn_ops[-1] == []
    plain = Transcript.of(trajectory)
    assert plain.ground_truth == ""  # no task given: nothing to compare with
    rich = Transcript.of(trajectory, task=variants[1])
    assert rich.used_ops == sorted(trajectory.used_ops) and rich.used_ops
    assert rich.turns[0].ops == trajectory.turn_ops[0] and set(rich.turns[0].ops) == set(trajectory.used_ops)
    assert rich.ground_truth == variants[1].answer and rich.variant == "rotate_90"
