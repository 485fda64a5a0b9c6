"""Answer extraction and the rule checks (choices, numbers, OCR text, math)."""

import builtins

import pytest

import cv_env.answers as answers
from cv_env.answers import check_answer, extract_answer, normalize_text, parse_choice, parse_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>maybe A</think><answer> B </answer>", "B"),
        ("<answer>A</answer> then <answer>C</answer>", "C"),  # the last block wins
        ("<think>x</think><answer>12 cm", "12 cm"),  # unclosed final answer runs to the end
        ("<answer>  </answer>", None),
        ("Reasoning...\nAnswer: 42", "42"),
        ("I am sure the answer is (B).", "(B)."),
        ("so we get \\boxed{\\frac{1}{2}} here", "\\frac{1}{2}"),
        ("<think>Answer: 5</think>\nIt says STOP", "It says STOP"),  # think is not the answer
        ("I cannot answer this\n7", "7"),  # a bare 'answer' word is no answer marker
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, letter",
    [("B", "B"), ("b", "B"), ("(B)", "B"), ("[c]", "C"), ("B.", "B"), ("Option B", "B"),
     ("option (d)", "D"), ("B. a cat", "B"), ("(B) a cat", "B"), ("The answer is (B)", "B"),
     ("Answer: b", "B"), ("\\boxed{E}", "E"),
     ("the answer is a cat", None), ("a cat", None), ("A man on a horse", None), ("", None)],
)
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_check_choice():
    assert check_answer("(B)", "B", "choice")
    assert check_answer("Option b", "(B)", "choice")
    assert check_answer("a cat", "B. a cat", "choice")  # the option's text
    assert not check_answer("C", "B. a cat", "choice")
    assert not check_answer("A B C D", "B", "choice")  # hedging is wrong
    assert not check_answer("(A) a cat", "B. a cat", "choice")  # a letter decides over text
    assert check_answer("Red", "red", "choice")  # a truth without a letter compares as text


@pytest.mark.parametrize(
    "text, values",
    [("3/4", [0.75]), ("75%", [75.0, 0.75]), ("1,234.5", [1234.5]), ("12 cm", [12.0]),
     ("x = -2.5e3", [-2500.0]), ("\\frac{3}{4}", [0.75]), ("twenty-one", [21.0]),
     ("There are three hundred and five", [305.0]), ("1/0", []), ("none", [])],
)
def test_parse_number(text, values):
    assert parse_number(text) == pytest.approx(values)


def test_check_number_tolerance_and_forms():
    assert check_answer("100.9", "100", "number")  # within the default 1e-2 relative tolerance
    assert not check_answer("101.5", "100", "number")
    assert not check_answer("100.9", "100", "number", rel_tol=1e-3)
    assert check_answer("0.75", "3/4", "number")
    assert check_answer("75%", "0.75", "number") and check_answer("75", "75%", "number")
    assert check_answer("1,234", "1234", "number")
    assert check_answer("The length is 12 cm.", "12", "number")
    assert check_answer("seven", "7", "number")
    assert check_answer("0", "0", "number") and not check_answer("1e-12", "1", "number")
    assert not check_answer("", "7", "number") and not check_answer(None, "7", "number")


def test_check_text_normalisation():
    assert normalize_text("  \u201cHELLO-42\u201d ") == "hello42"
    assert check_answer("hello 42", "HELLO-42", "text")  # OCR: punctuation and spacing ignored
    assert check_answer("'Stop!'", "STOP", "text")
    assert check_answer("The Eiffel Tower", "eiffel tower", "text")
    assert check_answer("ＳＴＯＰ", "stop", "text")  # full-width letters
    assert not check_answer("hello 43", "HELLO-42", "text")
    assert not check_answer("35", "3.5", "text") and check_answer("3.5.", "3.5", "text")
    assert not check_answer("stop sign", "stop", "text")  # no containment
    assert not check_answer("...", "", "text")


def test_check_math_with_math_verify():
    pytest.importorskip("math_verify")
    assert check_answer("\\frac{3}{4}", "0.75", "math")
    assert check_answer("x+1", "1+x", "math")
    assert check_answer("\\boxed{\\sqrt{2}}", "\\sqrt 2", "math")
    assert not check_answer("2x", "2", "math")


def test_check_math_without_math_verify(monkeypatch):
    real_import = builtins.__import__

    def no_math_verify(name, *args, **kwargs):
        if name == "math_verify":
            raise ImportError("No module named 'math_verify'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    monkeypatch.setattr(answers, "_MATH_VERIFY_MISSING_WARNED", False)
    with pytest.warns(UserWarning, match="math-verify is not installed"):
        assert check_answer("0.75", "3/4", "math")  # plain numbers still compare
    assert not check_answer("2x", "2", "math")  # the last-number rule is not used for math
    assert check_answer("x + 1", "x+1", "math")  # text fallback


def test_unknown_answer_type():
    with pytest.raises(ValueError, match="answer_type 'bool' is not one of"):
        check_answer("yes", "yes", "bool")
