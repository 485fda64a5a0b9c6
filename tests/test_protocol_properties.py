"""Properties of turn parsing over generated model output, and the linear time it takes.

Whatever a model writes, `parse_turn` / `parse_action` return a `Turn` the env can act on (never
an exception), `cv_env.tags.blocks` finds exactly the blocks the regular expression would, and
parsing, answer extraction, answer checking and the format reward take time linear in the
text's length (issue 17: 5 MB of `<answer>` tags did not parse in 45 s). The linear-time tests
use sizes where the old quadratic code takes hours: they would fail by pytest-timeout.
"""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cv_env.answers import check_answer, extract_answer
from cv_env.protocol import Turn, parse_action, parse_turn
from cv_env.reward import format_reward
from cv_env.tags import blocks
from model_outputs import DICT_ACTIONS, PIECE, TURNS, examples


def _check_turn(turn: Turn) -> None:
    assert isinstance(turn, Turn) and turn.kind in ("tool_call", "answer", "invalid")
    assert all(isinstance(note, str) for note in turn.notes)
    if turn.kind == "tool_call":
        assert isinstance(turn.code, str) and turn.code.strip()
        assert type(turn.image_index) is int and abs(turn.image_index) <= 10**9
        assert isinstance(turn.description, str)
    elif turn.kind == "answer":
        assert isinstance(turn.answer, str)
    else:
        assert isinstance(turn.error, str) and turn.error


@examples(default=300, slow=5000)
def test_any_string_turn_parses_into_a_turn(max_examples):
    @settings(max_examples=max_examples)
    @given(TURNS)
    def check(text):
        _check_turn(parse_turn(text))
        extract_answer(text)  # the env's fallback for a turn without a call or an answer
        format_reward([text])

    check()


@examples(default=200, slow=3000)
def test_any_dict_action_parses_into_a_turn(max_examples):
    @settings(max_examples=max_examples)
    @given(DICT_ACTIONS)
    def check(action):
        _check_turn(parse_action(action))

    check()


@examples(default=300, slow=5000)
def test_blocks_are_the_regular_expressions_blocks(max_examples):
    @settings(max_examples=max_examples)
    @given(st.lists(st.one_of(PIECE.filter(lambda p: len(p) < 300), st.sampled_from(["<Answer>", "</ANSWER>"])),
                    max_size=8).map("".join))
    def check(text):
        assert blocks(text, "answer") == re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        assert blocks(text, "answer", ignore_case=True) == re.findall(r"<answer>(.*?)</answer>", text,
                                                                     re.DOTALL | re.IGNORECASE)
        assert blocks(text, "tool_call", open_ended=True) == re.findall(r"<tool_call>(.*?)(?:</tool_call>|\Z)", text,
                                                                        re.DOTALL)

    check()


# -- linear time (issue 17) ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_megabytes_of_answer_tags_parse_in_linear_time():
    spam = "<answer>" * 700_000  # 5.6 MB; the quadratic parse took 4 s at 64 KB, hours here
    assert parse_turn(spam).kind == "invalid"
    assert parse_turn(spam + "x</answer>").answer.endswith("x")
    assert parse_turn("<tool_call>" * 500_000).kind == "invalid"
    assert parse_turn("```python\nresult = image\n" * 300_000).kind == "tool_call"
    assert extract_answer("<answer>x</answer" * 300_000) is not None


@pytest.mark.timeout(60)
def test_answer_extraction_and_checks_are_linear_in_long_whitespace():
    spaces = " " * 2_000_000
    assert extract_answer("answer: x" + spaces + "y") == "x" + spaces + "y"
    # choice and math checks: patterns like `\s*:?\s*` were quadratic (or worse) in a run of spaces
    assert not check_answer("answer" + spaces + "x", "B", "choice")
    assert not check_answer(spaces + "x", "1", "math")
    assert not check_answer("1" + spaces + "x", "2", "number")
    assert check_answer(" 7 " + spaces, "7", "number")


@pytest.mark.timeout(60)
def test_the_format_reward_is_linear_in_the_number_of_tags():
    assert format_reward(["<think></think>" * 300_000 + "<answer>A</answer>"]) == 1.0
    assert format_reward(["<think>" + "</think>" * 300_000]) == 0.0


def test_parse_errors_inside_the_json_are_readable():
    deep = parse_turn("<tool_call>" + "[" * 100_000 + "</tool_call>")
    assert deep.kind == "invalid" and "nested too deeply" in deep.error
    big = parse_turn('<tool_call>{"arguments": {"code": "x", "image_index": ' + "1" * 5000 + "}}</tool_call>")
    assert big.kind == "invalid" and "not valid JSON" in big.error
    unicode_digit = parse_turn('<tool_call>{"arguments": {"code": "x", "image_index": "²"}}</tool_call>')
    assert unicode_digit.kind == "invalid" and "must be an integer" in unicode_digit.error
