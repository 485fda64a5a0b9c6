"""Answer extraction and rule-based checking (choices, numbers, OCR text, math).

`extract_answer(text)` finds the model's final answer in a turn; `check_answer(prediction,
truth, answer_type)` decides whether it is correct. Checks are strict on purpose: a reward
that accepts "A B C D" for "B" or any text containing the truth is a reward to be hacked.

Decisions a user may want to know:

* choice: a letter A–H given as "B", "b", "(B)", "[B]", "B.", "B)", "Option B", "B. a cat",
  "The answer is (B)"; a truth written as "B. a cat" also accepts the option text "a cat".
* number: relative tolerance 1e-2 by default (`rel_tol`); fractions ("3/4"), thousands
  separators ("1,234"), scientific notation, units ("12 cm") and number words
  ("twenty-one", "three hundred and five") are understood. A percentage matches both
  readings: "75%" equals 75 and 0.75. When a text holds several numbers, the last one is the answer.
* text (OCR answers): case, Unicode width, quotes, punctuation and whitespace are ignored,
  so "HELLO-42" equals "hello 42" and "hello42"; a leading article ("the cat") is dropped;
  a point or comma between digits is kept ("3.5" is not "35").
* math: math-verify (`math_verify.parse` / `verify`, in the `[train]` extra) decides
  equivalence (a bare expression is read as one formula, so "2x" is not "2"). Without it, or
  when it cannot parse a side, two plain numbers compare as numbers and anything else as text
  (a warning says once that math-verify is missing).
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
import warnings
from typing import Callable

from cv_env.tags import blocks

__all__ = [
    "ANSWER_TYPES",
    "extract_answer",
    "check_answer",
    "parse_choice",
    "parse_number",
    "normalize_text",
]

ANSWER_TYPES: tuple[str, ...] = ("text", "number", "choice", "math")
CHOICE_LETTERS = "ABCDEFGH"

# -- extraction ------------------------------------------------------------------------------------

_REASONING = re.compile(
    r"<think>.*?(</think>|$)|<tool_call>.*?(</tool_call>|$)", re.DOTALL | re.IGNORECASE
)
# "Answer: X", "Final answer = X", "the answer is X" (a bare "answer" word is not enough). The
# rest of the line is taken greedily and stripped afterwards: a lazy `(.+?)\s*$` retries the
# whitespace run at every character, quadratic in a line of spaces.
_ANSWER_PHRASE = re.compile(
    r"(?:\banswer\s*(?:is\s*)?[:=]|\bthe\s+(?:final\s+)?answer\s+is\b)\s*(.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_WHITESPACE = re.compile(r"\s+")
# math-verify's parser is superlinear (16 KB of spaces: 5 s); longer answers are checked by rule.
MATH_VERIFY_MAX_CHARS = 1000


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else None


def extract_answer(text: str | None) -> str | None:
    """The model's final answer in `text`, or None when there is none.

    The last <answer>…</answer> block wins (an unclosed final <answer> runs to the end of the
    text). Otherwise, outside <think> and <tool_call> blocks: the last \\boxed{...}, then the
    last "Answer: X" / "the answer is X", then the last non-empty line.
    """
    if not text:
        return None
    answers = blocks(text, "answer", ignore_case=True)
    if answers:
        answer = answers[-1].strip()
        return answer or None
    opened = text.lower().rfind("<answer>")
    if opened >= 0:
        return text[opened + len("<answer>") :].strip() or None
    visible = _REASONING.sub("\n", text).strip() or text
    boxed = _last_boxed(visible)
    if boxed:
        return boxed
    phrases = _ANSWER_PHRASE.findall(visible)
    if phrases and phrases[-1].strip():
        return phrases[-1].strip()
    lines = [line.strip() for line in visible.splitlines() if line.strip()]
    return lines[-1] if lines else None


# -- normalisation -------------------------------------------------------------------------------

_QUOTES = str.maketrans(
    {c: "'" for c in "\u2018\u2019\u201a\u201b`\u00b4"} | {c: '"' for c in "\u201c\u201d\u201e\u00ab\u00bb"}
)
_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")


def _unwrap(text: str) -> str:
    """Strip the decorations models put around answers: \\boxed{}, $…$, \\text{}, a final period.

    Runs of whitespace become one space first: no check depends on their length, and the
    patterns below (`\\s*` next to `\\s*`) would take quadratic time or worse on long runs.
    """
    text = _WHITESPACE.sub(" ", text).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        text = boxed
    text = _LATEX_WRAPPERS.sub(r"\1", text)
    text = text.strip().strip("$").strip()
    if text.endswith("."):
        text = text[:-1]
    return text.strip()


def normalize_text(text: str) -> str:
    """Canonical form for text answers: NFKC, casefolded, no quotes/punctuation/whitespace/articles."""
    text = unicodedata.normalize("NFKC", _unwrap(text)).translate(_QUOTES).casefold()
    # Decimal points and separators inside numbers survive: "3.5" must not read as "35".
    words = re.findall(r"\d+(?:[.,]\d+)*|[^\W_]+", text)
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return "".join(words)


# -- choices -------------------------------------------------------------------------------------

_L = f"[{CHOICE_LETTERS}{CHOICE_LETTERS.lower()}]"
_CHOICE_PATTERNS = [
    re.compile(rf"^[\(\[]?({_L})[\)\]]?[\.\):]?$"),  # B, b, (B), [B], B., B)
    re.compile(
        rf"^(?:the\s+)?(?:correct\s+)?(?:option|choice)\s*[:\-]?\s*[\(\[]?({_L})[\)\]]?(?:[\.\):]|\s|$)",
        re.I,
    ),
    # after "answer" a lower-case letter must end the text: "the answer is a cat" is no choice
    re.compile(
        rf"^(?i:(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?)\s*:?\s*"
        rf"[\(\[]?([{CHOICE_LETTERS}])[\)\]]?(?:[\.\):]|\s|$)"
    ),
    re.compile(rf"^(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\s*:?\s*[\(\[]?({_L})[\)\]]?\.?$", re.I),
    re.compile(rf"^[\(\[]({_L})[\)\]]\s*\S"),  # (B) a cat
    re.compile(rf"^([{CHOICE_LETTERS}])[\.\):]\s*\S"),  # B. a cat, B) a cat (capital only)
]


def parse_choice(text: str) -> str | None:
    """The option letter (upper case) that `text` names, or None if it names none clearly."""
    text = _unwrap(text)
    for pattern in _CHOICE_PATTERNS:
        match = pattern.match(text)
        if match:
            return match.group(1).upper()
    return None


def _choice_text(text: str) -> str | None:
    """The option text after the letter in "B. a cat" / "(B) a cat", or None."""
    match = re.match(rf"^[\(\[]?[{CHOICE_LETTERS}][\)\]\.:]\s*(\S.*)$", _unwrap(text))
    return match.group(1) if match else None


# -- numbers -------------------------------------------------------------------------------------

_NUM = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?\s*(?P<pct>%|percent\b)?", re.IGNORECASE
)
_PLAIN_NUMBER = re.compile(rf"\s*{_NUM}(?:\s*/\s*{_NUM})?\s*%?\s*")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_SMALL = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = dict(zip("twenty thirty forty fifty sixty seventy eighty ninety".split(), range(20, 100, 10)))
_WORDS = {w: i for i, w in enumerate(_SMALL)} | _TENS


def _to_float(token: str) -> float | None:
    token = token.replace(",", "").replace("−", "-")
    if not re.search(r"\d", token):
        return None
    try:
        return float(token)
    except ValueError:
        return None


def _words_to_number(text: str) -> float | None:
    """The last run of number words: 'twenty-one' -> 21, 'three hundred and five' -> 305."""
    runs: list[list[str]] = []
    joiners = ("hundred", "thousand", "and")
    previous_in_run = False
    for word in re.findall(r"[a-z]+", text.casefold()):
        if word in _WORDS or (word in joiners and previous_in_run):
            if not previous_in_run:
                runs.append([])
            runs[-1].append(word)
            previous_in_run = True
        else:
            previous_in_run = False
    if not runs:
        return None
    total, current = 0, 0
    for word in runs[-1]:
        if word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        elif word != "and":
            current += _WORDS[word]
    return float(total + current)


def parse_number(text: str) -> list[float]:
    """Candidate values of the (last) number in `text`: [] if none, two readings for a percentage."""
    text = _FRAC.sub(r"(\1)/(\2)", _unwrap(text)).replace("(", " ").replace(")", " ")
    matches = [m for m in _NUMBER.finditer(text) if _to_float(m.group("num")) is not None]
    if not matches:
        value = _words_to_number(text)
        return [] if value is None else [value]
    m = matches[-1]
    value = _to_float(m.group("num"))
    if m.group("den"):
        den = _to_float(m.group("den"))
        if not den:
            return []
        value /= den
    return [value, value / 100] if m.group("pct") else [value]


def _numbers_match(prediction: str, truth: str, rel_tol: float, abs_tol: float) -> bool | None:
    """True/False when both sides hold a number; None when either does not."""
    predicted, expected = parse_number(prediction), parse_number(truth)
    if not predicted or not expected:
        return None
    return any(math.isclose(p, t, rel_tol=rel_tol, abs_tol=abs_tol) for p in predicted for t in expected)


# -- math ------------------------------------------------------------------------------------------

_MATH_VERIFY_MISSING_WARNED = False


def _math_verify_match(prediction: str, truth: str) -> bool | None:
    """math-verify's verdict, or None when it is not installed or cannot parse either side."""
    global _MATH_VERIFY_MISSING_WARNED
    try:
        from math_verify import parse, verify
    except ImportError:
        if not _MATH_VERIFY_MISSING_WARNED:
            warnings.warn(
                "math-verify is not installed: answer_type='math' falls back to number and text "
                "checks. Install it with `pip install math-verify` (part of the [train] extra).",
                stacklevel=3,
            )
            _MATH_VERIFY_MISSING_WARNED = True
        return None
    # math-verify times out with signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(text: str) -> list:
        # Without math delimiters math-verify picks the first number it sees ("2x" -> 2), so
        # a bare expression is read as one LaTeX formula first.
        if "$" in text or "\\boxed" in text or "\\(" in text:
            return parse(text, parsing_timeout=timeout)
        return parse(f"${text}$", parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)

    if len(prediction) > MATH_VERIFY_MAX_CHARS or len(truth) > MATH_VERIFY_MAX_CHARS:
        return None
    gold, answer = parsed(truth), parsed(prediction)
    if not gold or not answer:
        return None
    return bool(verify(gold, answer, timeout_seconds=timeout))


# -- the checker -----------------------------------------------------------------------------------


def _check_choice(prediction: str, truth: str, rel_tol: float, abs_tol: float) -> bool:
    expected = parse_choice(truth)
    if expected is None:  # the truth is the option's text, not its letter
        return _check_text(prediction, truth, rel_tol, abs_tol)
    if parse_choice(prediction) == expected:
        return True
    option_text = _choice_text(truth)
    if option_text is None or parse_choice(prediction) is not None:
        return False  # a letter was given and it is the wrong one
    return _check_text(prediction, option_text, rel_tol, abs_tol)


def _check_number(prediction: str, truth: str, rel_tol: float, abs_tol: float) -> bool:
    verdict = _numbers_match(prediction, truth, rel_tol, abs_tol)
    return verdict if verdict is not None else _check_text(prediction, truth, rel_tol, abs_tol)


def _check_text(prediction: str, truth: str, rel_tol: float, abs_tol: float) -> bool:
    expected = normalize_text(truth)
    return bool(expected) and normalize_text(prediction) == expected


def _check_math(prediction: str, truth: str, rel_tol: float, abs_tol: float) -> bool:
    verdict = _math_verify_match(prediction, truth)
    if verdict is not None:
        return verdict
    # Without math-verify (or when it cannot parse a side) only plain numbers are compared as
    # numbers: the last-number rule would call "2x" equal to "2".
    if _PLAIN_NUMBER.fullmatch(_unwrap(prediction)) and _PLAIN_NUMBER.fullmatch(_unwrap(truth)):
        return bool(_numbers_match(prediction, truth, rel_tol, abs_tol))
    return _check_text(prediction, truth, rel_tol, abs_tol)


_CHECKERS: dict[str, Callable[[str, str, float, float], bool]] = {
    "choice": _check_choice,
    "number": _check_number,
    "text": _check_text,
    "math": _check_math,
}


def check_answer(
    prediction: str | None,
    truth: str,
    answer_type: str = "text",
    *,
    rel_tol: float = 1e-2,
    abs_tol: float = 1e-9,
) -> bool:
    """Whether `prediction` (an extracted answer, or None) answers `truth` correctly.

    `answer_type` is one of "text", "number", "choice", "math" (see the module docstring for
    what each accepts). `rel_tol` / `abs_tol` apply to numeric comparisons.
    """
    if answer_type not in _CHECKERS:
        raise ValueError(f"answer_type {answer_type!r} is not one of {ANSWER_TYPES}")
    if prediction is None or not str(prediction).strip():
        return False
    return _CHECKERS[answer_type](str(prediction), str(truth), rel_tol, abs_tol)
