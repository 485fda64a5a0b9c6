"""Hypothesis strategies for what a model writes: turns, dict actions and tool code.

Turns are sequences of pieces in any order and number: the protocol's tags, tool-call JSON
(well-formed, truncated, with wrong types inside, nested too deep, integers past Python's digit
limit), fenced code, free text with control characters and lone surrogates, and huge repeats.
Code snippets return every kind of non-image and odd images, or assign no `result` at all.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import strategies as st

TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "<ANSWER>", "```python\n",
        "```", "\n", "image_index: 3")

# Values of the wrong type (and a few of the right one) for anything inside a call.
ODD_VALUES = st.one_of(
    st.text(max_size=20), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["²", "٣", " 1 ", "-1", "1e3", "9" * 40]),
)

# What `result` is assigned (or printed): non-images, odd modes and sizes, good images.
RESULT_EXPRESSIONS = (
    "5", "None", "'x'", "[image]", "{}", "iter([])", "lambda: 1", "image.size", "np.zeros((4, 4), float)",
    "np.zeros((3, 3, 4), np.uint8)", "np.zeros((2, 2), bool)", "np.zeros((0, 4, 3), np.uint8)",
    "np.full((5, 5), np.nan)", "Image.new('F', (5, 4), 3.5)", "Image.new('I;16', (5, 4), 300)",
    "Image.new('I', (3, 3), -7)", "image.convert('RGBA')", "image.convert('P')", "image.convert('1')",
    "image.convert('LA')", "image.convert('CMYK')", "image.resize((1, 1))", "image.resize((200, 1))",
    "image.resize((1, 200))", "image.resize((201, 1))", "image.resize((2048, 1536))", "image.crop((0, 0, 0, 0))",
    "image.crop((5, 5, 2, 2))", "image.rotate(90, expand=True)", "image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)",
    "images[-1]", "image",
)

CONTROL_AND_SURROGATES = st.sampled_from(["\x00", "\x07", "\x1b[31m", "\r", "\x7f", "\u2028", "\ud800", "\udfff",
                                          "\udc80x", "\ufeff", "\U0001f600"])
TEXT = st.lists(st.one_of(st.text(max_size=12), CONTROL_AND_SURROGATES), max_size=4).map("".join)

NO_RESULT_CODE = st.one_of(
    st.just("pass"), st.just("x = image.rotate(90)"),
    st.sampled_from(RESULT_EXPRESSIONS).map(lambda e: f"print({e})"),
    TEXT.map(lambda s: f"print({s!r})"),  # control characters and lone surrogates in printed output
    st.integers(1, 300_000).map(lambda n: f"print('y' * {n})"),
)
CODE = st.one_of(
    st.sampled_from(RESULT_EXPRESSIONS).map(lambda e: f"result = {e}"),
    NO_RESULT_CODE,
    st.sampled_from(["result = image.rotate(", "result = undefined", "raise ValueError('no')", "import os",
                     "résultat = image\nresult = résultat", "result = image\nprint(1/0)", "while True:\n    break"]),
)


def call_text(arguments, name="code_image_tool") -> str:
    return json.dumps({"name": name, "arguments": arguments})


@st.composite
def call_json(draw) -> str:
    """The body of a <tool_call>: well formed or not, right types or not, cut anywhere."""
    arguments = draw(st.dictionaries(st.sampled_from(["code", "image_index", "description", "extra"]),
                                     st.one_of(CODE, ODD_VALUES), max_size=4))
    name = draw(st.sampled_from(["code_image_tool", "code_image_tool", "python", 3]))
    as_string = draw(st.booleans())
    body = call_text(json.dumps(arguments) if as_string else arguments, name)
    kind = draw(st.sampled_from(["whole", "whole", "cut", "deep", "big_int"]))
    if kind == "cut":
        return body[: draw(st.integers(0, len(body)))]
    if kind == "deep":
        return "[" * draw(st.integers(1, 20_000))
    if kind == "big_int":
        return '{"name": "code_image_tool", "arguments": {"code": "result = image", "image_index": ' + "7" * 5000 + "}}"
    return body


PIECE = st.one_of(
    st.sampled_from(TAGS), TEXT, call_json(), CODE,
    st.tuples(st.sampled_from(TAGS + ("x", " ")), st.integers(1, 20_000)).map(lambda t: t[0] * t[1]),
)
TURNS = st.lists(PIECE, max_size=8).map("".join)

DICT_ACTIONS = st.dictionaries(
    st.one_of(st.sampled_from(["code", "image_index", "description", "answer", "cod", "lang"]), st.integers(0, 3)),
    st.one_of(CODE, ODD_VALUES, st.just(10**5000)), max_size=4,
)


def examples(default: int, slow: int):
    """Run a property test with `default` examples, and again with `slow` ones under `-m slow`."""
    return pytest.mark.parametrize("max_examples", [
        pytest.param(default, id="default"), pytest.param(slow, id="long", marks=pytest.mark.slow)])
