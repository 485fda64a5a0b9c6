"""The rollout engine with a chat backend: a request the backend could not answer ends its own
episode only (unanswered: truncated "error", its error kept, no turn made up); when every episode
is unanswered the rollout raises `Unanswered` with the trajectories; an exception `respond` raises
stops the rollout with no env left stepping; what the backend counts per episode is kept."""

import pytest

from agents.rollout import EpisodesFailed, RolloutEngine, Unanswered
from agents.scripted import ScriptAgent, ScriptedAgents, answer_turn, tool_call_turn
from cv_env.sandbox import Sandbox
from cv_env.tasks import load_tasks

ROTATE = tool_call_turn("result = image.rotate(90, expand=True)")
ENV = dict(max_turns=3, max_pixels=128 * 128)


class FlakyAgents(ScriptedAgents):
    """Scripted agents behind a backend that cannot answer the turns in `fails` ({episode: turn});
    it counts each episode's requests in `usage`, as a served backend does."""

    def __init__(self, scripts, fails):
        super().__init__(lambda index: ScriptAgent(scripts[index]))
        self.fails = fails

    def respond(self, requests, sampling=None, seed=None, on_finish=None):
        replies = []
        for i, request in enumerate(requests):
            request.usage["requests"] = request.usage.get("requests", 0.0) + 1
            turn = sum(m["role"] == "assistant" for m in request.messages)
            if self.fails.get(int(request.key)) == turn:
                replies.append(TimeoutError(f"no reply to episode {request.key} turn {turn}"))
                on_finish(i, replies[-1])
            else:
                replies += super().respond([request], sampling, seed, lambda _, reply: on_finish(i, reply))
        return replies


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1) as shared:
        yield shared


@pytest.fixture(scope="module")
def tasks():
    source = load_tasks("synthetic", split="test")
    return [source[i] for i in range(3)]


def _rollout(sandbox, tasks, scripts, fails):
    with RolloutEngine(FlakyAgents(scripts, fails), sandbox=sandbox, env_kwargs=ENV) as engine:
        return engine.rollout(tasks, n=1)


def test_an_unanswered_request_ends_its_episode_only(sandbox, tasks):
    scripts = [[ROTATE, answer_turn("7")], [ROTATE, answer_turn("7")], [answer_turn("A")]]
    first, second, third = _rollout(sandbox, tasks, scripts, fails={0: 0, 1: 1})
    # unanswered at its first request: no turn, nothing earned, settled by the env
    assert (first.truncation, first.error, first.num_turns) == ("error", "TimeoutError: no reply to episode 0 turn 0", 0)
    assert first.reward == first.reward_components["total"] == 0.0 and not first.success
    # unanswered after a tool call: that turn stands, none is made up after it
    assert (second.truncation, second.num_turns, second.num_tool_calls) == ("error", 1, 1)
    assert second.turns[0].action == ROTATE and second.turns[0].tool_ok and "turn 1" in second.error
    assert second.reward == pytest.approx(second.reward_components["total"])
    # the other episode played on
    assert (third.truncation, third.error, third.num_turns) == ("", "", 1)
    assert [t.usage["requests"] for t in (first, second, third)] == [1.0, 2.0, 1.0]


def test_every_episode_unanswered_raises_with_the_trajectories(sandbox, tasks):
    scripts = [[ROTATE, answer_turn("7")]] * 3
    with pytest.raises(Unanswered, match=r"every episode of the rollout \(3\) ended without an answer.*"
                                         r"TimeoutError: no reply to episode 0 turn 0") as raised:
        _rollout(sandbox, tasks, scripts, fails={0: 0, 1: 1, 2: 0})
    assert [t.num_turns for t in raised.value.trajectories] == [0, 1, 0]
    assert all(t.truncation == "error" for t in raised.value.trajectories)


def test_every_episode_failing_for_mixed_reasons_is_no_backend_outage(sandbox, tasks, env_bug):
    scripts = [[ROTATE], [answer_turn(env_bug)], [ROTATE]]
    with pytest.raises(EpisodesFailed, match=r"every episode of the rollout \(3\) ended by an error") as raised:
        _rollout(sandbox, tasks, scripts, fails={0: 0, 2: 1})
    assert not isinstance(raised.value, Unanswered)
    assert [t.error for t in raised.value.trajectories][1] == "KeyError: 'an env bug'"


def test_a_backend_that_raises_stops_the_rollout_and_the_engine_runs_again(sandbox, tasks):
    class Refusing(ScriptedAgents):
        refuse = True

        def respond(self, requests, sampling=None, seed=None, on_finish=None):
            if self.refuse and any(m["role"] == "assistant" for r in requests for m in r.messages):
                on_finish(0, ROTATE)  # a reply already on its way: its step must not outlive the rollout
                raise PermissionError("HTTP 401: the key was refused")
            return super().respond(requests, sampling, seed, on_finish)

    scripts = [[ROTATE, ROTATE, answer_turn("7")]] * 3
    backend = Refusing(lambda index: ScriptAgent(scripts[index]))
    with RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV) as engine:
        with pytest.raises(PermissionError, match="HTTP 401"):
            engine.rollout(tasks, n=1)
        backend.refuse = False
        again = engine.rollout(tasks, n=1)
    assert all(t.num_turns == 3 and not t.error and not t.truncated for t in again)
