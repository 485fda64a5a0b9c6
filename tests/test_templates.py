"""Chat-template probing and filling (agents.templates) with the tiny tokenizer: the Hermes fills
equal what a template with tools writes, templates that cannot be extended are refused at load
with the fix, `model.chat_template` overrides, a pre-filled thinking turn is scored whole."""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import cv_env  # noqa: E402,F401
from agents.conversation import ChatRenderer  # noqa: E402
from agents.generation import ScriptedBackend  # noqa: E402
from agents.loading import load_processor  # noqa: E402
from agents.policy import Policy  # noqa: E402
from agents.rollout import RolloutEngine  # noqa: E402
from agents.scripted import ideal_reward  # noqa: E402
from agents.templates import (  # noqa: E402
    TemplateError, after_prefill, fill_messages, probe_template, raw_renderer, resolve_chat_template, tool_call_text,
    tools_block,
)
from agents.tiny import chat_template  # noqa: E402
from algos import sft_data  # noqa: E402
from cv_env import Task  # noqa: E402
from cv_env.protocol import PROMPTS, TOOL_SCHEMA, get_prompt, thinking_prompt  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CALL = {"type": "function", "function": {"name": "code_image_tool", "arguments": {"code": "result = image"}}}
_GENERATION = "{%- if add_generation_prompt -%}\n    {{- '<|im_start|>assistant\\n' -}}"


def _edited(old, new):
    """Our template with `old` replaced by `new` (which must occur in it)."""
    assert old in chat_template()
    return chat_template().replace(old, new)


# Our template, with a generation prompt that opens a think block (as Qwen3-VL-Thinking's does).
THINKING_TEMPLATE = _edited(_GENERATION, _GENERATION + "{{- '<think>\\n' -}}")


@pytest.fixture(scope="module")
def processor():
    return load_processor("tiny:qwen2_5_vl")


def _with_template(processor, template):
    other = copy.deepcopy(processor)
    other.chat_template = template
    return other


def test_the_fills_are_what_a_template_with_tools_writes(processor):
    own = raw_renderer(processor)  # our template has a tools block and renders tool calls
    system = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert own(system, tools=[TOOL_SCHEMA]).startswith("<|im_start|>system\nS\n\n" + tools_block([TOOL_SCHEMA]))
    for arguments in ({"code": "x = 'é'", "image_index": 1}, '{"code": "x"}'):
        calls = [{"type": "function", "function": {"name": "code_image_tool", "arguments": arguments}}] * 2
        text = own([*system, {"role": "assistant", "content": "<think>t</think>", "tool_calls": calls}])
        assert "<think>t</think>\n" + tool_call_text(calls) + "<|im_end|>" in text
    assert tool_call_text([CALL]) == ('<tool_call>\n{"name": "code_image_tool", "arguments": {"code": "result = image"}}'
                                      "\n</tool_call>")


def test_fill_messages_fills_only_what_the_template_lacks(processor):
    support = probe_template(raw_renderer(processor), "\ue000mark\ue001")
    messages = [{"role": "system", "content": [{"type": "text", "text": "S"}]},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": [{"type": "text", "text": "R"}]}]
    filled, tools = fill_messages(messages, support, [TOOL_SCHEMA], "codevision")
    assert tools == [TOOL_SCHEMA] and filled[0] == messages[0]  # the template lists the tools itself
    assert filled[1] == {"role": "assistant", "content": tool_call_text([CALL])}
    assert filled[2]["role"] == "user" and [p["text"] for p in filled[2]["content"]] == [
        "<tool_response>\n", "R", "\n</tool_response>"]
    no_tools = support.__class__(**{**support.__dict__, "tools_block": False, "tool_role": "generic"})
    filled, tools = fill_messages(messages, no_tools, [TOOL_SCHEMA], "default")
    assert tools is None and filled[0]["content"][-1]["text"] == "\n\n" + tools_block([TOOL_SCHEMA])
    assert filled[2] == messages[2]  # "default": the template's own tool role
    filled, _ = fill_messages(messages[1:], no_tools, [TOOL_SCHEMA], "codevision")
    assert filled[0] == {"role": "system", "content": tools_block([TOOL_SCHEMA])}


@pytest.mark.parametrize("text, prefill, expected", [
    ("<think>\nR</think>", "<think>\n", "R</think>"),
    ("<think>R</think>", "<think>\n", "R</think>"),  # other spacing after the same tag
    ("  <think>\n\nR", "<think>\n", "R"),
    ("R</think>", "<think>\n", None),
    ("anything", "", "anything"),
])
def test_after_prefill(text, prefill, expected):
    assert after_prefill(text, prefill) == expected


# Templates that cannot be extended token-exactly, and why.
_SYSTEM = "{{- '<|im_start|>system\\n' -}}"
_CONTENT = "{{- render_content(message.content) -}}\n            {%- for tool_call"
_END = "{{- '<|im_end|>' -}}\n        {%- endgeneration -%}\n        {{- '\\n' -}}"
REFUSED = {
    "counts its messages": (_edited(_SYSTEM, "{{- '<|im_start|>system\\n' ~ (messages | length) -}}"),
                            "re-renders earlier messages"),
    "another header": (_edited(_GENERATION, _GENERATION.replace("assistant", "model")), "does not start with the header"),
    "drops assistant text": (_edited(_CONTENT, "{%- for tool_call"), "does not render the text of an assistant message"),
    "no end of turn": (_edited(_END, "{%- endgeneration -%}"), "writes nothing after an assistant turn"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_template_that_cannot_be_extended_is_refused_at_load_with_the_fix(case, processor, tmp_path):
    template, why = REFUSED[case]
    with pytest.raises(TemplateError, match=why) as error:
        ChatRenderer(_with_template(processor, template))
    assert "model.chat_template=codevision" in str(error.value)
    path = tmp_path / "template.jinja"
    path.write_text(template)
    with pytest.raises(TemplateError, match=why):  # before any weight is read
        Policy.load("tiny:qwen2_5_vl", chat_template=str(path))


def test_model_chat_template_replaces_the_checkpoints_own(processor, tmp_path):
    path = tmp_path / "thinking.jinja"
    path.write_text(THINKING_TEMPLATE)
    assert load_processor("tiny:qwen2_5_vl", chat_template=str(path)).chat_template == THINKING_TEMPLATE
    assert load_processor("tiny:qwen2_5_vl", chat_template="codevision").chat_template == chat_template()
    assert resolve_chat_template("codevision") == chat_template()
    with pytest.raises(FileNotFoundError, match="neither a built-in template \\(codevision\\)"):
        load_processor("tiny:qwen2_5_vl", chat_template="qwen3")
    policy = Policy.load("tiny:qwen2_5_vl", chat_template=str(path), tool_response_format="default")
    assert policy.renderer.prefill == "<think>\n" and policy.renderer.tool_response_format == "default"
    assert policy.processor.chat_template == THINKING_TEMPLATE
    policy.processor.save_pretrained(tmp_path / "saved")  # a folder written after training keeps it
    assert load_processor(tmp_path / "saved").chat_template == THINKING_TEMPLATE


def test_thinking_presets_do_not_ask_for_the_opening_tag():
    for name in ("full", "compact"):
        variant = get_prompt(thinking_prompt(name))
        assert "<think> </think>" in PROMPTS[name].system and "<think> </think>" not in variant.system
        assert "</think>" in variant.system and variant.tools == PROMPTS[name].tools
    assert thinking_prompt("full_thinking") == "full_thinking"
    with pytest.raises(ValueError, match="unknown prompt"):
        thinking_prompt("long")


def test_a_prefilled_thinking_turn_is_parsed_and_paid_as_a_whole(processor):
    thinking = _with_template(processor, THINKING_TEMPLATE)
    task = Task(id="sign", images=[Image.new("RGB", (64, 64), "red")], question="What does it say?", answer="STOP",
                category="unit")

    class Agent:  # writes what a thinking model samples after the pre-filled "<think>\n"
        def reset(self, task):
            pass

        def act(self, observation=None):
            return "It says STOP.</think>\n<answer>STOP</answer>"

    with Sandbox(workers=1) as sandbox, RolloutEngine(ScriptedBackend(thinking, agent_factory=Agent), sandbox=sandbox,
                                                       env_kwargs=dict(max_pixels=64 * 64)) as engine:
        trajectory, = engine.rollout([task])
        assert engine.env_kwargs["prompt"] == "full_thinking"
        env = gym.make("CodeVision-v0", tasks=[task], sandbox=sandbox, **engine.env_kwargs)
        env.reset()
        env.step("<think>\nIt says STOP.</think>\n<answer>STOP</answer>")
        assert trajectory.token_ids == engine.renderer.render_full(env.unwrapped.messages).ids
        env.close()
        # The oracle writes its own "<think>": the pre-fill already did, so its demonstrations still score in full.
        tasks = [load_tasks("synthetic", split="validation")[i] for i in range(3)]
        with RolloutEngine(ScriptedBackend(thinking), sandbox=sandbox, env_kwargs=dict(max_pixels=64 * 64),
                           sampling=dict(max_new_tokens=1024)) as oracle:
            demos = oracle.rollout(tasks)
    assert trajectory.reward_components["fmt"] == 1.0 and trajectory.reward == pytest.approx(1.1)
    assert [d.reward for d in demos] == pytest.approx([ideal_reward(task)["total"] for task in tasks])
    assert all(d.reward_components["fmt"] == 1.0 for d in demos)


def test_sft_refuses_a_record_whose_tool_call_would_not_be_trained(processor, monkeypatch):
    # The regression of issue 18: a template that drops tool_calls trained on "<think>…</think>" alone.
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "content": "<think>rotate</think>", "tool_calls": [CALL]},
                {"role": "tool", "content": "R"}, {"role": "assistant", "content": "<answer>1</answer>"}]
    renderer = ChatRenderer(processor)
    assert sft_data.tokenize_conversation(renderer, messages).num_tool_calls == 1
    monkeypatch.setattr(sft_data, "tool_call_text", lambda calls: "")
    with pytest.raises(ValueError, match=r"holds 1 tool call\(s\) but trains on 0"):
        sft_data.tokenize_conversation(renderer, messages)
