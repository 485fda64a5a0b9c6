"""The release's answer and format rules (cv_env.release_rules), case by case, worked out by hand
from the release's `recipe/codevision/reward.py` and its `uvtr` reward manager."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cv_env.release_rules import TOOL_REPLY_GAP, answers_equivalent, extract_answer, format_reward, response_text

GAP = TOOL_REPLY_GAP


def test_the_response_is_the_turns_with_tool_replies_between():
    assert response_text(["a", "b", "c"]) == "a" + GAP + "b" + GAP + "c"
    assert response_text(["only"]) == "only"
    assert GAP == "user\n<tool_response>\n\n</tool_response>\nassistant\n"


@pytest.mark.parametrize("response, answer", [
    ("<think>x</think><answer> 7 </answer>", "7"),
    ("<answer>1</answer>" + GAP + "<answer>2</answer>", "2"),  # the last block
    ("<answer>1</answer>" + GAP + "no block here", "1"),  # an early block still counts
    ("<think>x</think><answer>unclosed 5", "unclosed 5"),  # after the last <answer>
    ("<tool_response><answer>9</answer></tool_response>final line", "final line"),  # tool replies removed
    ("<think>x</think>\nline one\n  line two  ", "line two"),  # the last line
    ("<tool_call>\n{}\n</tool_call>", "</tool_call>"),
    ("", None),
    ("   \n  ", None),
    ("\n".join(["x"] * 500), None),  # 500 lines or more: no answer
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


@pytest.mark.parametrize("prediction, truth, verdict", [
    ("7", "7", True), ("7.0", "7", True), ("07", "7", True), (" 7 ", "7", True),  # floats
    ("It is 7 apples", "7", True), ("7 or 8", "7", False), ("seven", "7", False),  # the last number
    ("6.99995", "7", True), ("6.9", "7", False), ("-3", "-3.0", True), ("x^2", "2", True),
    ("0.75", "3/4", True), ("3/4", "0.75", False),  # "3/4" is no float: its last number is 4
    ("B", "B", True), ("(b)", "B", True), ("The answer is B.", "B", True), ("A or B", "B", True),
    ("B or A", "B", False), ("bee", "B", False), ("b", "b", True), ("E", "E", True), ("e", "E", False),
    ("Park", "park.", False), ("park.", "park.", True), ("stop", "STOP", False), ("park", " park", False),
    ("inf", "inf", True),  # equal as floats
    ("nan", "nan", True),  # unequal as floats, but printed back as a float it is the string "nan"
    ("1/0", "0", True),  # no float: its last number is 0
    ("", "7", False), (None, "7", False), ("7", None, False),
])
def test_rule_check(prediction, truth, verdict):
    assert answers_equivalent(prediction, truth) is verdict


@pytest.mark.parametrize("response, fmt", [
    ("<think>a</think><answer>x</answer>", 1.0),
    ("<think>a</think><tool_call>{}</tool_call>" + GAP + "<answer>x</answer>\n", 1.0),  # later turns may skip <think>
    ("  <think>a</think>\n<answer>x</answer>  ", 1.0),
    ("<think><think>a</think></think><answer>x</answer>", 1.0),  # nesting is only counted
    ("<answer>x</answer>", 0.0),  # does not open with <think>
    ("<think>a<answer>x</answer>", 0.0),  # unequal tags
    ("<think>a</think><answer>x</answer><answer>y</answer>", 0.0),  # two answers
    ("<think>a</think><answer>x</answer> thanks", 0.0),  # not at the end
    ("<think>a</think>no answer", 0.0),
    ("<think>a <answer>x</answer> b</think><think>c</think>", 0.0),
    ("<think>a</think><tool_response><answer>9</answer></tool_response><answer>x</answer>", 1.0),
    ("<think>a</think><think>b <answer>x</answer></think>", 0.0),  # not at the end either
    ("<think>b <answer>x </think> y</answer>", 0.0),  # the answer opens inside a think block
])
def test_format(response, fmt):
    assert format_reward(response) == fmt


@given(st.text(max_size=300), st.text(max_size=20))
def test_model_output_never_breaks_the_rules(text, truth):
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    assert answers_equivalent(answer, truth) in (True, False)
    assert format_reward(text) in (0.0, 1.0)
