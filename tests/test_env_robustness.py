"""A model's output is data (issue 17): whatever a turn holds, `env.step` answers with an
observation inside `observation_space` and a finite reward; only misuse raises.

Property tests drive `step` with generated turns, dict actions and tool code (odd images,
non-images, code without `result`, huge and unprintable output); the other tests pin each
finding of issue 17 that lives in the env.
"""

import json
import math

import gymnasium as gym
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import cv_env  # noqa: F401  (registers CodeVision-v0)
from cv_env import Task
from cv_env.env import MAX_STDOUT_CHARS, NO_IMAGE
from cv_env.sandbox import Sandbox
from model_outputs import CODE, DICT_ACTIONS, TURNS, call_text, examples


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=5.0) as shared:
        yield shared


def _task():
    image = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(image).rectangle((4, 4, 20, 30), fill="black")
    return Task(id="t0", images=[image], question="What number?", answer="7", answer_type="number",
                category="unit", transforms=["crop"], bbox=[4, 4, 21, 31])


def _env(sandbox, **kwargs):
    kwargs = {"tasks": [_task()], "max_turns": 4, "max_pixels": 32 * 32, "max_action_chars": 20_000, **kwargs}
    return gym.make("CodeVision-v0", sandbox=sandbox, **kwargs).unwrapped


def _call(code, image_index=0):
    return f"<think>look</think>\n<tool_call>\n{call_text({'code': code, 'image_index': image_index})}\n</tool_call>"


# -- properties --------------------------------------------------------------------------------

ACTIONS = st.one_of(TURNS, DICT_ACTIONS, CODE.map(_call), st.tuples(CODE, st.integers(-1, 3)).map(lambda c: _call(*c)))


@examples(default=40, slow=600)
def test_any_sequence_of_turns_gets_observations_and_finite_rewards(sandbox, max_examples):
    env = _env(sandbox)

    @settings(max_examples=max_examples)
    @given(st.lists(ACTIONS, min_size=1, max_size=4))
    def check(actions):
        obs, _ = env.reset(seed=0)
        paid = 0.0
        for action in actions:
            obs, reward, terminated, truncated, info = env.step(action)
            assert env.observation_space.contains(obs), obs["text"][:300]
            assert isinstance(reward, float) and math.isfinite(reward)
            paid += reward
            if terminated or truncated:
                assert paid == pytest.approx(info["reward_components"]["total"])
                assert all(math.isfinite(v) for v in info["reward_components"].values())
                with pytest.raises(RuntimeError, match="after the episode ended"):
                    env.step(action)
                return
            assert obs["role"] == "tool" and obs["text"]  # a tool reply the model can read
            assert info["tool_ok"] or obs["text"].startswith("Error:")

    check()


# -- the findings of issue 17 ------------------------------------------------------------------


def test_a_call_without_result_is_a_successful_call_that_adds_no_image(sandbox):
    env = _env(sandbox, max_turns=8)
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(_call("print(image.size)"))
    assert obs["text"] == "Printed output:\n(64, 48)\n" and obs["images"] == ()
    assert (reward, terminated, info["tool_ok"], info["ops"]) == (0.0, False, True, [])
    for code in ("x = image.rotate(90)", "pass", "result = None"):
        obs, reward, *_ = env.step(_call(code))
        assert obs["text"] == NO_IMAGE and obs["images"] == () and reward == 0.0
    # The episode goes on: the next output is image 1, and the calls count as successful ones.
    env = _env(sandbox)
    env.reset(seed=0)
    env.step(_call("print(image.size)"))
    obs, *_ = env.step(_call("result = image.crop((4, 4, 21, 31))"))
    assert obs["text"].startswith("Image 1 created: 17x27 pixels")
    *_, info = env.step("<think>seven</think><answer>7</answer>")
    assert (info["n_calls"], info["n_failed"], info["reward_components"]["exec_fail"]) == (2, 0, 0.0)
    assert info["reward_components"]["mandatory"] == pytest.approx(1.0)


def test_an_over_long_turn_is_refused_before_it_is_read(sandbox):
    env = _env(sandbox, max_action_chars=65_536)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("<answer>" * 700_000)  # 5.6 MB, a looping model
    assert not (terminated or truncated) and obs["images"] == ()
    assert "5,600,000 characters long, over the limit of 65,536, so it was not read" in obs["text"]
    assert reward == pytest.approx(-0.05) and not info["tool_ok"]  # a failed call
    obs, *_ = env.step({"code": "x" * 70_000})
    assert "not read" in obs["text"]
    obs, _, terminated, *_ = env.step("<think>ok</think><answer>7</answer>")
    assert terminated


@pytest.mark.timeout(60)
def test_a_huge_turn_within_the_limit_is_parsed_in_linear_time(sandbox):
    env = _env(sandbox, max_action_chars=10_000_000)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step("<answer>" * 700_000)
    assert terminated and not info["correct"]


def test_printed_output_is_cut_with_a_marker_and_the_shown_size_is_on_the_image_line(sandbox):
    env = _env(sandbox, max_pixels=100 * 75)
    env.reset(seed=0)
    obs, *_ = env.step(_call("print('y' * 5000)\nresult = image.resize((400, 300))"))
    first, rest = obs["text"].split("\n", 1)
    assert first == "Image 1 created: 400x300 pixels (shown at 100x75; coordinates refer to the full size)."
    assert rest.startswith("Printed output:\n" + "y" * MAX_STDOUT_CHARS + "\n…[printed output cut here: 3,001 more")
    assert obs["images"][0].shape == (75, 100, 3)


def test_unprintable_output_and_odd_images_stay_inside_the_observation_space(sandbox):
    env = _env(sandbox)
    env.reset(seed=0)
    obs, *_ = env.step(_call("print('\\ud800 \\x00\\x1b[31m end')"))
    assert env.observation_space.contains(obs) and "\ufffd" in obs["text"]
    json.dumps(obs["text"]).encode("utf-8")  # a lone surrogate would not encode
    for code, shape in (("result = Image.new('F', (5, 4), 3.5)", (4, 5, 3)), ("result = image.resize((200, 1))", None),
                        ("result = image.resize((1, 1))", (1, 1, 3)), ("result = image.convert('RGBA')", None)):
        obs, *_ = env.step(_call(code))
        assert env.observation_space.contains(obs) and len(obs["images"]) == 1, obs["text"]
        assert shape is None or obs["images"][0].shape == shape
        env.reset(seed=0)


def test_extreme_aspect_images_are_shown_within_max_pixels():
    from cv_env.shown import shown_copy

    for size, max_pixels in (((200, 1), 64), ((1, 200), 64), ((4096, 4096), 1024), ((3, 1000), 1000), ((1, 1), 1)):
        shown = shown_copy(Image.new("L", size), max_pixels)
        assert shown.mode == "RGB" and shown.width * shown.height <= max_pixels and min(shown.size) >= 1


def test_dict_actions_with_model_mistakes_are_observations(sandbox):
    env = _env(sandbox)
    env.reset(seed=0)
    obs, reward, terminated, *_ = env.step({"cod": "result = image"})
    assert not terminated and reward < 0 and "neither 'code' (a tool call) nor 'answer'" in obs["text"]
    obs, *_ = env.step({"code": 5, "image_index": "two"})
    assert 'no "code" string' in obs["text"]
    obs, *_ = env.step({"code": "result = image", "image_index": 10**5000, "lang": "py"})
    assert "must be an integer" in obs["text"] and "unknown key(s) ignored: ['lang']" in obs["text"]
    assert env.messages[-2]["role"] == "assistant"  # the dict is recorded as the turn it stood for
    _, _, terminated, _, info = env.step({"answer": None})
    assert terminated and info["answer"] == "None" and not info["correct"]


def test_misuse_raises_clear_errors_even_after_close(sandbox):
    env = _env(sandbox)
    env.reset(seed=0)
    with pytest.raises(TypeError, match="must be a str"):
        env.step(["<answer>7</answer>"])
    env.close()
    with pytest.raises(RuntimeError, match="closed env: create a new one"):
        env.step("<answer>7</answer>")
    with pytest.raises(RuntimeError, match="closed env"):
        env.reset(seed=0)
    env.close()  # twice is fine
    assert sandbox.run("result = image", [Image.new("L", (2, 2))]).ok  # a shared sandbox stays open


def test_max_action_chars_is_validated(sandbox):
    with pytest.raises(ValueError, match="max_action_chars must be >= 1"):
        _env(sandbox, max_action_chars=0)
