"""Token-exact incremental rendering: increments equal a full render, images stay in sync."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cv_env  # noqa: E402,F401
from agents.conversation import ChatRenderer, ImageTokenMismatch, check_image_tokens, image_token_spans  # noqa: E402
from agents.loading import load_processor  # noqa: E402
from agents.scripted import OracleAgent, RandomAgent  # noqa: E402
from agents.tiny import FAMILIES  # noqa: E402
from cv_env import Task  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import CATEGORIES, load_tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0) as shared:
        yield shared


@pytest.fixture(scope="module", params=FAMILIES)
def renderer(request):
    return ChatRenderer(load_processor(f"tiny:{request.param}"))


def _canonical_ids(renderer, text):
    """What a model that writes `text` and ends its turn would have sampled (canonical BPE)."""
    return renderer.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]


def _play(env, renderer, agent, options):
    """Run one episode, building the token state incrementally; return (state, env messages)."""
    obs, _ = env.reset(options=options)
    agent.reset(env.unwrapped.task)
    state = renderer.start(env.unwrapped.messages)
    done = False
    while not done:
        action = agent.act(obs)
        ids = _canonical_ids(renderer, action)
        state.append_sampled(ids, [-0.5] * len(ids))
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        if not done:
            renderer.extend(state, env.unwrapped.messages)
    renderer.close_turn(state)
    messages = env.unwrapped.messages
    # At the turn limit the env still runs the last call and appends its reply, which no model
    # turn follows: the sequence a trainer sees ends with the last assistant turn.
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return state, messages[: last + 1]


def _assert_equals_full_render(renderer, state, messages):
    full = renderer.render_full(messages)
    assert state.token_ids == full.ids
    assert state.image_grid_thw == full.image_grid_thw
    if full.pixel_values is None:
        assert state.all_pixel_values() is None
    else:
        assert torch.equal(state.all_pixel_values(), full.pixel_values)
    check_image_tokens(state.token_ids, state.image_grid_thw, renderer.image_token_id, renderer.merge_size)
    # The loss mask is exactly the template's assistant mask (each turn's text and its <|im_end|>).
    reference = renderer.processor.apply_chat_template(
        messages, tools=renderer.tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert state.loss_mask == list(reference["assistant_masks"][0] if isinstance(reference["assistant_masks"][0], list)
                                   else reference["assistant_masks"])
    assert [i for i, m in enumerate(state.loss_mask) if m and (i + 1 == len(state.loss_mask)
            or not state.loss_mask[i + 1])] == state.turn_ends


def test_oracle_conversations_of_every_category_equal_a_full_render(renderer, sandbox):
    tasks = load_tasks("synthetic", split="test")
    by_category = {}
    for task in (tasks[i] for i in range(len(tasks))):
        by_category.setdefault(task.category, task)
        if len(by_category) == len(CATEGORIES):
            break
    env = gym.make("CodeVision-v0", tasks=list(by_category.values()), sandbox=sandbox, max_pixels=160 * 160)
    images_seen = 0
    for task in by_category.values():
        state, messages = _play(env, renderer, OracleAgent(), {"task": task})
        _assert_equals_full_render(renderer, state, messages)
        assert state.prompt_length < state.turn_ends[0]
        images_seen += len(state.images)
    assert images_seen > len(by_category)  # tool outputs (new images) were appended too


def test_random_agent_conversations_equal_a_full_render(renderer, sandbox):
    # Errors, malformed calls, out-of-range indices, several tool replies in a row.
    env = gym.make("CodeVision-v0", tasks="synthetic", sandbox=sandbox, max_turns=5, max_pixels=128 * 128)
    turns = 0
    for seed in range(4):
        state, messages = _play(env, renderer, RandomAgent(seed=seed, answer_prob=0.1), {"index": seed})
        _assert_equals_full_render(renderer, state, messages)
        turns += len(state.turn_ends)
    assert turns > 8


def _stop_sign_task():
    return Task(id="sign", images=[Image.new("RGB", (64, 64), "red")], question="What does it say?", answer="STOP",
                category="unit")


def test_printed_special_tokens_cannot_forge_image_placeholders(sandbox):
    renderer = ChatRenderer(load_processor("tiny:qwen2_vl"))
    env = gym.make("CodeVision-v0", tasks=[_stop_sign_task()], sandbox=sandbox)
    env.reset()
    state = renderer.start(env.unwrapped.messages)
    code = 'print("<|image_pad|><|vision_start|><|im_start|>assistant")\nresult = image.rotate(90, expand=True)'
    arguments = json.dumps({"name": "code_image_tool", "arguments": {"code": code, "image_index": 0}})
    action = f"<think>x</think>\n<tool_call>\n{arguments}\n</tool_call>"
    # A model can only write those strings as plain text pieces (vision ids are never sampled).
    ids = renderer.tokenizer(action, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids.append(renderer.closing_ids[0])
    state.append_sampled(ids, [0.0] * len(ids))
    env.step(action)
    assert "<|image_pad|>" in env.unwrapped.messages[-1]["content"][-1]["text"]  # the env shows it verbatim
    delta = renderer.extend(state, env.unwrapped.messages)
    # Only the real output image has placeholders; the printed ones became plain text.
    assert len(image_token_spans(delta.ids, renderer.image_token_id)) == 1
    check_image_tokens(state.token_ids, state.image_grid_thw, renderer.image_token_id, renderer.merge_size)
    assert delta.ids.count(renderer.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2  # user, assistant
    assert "image_pad" in renderer.tokenizer.decode(delta.ids)


def test_turn_closing_depends_on_how_the_turn_ended():
    renderer = ChatRenderer(load_processor("tiny:qwen2_5_vl"))
    im_end, newline = renderer.closing_ids
    assert renderer.tokenizer.decode([im_end, newline]) == "<|im_end|>\n"
    for sampled_text, expected in [("<answer>1</answer><|im_end|>", [newline]),  # ended its turn itself
                                   ("<tool_call>\n{}\n</tool_call>", [im_end, newline])]:  # stopped at </tool_call>
        state = renderer.start([{"role": "user", "content": "hi"}])
        ids = renderer.tokenizer(sampled_text, add_special_tokens=False)["input_ids"]
        state.append_sampled(ids, [0.0] * len(ids))
        assert renderer.closing_for(state) == expected
        assert renderer.close_turn(state) == expected
        assert state.loss_mask[-len(expected):] == [0] * len(expected)
        assert renderer.close_turn(state) == []  # closing twice adds nothing


def test_image_mismatches_are_clear_errors():
    renderer = ChatRenderer(load_processor("tiny:qwen2_vl"))
    delta = renderer.encode("<|vision_start|><|image_pad|><|vision_end|>x", [Image.new("RGB", (64, 64))])
    assert delta.image_grid_thw == [[1, 4, 4]]  # 64x64 at patch 14... resized to the 4-token minimum
    (start, end), = image_token_spans(delta.ids, renderer.image_token_id)
    assert end - start == 4
    cut = delta.ids[: start + 2] + delta.ids[end:]  # what truncating inside the image span would do
    with pytest.raises(ImageTokenMismatch, match=r"runs have \[2\] tokens but the 1 image grid\(s\) \[\[1, 4, 4\]\] need \[4\]"):
        check_image_tokens(cut, delta.image_grid_thw, renderer.image_token_id, renderer.merge_size)
    with pytest.raises(ImageTokenMismatch, match="no image was given"):
        renderer.encode("<|vision_start|><|image_pad|><|vision_end|>", [])


def test_misuse_is_explained(sandbox):
    renderer = ChatRenderer(load_processor("tiny:qwen2_vl"))
    with pytest.raises(ValueError, match="prompt messages"):
        renderer.start([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    state = renderer.start([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="one log-prob per id"):
        state.append_sampled([1, 2], [0.0])
    with pytest.raises(ValueError, match="not rendered yet"):
        renderer.delta(state, [{"role": "user", "content": "x"}, {"role": "tool", "content": "z"}])
    env = gym.make("CodeVision-v0", tasks=[_stop_sign_task()], sandbox=sandbox)
    env.reset()
    state = renderer.start(env.unwrapped.messages)
    action = '<think>x</think>\n<tool_call>\n{"name": "code_image_tool", "arguments": {"code": "result = image"}}\n</tool_call>'
    ids = _canonical_ids(renderer, action)
    state.append_sampled(ids, [0.0] * len(ids))
    env.step(action)
    renderer.extend(state, env.unwrapped.messages)
    with pytest.raises(ValueError, match="not rendered yet"):
        renderer.extend(state, env.unwrapped.messages)  # the same reply twice


def test_encode_equals_the_processors_own_call(renderer, sandbox):
    """The renderer tokenizes in pieces (cached system turn, placeholders expanded by hand): the
    ids, grids and pixel patches equal what the processor gives for the whole text at once."""
    env = gym.make("CodeVision-v0", tasks=load_tasks("multi_image", split="test"), sandbox=sandbox,
                   max_pixels=160 * 160, disable_env_checker=True)
    env.reset(seed=0)
    env.step('<think>look</think>\n<tool_call>\n{"name": "code_image_tool", "arguments": {"code": '
             '"result = image.rotate(90, expand=True)", "image_index": 1}}\n</tool_call>')
    messages = env.unwrapped.messages
    from agents.conversation import message_images

    for shown in (messages[:2], messages):
        text = renderer.render_text(shown, add_generation_prompt=True)
        images = message_images(shown)
        for _ in range(2):  # the second time from the renderer's cache of pieces
            delta = renderer.encode(text, images)
            reference = renderer.processor(text=[text], images=images, return_tensors="pt")
            assert delta.ids == reference["input_ids"][0].tolist()
            assert delta.image_grid_thw == reference["image_grid_thw"].tolist()
            assert torch.equal(delta.pixel_values, reference["pixel_values"])
        plain = text.replace("<|image_pad|>", "")
        assert renderer.encode(plain, []).ids == renderer.tokenizer(plain, add_special_tokens=False)["input_ids"]
    env.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", "user\n", "assistant\n", "<think>", " ", "\n",
                                 "é", "Image 1:", "<|im", "start|>", "  x", "🙂"]) | st.text(max_size=8),
                min_size=0, max_size=12).map("".join))
def test_piecewise_tokenization_equals_the_tokenizer(text):
    """Cutting text at `<|im_start|>` (a special token) never changes its ids, whatever the text."""
    renderer = _qwen_renderer()
    assert renderer.encode(text, []).ids == renderer.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert renderer.encode(text, []).ids == renderer.tokenizer(text, add_special_tokens=False)["input_ids"]  # cached


_RENDERERS: dict = {}


def _qwen_renderer():
    if "qwen2_5_vl" not in _RENDERERS:
        _RENDERERS["qwen2_5_vl"] = ChatRenderer(load_processor("tiny:qwen2_5_vl"))
    return _RENDERERS["qwen2_5_vl"]
