"""CodeVisionEnv: the Gymnasium contract, the tool protocol, and rewards paid step by step."""

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from PIL import Image, ImageDraw

import cv_env
from cv_env import Task
from cv_env.sandbox import Sandbox


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0) as shared:
        yield shared


def _call(code, image_index=0):
    arguments = {"code": code, "description": "", "image_index": image_index}
    return f"<think>use the tool</think>\n<tool_call>\n{json.dumps({'name': 'code_image_tool', 'arguments': arguments})}\n</tool_call>"


def _answer(text):
    return f"<think>done</think>\n<answer>{text}</answer>"


def _rotated_task(transforms=("rotate_90",), bbox=None, answer="7"):
    image = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(image).rectangle((4, 4, 20, 30), fill="black")
    for t in transforms:
        if t.startswith("rotate_"):
            image = image.rotate(int(t.split("_")[1]), expand=True)
    return Task(id="t0", images=[image], question="What number?", answer=answer, answer_type="number",
                category="unit", transforms=list(transforms), bbox=bbox)


def make_env(sandbox, **kwargs):
    kwargs.setdefault("tasks", [_rotated_task()])
    return gym.make("CodeVision-v0", sandbox=sandbox, **kwargs)


def test_registered_and_passes_check_env(sandbox):
    assert cv_env.ENV_ID in gym.registry
    env = make_env(sandbox, tasks="synthetic")
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def test_reset_is_deterministic_per_seed(sandbox):
    env = make_env(sandbox, tasks="synthetic")
    a = env.reset(seed=3)
    b = env.reset(seed=3)
    assert a[1]["task_id"] == b[1]["task_id"] and a[0]["text"] == b[0]["text"]
    assert all((x == y).all() for x, y in zip(a[0]["images"], b[0]["images"]))
    assert "answer" not in a[1] and "ground_truth" not in a[1]


def test_fixing_the_orientation_and_answering_pays_the_full_reward(sandbox):
    env = make_env(sandbox)
    obs, info = env.reset(seed=0)
    assert obs["role"] == "user" and len(obs["images"]) == 1
    obs, reward, terminated, truncated, info = env.step(_call("result = image.rotate(270, expand=True)"))
    # the task image is 64x48 shown rotated by 90 (48x64); undoing it gives 64x48 again
    assert obs["role"] == "tool" and "Image 1 created: 64x48 pixels" in obs["text"]
    assert obs["images"][0].shape == (48, 64, 3)
    assert (reward, terminated, truncated) == (0.0, False, False)
    obs, reward, terminated, truncated, info = env.step(_answer("7"))
    assert terminated and not truncated and info["correct"]
    components = info["reward_components"]
    assert components["acc"] == 1 and components["fmt"] == 1 and components["mandatory"] == 1
    assert components["exact"] == pytest.approx(0.1) and components["spurious"] == 0
    assert reward == pytest.approx(components["total"])
    messages = env.unwrapped.messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_step_rewards_sum_to_the_episode_total(sandbox):
    env = make_env(sandbox)
    env.reset(seed=0)
    rewards = [env.step(_call("result = image.rotate("))[1],  # syntax error: a failed call
               env.step(_call("result = image.rotate(270, expand=True)"))[1]]
    assert rewards[0] < 0  # the failed call is penalised when it happens
    _, last, _, _, info = env.step(_answer("7"))
    assert sum(rewards) + last == pytest.approx(info["reward_components"]["total"])
    assert info["n_failed"] == 1 and info["n_calls"] == 2


def test_failed_code_is_an_observation_the_model_can_read(sandbox):
    env = make_env(sandbox)
    env.reset(seed=0)
    obs, *_ = env.step(_call("result = image.does_not_exist()"))
    assert obs["role"] == "tool" and obs["text"].startswith("Error:") and obs["images"] == ()
    obs, *_ = env.step(_call("result = image", image_index=5))
    assert "image_index 5 is out of range: this episode has images 0..0" in obs["text"]
    obs, *_ = env.step('<tool_call>{"name": "code_image_tool", "arguments": {"code": </tool_call>')
    assert "not valid JSON" in obs["text"]


def test_a_comment_or_description_saying_crop_is_not_a_crop(sandbox):
    task = _rotated_task(transforms=("crop",), bbox=[4, 4, 21, 31])
    env = make_env(sandbox, tasks=[task])
    env.reset(seed=0)
    code = "# crop the digit\nresult = image  # crop"
    env.step("<think>crop</think><tool_call>" + json.dumps(
        {"name": "code_image_tool", "arguments": {"code": code, "description": "crop to the digit"}}) + "</tool_call>")
    *_, info = env.step(_answer("7"))
    assert info["reward_components"]["mandatory"] == 0


def test_crop_on_a_rotated_copy_is_scored_in_the_bbox_frame(sandbox):
    task = _rotated_task(transforms=("rotate_90", "crop"), bbox=None)
    # The black rectangle (4..21, 4..31) of the original, as shown after rotate_90 (64x48 -> 48x64):
    shown_box = cv_env.Frame.identity((64, 48)).rotate(90).box_from_source([4, 4, 21, 31])
    task.bbox = shown_box
    env = make_env(sandbox, tasks=[task])
    env.reset(seed=0)
    env.step(_call("result = image.rotate(270, expand=True)"))  # image 1 = the original orientation
    env.step(_call("result = image.crop((4, 4, 21, 31))", image_index=1))
    *_, info = env.step(_answer("7"))
    assert info["reward_components"]["mandatory"] == pytest.approx(1.0)


def test_turn_limit_truncates_and_pays_what_is_left(sandbox):
    env = make_env(sandbox, max_turns=2)
    env.reset(seed=0)
    env.step(_call("result = image"))
    obs, reward, terminated, truncated, info = env.step(_call("result = image"))
    assert truncated and not terminated and not info["correct"]
    assert "reward_components" in info and info["truncation"] == "max_turns"


def test_end_episode_settles_a_running_episode_as_truncated(sandbox):
    """The public way an agent stops an episode for its own reasons (a rollout's token budget)."""
    env = make_env(sandbox, max_turns=4)
    env.reset(seed=0)
    _, paid, *_ = env.step(_call("result = image.rotate(270, expand=True)"))
    obs, reward, terminated, truncated, info = env.step(cv_env.EndEpisode("token_budget"))
    assert truncated and not terminated and info["truncation"] == "token_budget" and not info["correct"]
    assert obs["text"] == "" and obs["images"] == ()
    assert paid + reward == pytest.approx(info["reward_components"]["total"])  # the rest of the episode's reward
    assert info["turn"] == 1 and len(env.unwrapped.messages) == 4  # no turn was added
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(cv_env.EndEpisode())


def test_no_info_leaks_the_answer(sandbox):
    """DESIGN: nothing in an observation or info leaks the answer (the caller has the task)."""
    env = make_env(sandbox, tasks=[_rotated_task(answer="XQ-417")])
    _, info = env.reset(seed=0)
    infos = [info]
    for action in (_call("result = image.rotate(270, expand=True)"), _answer("wrong")):
        obs, *_, info = env.step(action)
        infos.append(info)
        assert "XQ-417" not in obs["text"]
    assert not any("XQ-417" in repr(i) for i in infos) and not any("ground_truth" in i for i in infos)


def test_a_turn_without_call_or_answer_ends_the_episode_with_format_zero(sandbox):
    env = make_env(sandbox)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step("The answer is 7")
    assert terminated and info["answer"] == "7" and info["correct"]
    assert info["reward_components"]["fmt"] == 0


def test_misuse_raises_clear_errors(sandbox):
    env = make_env(sandbox)
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.step(_answer("7"))
    env.reset(seed=0)
    with pytest.raises(TypeError, match="must be a str"):
        env.step(42)
    env.step(_answer("7"))
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(_answer("7"))


def test_prompt_presets_choose_the_system_message_and_the_tools_listed(sandbox):
    from cv_env.protocol import COMPACT_SYSTEM_PROMPT, SYSTEM_PROMPT, TOOL_SCHEMA

    for prompt, system, tools in (("full", SYSTEM_PROMPT, [TOOL_SCHEMA]), ("compact", COMPACT_SYSTEM_PROMPT, [])):
        env = make_env(sandbox, prompt=prompt)
        env.reset(seed=0)
        _, info = env.reset(seed=0)
        assert env.unwrapped.messages[0]["content"][0]["text"] == system and env.unwrapped.tools == tools
        assert info["system_prompt"] == system and info["tools"] == tools  # what a chat agent opens with
        obs, _, terminated, _, _ = env.step(_call("result = image.rotate(-90, expand=True)"))
        assert not terminated and obs["role"] == "tool" and len(obs["images"]) == 1  # the same tool protocol
    env = make_env(sandbox, prompt="compact", system_prompt="Be brief.")
    env.reset(seed=0)
    assert env.unwrapped.messages[0]["content"][0]["text"] == "Be brief." and env.unwrapped.tools == []
    with pytest.raises(ValueError, match="unknown prompt 'short': use one of full, compact"):
        make_env(sandbox, prompt="short")


def test_large_images_are_shown_downscaled_but_code_runs_on_full_resolution(sandbox):
    big = Image.new("RGB", (400, 300), "gray")
    env = make_env(sandbox, tasks=[Task(id="big", images=[big], question="q", answer="a")], max_pixels=100 * 75)
    obs, _ = env.reset(seed=0)
    assert obs["images"][0].shape == (75, 100, 3) and "400x300 pixels (shown at 100x75)" in obs["text"]
    obs, *_ = env.step(_call("result = image.crop((0, 0, 200, 150))"))
    assert "200x150 pixels" in obs["text"] and obs["images"][0].shape[0] * obs["images"][0].shape[1] <= 100 * 75


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs(mode):
    envs = gym.make_vec("CodeVision-v0", num_envs=2, vectorization_mode=mode, tasks="synthetic",
                        sandbox={"workers": 1})
    obs, info = envs.reset(seed=0)
    assert len(obs["text"]) == 2 and len(obs["images"]) == 2
    obs, rewards, terminated, truncated, info = envs.step((_call("result = image"), _answer("x")))
    assert terminated.tolist() == [False, True]
    assert obs["images"][0][0].dtype == np.uint8
    envs.close()


def test_a_thousand_random_episodes_run_without_an_exception(sandbox):
    """Random turns (good, useless, failing, hostile and malformed) across the whole suite."""
    from agents.scripted import RandomAgent

    env = gym.make("CodeVision-v0", tasks="synthetic", sandbox=sandbox, max_turns=4, max_pixels=256 * 256)
    ended = 0
    for seed in range(1000):
        agent = RandomAgent(seed=seed)
        obs, _ = env.reset(seed=seed)
        agent.reset(env.unwrapped.task)
        paid, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(agent.act(obs))
            paid += reward
            done = terminated or truncated
        assert paid == pytest.approx(info["reward_components"]["total"])
        assert env.observation_space.contains(obs)
        ended += 1
    assert ended == 1000


def test_every_step_names_every_reward_term():
    """DESIGN.md: info["reward_components"] always shows every term by name; a tool step's
    terms are its own (0 but the call's penalty), the final step's the episode's."""
    from cv_env.reward import TERMS

    env = gym.make("CodeVision-v0", tasks="synthetic", disable_env_checker=True)
    env.reset(seed=3)
    paid = 0.0
    for action in ({"code": "result = image.rotate(90, expand=True)"}, {"code": "x = 1 / 0"}, {"code": "print(1)"},
                   "<think>done</think><answer>a</answer>"):
        _, reward, terminated, truncated, info = env.step(action)
        assert tuple(info["reward_components"]) == TERMS
        paid += reward
        if not (terminated or truncated):
            assert info["reward_components"]["total"] == reward == info["reward_components"]["exec_fail"]
    assert abs(paid - info["reward_components"]["total"]) < 1e-9
    env.close()


def test_text_spaces_share_their_charset_tables_and_keep_their_own_seeds():
    """Text's tables over the 55k-character charset are built once, not per space (gym.make
    built them several times per env); each space still samples from its own generator."""
    from cv_env.spaces import MessageText, text_charset

    a, b = MessageText(32), MessageText(64, seed=1)
    assert a.character_set is b.character_set and a.characters == text_charset()
    assert a.character_index("é") == text_charset().index("é")
    assert a.contains("résultat = 1\n\t") and not a.contains("\x00") and not a.contains("x" * 33)
    a.seed(7)
    b.sample()  # another space's draws do not move this one's generator
    first = a.sample()
    a.seed(7)
    assert a.sample() == first == MessageText(32, seed=7).sample()
    assert MessageText(16, charset="ab").contains("abba") and not MessageText(16, charset="ab").contains("abc")
