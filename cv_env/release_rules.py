"""The CodeVision release's own answer and format rules (used by the `codevision_release` preset).

The release scores an episode on its *response*: every assistant turn as decoded text, with the
tool replies between them. Its rules, restated here from the release's reward code
(`recipe/codevision/reward.py`, the `uvtr` reward manager's format check):

* the answer is the last `<answer>…</answer>` of the response (tool replies removed), else the
  text after the last `<answer>`, else the last line;
* the rule check is strict: equal as floats, or as strings; else one token read from the answer
  (the last standalone letter A–D when the truth is such a letter, otherwise the answer as a
  float or its last number) must equal the truth (case-insensitive) or lie within 1e-4 of it as
  a fraction. What it rejects goes to the LLM judge when one is configured ('Park' vs 'park.');
* the format holds when the response opens with `<think>`, has as many `</think>` as `<think>`
  (at least one), exactly one `<answer>…</answer>`, at its very end, and that answer does not
  sit inside a think block that opens before it.

`cv_env.answers` and `cv_env.reward.format_reward` are the lenient, per-turn versions of the
`codevision` preset. README ("The two reward presets") lists every difference and its reason.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

__all__ = ["TOOL_REPLY_GAP", "response_text", "extract_answer", "rule_token", "answers_equivalent", "format_reward"]

# What separates two assistant turns in the release's decoded response: the tool reply as Qwen's
# template renders it, with the chat markers (special tokens) dropped by the decoder. Its text is
# left empty: both rules delete every <tool_response> block before they read the response.
TOOL_REPLY_GAP = "user\n<tool_response>\n\n</tool_response>\nassistant\n"
CHOICE_LETTERS = ("A", "B", "C", "D")
TOLERANCE = 1e-4  # how far a fraction may lie from the truth

_TOOL_REPLY = re.compile(r"<tool_response>.*?</tool_response>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LETTER = re.compile(r"\b([A-D])\b")
_NUMBER = re.compile(r"[-+]?\d*\.?\d+")
_ANSWER_AT_END = re.compile(r"<answer>.*?</answer>\s*$", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_THEN_ANSWER = re.compile(r"<think>.*?<answer>", re.DOTALL)


def response_text(assistant_turns: Sequence[str]) -> str:
    """The episode as the release's trainer decodes it: the turns, tool replies between them.

    A tool call in the last turn gets no reply: the release ends the episode before running it.
    """
    return TOOL_REPLY_GAP.join(assistant_turns)


def extract_answer(response: str | None) -> str | None:
    """The release's answer of a response, or None when it has none (see the module docstring)."""
    if not response:
        return None
    text = _TOOL_REPLY.sub("", response)
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    _, opened, rest = text.strip().rpartition("<answer>")
    if opened:
        return rest.strip()
    lines = text.strip().splitlines()
    return lines[-1].strip() if 0 < len(lines) < 500 else None


def rule_token(prediction: str, truth: str) -> str | None:
    """The one token the release's rule reads from an answer, or None.

    For a truth that is exactly one of the letters A–D (any case): the last standalone letter A–D
    of the upper-cased answer. Otherwise: the answer itself read as a float (printed back as
    Python prints floats), else the last number in it.
    """
    if not prediction:
        return None
    upper = prediction.upper()
    if str(truth).upper() in CHOICE_LETTERS:
        letters = _LETTER.findall(upper)
        return letters[-1] if letters else None
    try:
        return str(float(prediction))
    except ValueError:
        numbers = _NUMBER.findall(upper)
        return numbers[-1] if numbers else None


def answers_equivalent(prediction: str | None, truth: str) -> bool:
    """The release's rule verdict: whether `prediction` (an extracted answer) equals `truth`."""
    if not isinstance(prediction, str) or not isinstance(truth, str):
        return False
    try:
        if float(prediction) == float(truth):
            return True
    except ValueError:  # one side is no float: compare the strings as they are
        if prediction == truth:
            return True
    token = rule_token(prediction, truth)
    if token is None:
        return False
    expected = truth.strip()
    if token.upper() == expected.upper():
        return True
    try:
        return abs(float(Fraction(token)) - float(Fraction(expected))) <= TOLERANCE
    except (ValueError, ZeroDivisionError, OverflowError):  # not a fraction ("A", "inf", "1/0")
        return False


def format_reward(response: str | None) -> float:
    """The release's format term in {0, 1} for a whole response (see the module docstring)."""
    if response is None:
        return 0.0
    text = _TOOL_REPLY.sub("", response).strip()
    if not text.startswith("<think>"):
        return 0.0
    opened = text.count("<think>")
    if opened == 0 or opened != text.count("</think>"):
        return 0.0
    answers = list(re.finditer(r"<answer>.*?</answer>", text, re.DOTALL))
    if len(answers) != 1 or not _ANSWER_AT_END.search(text):
        return 0.0
    start, end = answers[0].span()
    for think in _THINK_BLOCK.finditer(text):
        a, b = think.span()
        if (a < start < b or a < end < b) and _THINK_THEN_ANSWER.search(text, a, b):
            return 0.0
    return 1.0
