"""Turn parsing: every model slip becomes a readable Turn, never an exception."""

import json

import pytest

from cv_env.protocol import TOOL_SCHEMA, parse_action, parse_turn, render_tool_call


def _call(arguments, name="code_image_tool"):
    return f"<think>look</think>\n<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_hermes_tool_call_with_object_arguments():
    turn = parse_turn(_call({"code": "result = image.rotate(90, expand=True)", "image_index": 1, "description": "fix"}))
    assert (turn.kind, turn.image_index, turn.description) == ("tool_call", 1, "fix")
    assert turn.code == "result = image.rotate(90, expand=True)"


def test_arguments_as_json_string_and_default_index():
    turn = parse_turn(_call(json.dumps({"code": "result = image"})))
    assert (turn.kind, turn.code, turn.image_index) == ("tool_call", "result = image", 0)


def test_raw_newlines_inside_code_string_are_accepted():
    text = '<tool_call>{"name": "code_image_tool", "arguments": {"code": "x = 1\nresult = image"}}</tool_call>'
    turn = parse_turn(text)
    assert turn.kind == "tool_call" and turn.code == "x = 1\nresult = image"


def test_fenced_python_block_is_a_tool_call():
    turn = parse_turn("<think>crop it</think>\n```python\nresult = image.crop((0, 0, 10, 10))\n```")
    assert turn.kind == "tool_call" and turn.code == "result = image.crop((0, 0, 10, 10))\n"


def test_fenced_block_inside_tool_call_tags():
    turn = parse_turn("<tool_call>```python\nresult = image\n```</tool_call>")
    assert turn.kind == "tool_call" and turn.code == "result = image\n"


def test_broken_json_is_an_invalid_turn_with_a_readable_error():
    turn = parse_turn('<tool_call>{"name": "code_image_tool", "arguments": {"code": </tool_call>')
    assert turn.kind == "invalid" and "not valid JSON" in turn.error


@pytest.mark.parametrize("arguments, message", [
    ({"image_index": 0}, "no \"code\""),
    ({"code": "result = image", "image_index": "two"}, "must be an integer"),
    ({"code": "   "}, "no \"code\""),
])
def test_bad_arguments_explain_themselves(arguments, message):
    turn = parse_turn(_call(arguments))
    assert turn.kind == "invalid" and message in turn.error


def test_unknown_tool_name():
    turn = parse_turn(_call({"code": "result = image"}, name="python"))
    assert turn.kind == "invalid" and "unknown tool 'python'" in turn.error


def test_only_the_first_of_two_calls_runs_and_the_note_says_so():
    text = _call({"code": "a = 1\nresult = image"}) + _call({"code": "b = 2\nresult = image"})
    turn = parse_turn(text)
    assert turn.kind == "tool_call" and turn.code.startswith("a = 1")
    assert any("only one tool call" in note for note in turn.notes)


def test_answer_and_tool_call_in_one_turn_runs_the_call():
    turn = parse_turn(_call({"code": "result = image"}) + "<answer>B</answer>")
    assert turn.kind == "tool_call" and any("<answer>" in note for note in turn.notes)


def test_answer_takes_the_last_block():
    assert parse_turn("<think>x</think><answer> A </answer><answer>C</answer>").answer == "C"


def test_neither_call_nor_answer():
    assert parse_turn("I think it is a cat.").kind == "invalid"


def test_dict_actions():
    assert parse_action({"answer": 42}).answer == "42"
    turn = parse_action({"code": "result = image", "image_index": 2})
    assert (turn.kind, turn.image_index) == ("tool_call", 2)
    with pytest.raises(TypeError, match="must be a str"):
        parse_action(3)


def test_whatever_is_inside_a_dict_action_is_model_output_not_an_exception():
    turn = parse_action({"code": "result = image", "lang": "py"})
    assert turn.kind == "tool_call" and "unknown key(s) ignored: ['lang']" in turn.notes[0]
    turn = parse_action({"text": "hi", 3: None})
    assert turn.kind == "invalid" and "neither 'code' (a tool call) nor 'answer'" in turn.error
    assert "'text'" in turn.error and "3" in turn.error
    assert parse_action({"code": ["result = image"]}).kind == "invalid"
    turn = parse_action({"code": "result = image", "image_index": 10**5000})  # past int -> str's digit limit
    assert turn.kind == "invalid" and "must be an integer" in turn.error
    assert parse_action({"answer": 10**5000}).kind == "answer"
    turn = parse_action({"code": "result = image", "answer": "B"})
    assert turn.kind == "tool_call" and any("'answer'" in note for note in turn.notes)


def test_rendered_tool_call_parses_back():
    turn = parse_action({"code": 'print("hi")\nresult = image', "image_index": 1, "description": "d"})
    assert parse_turn(render_tool_call(turn)) == turn


def test_schema_names_the_arguments():
    params = TOOL_SCHEMA["function"]["parameters"]["properties"]
    assert set(params) == {"code", "description", "image_index"}
