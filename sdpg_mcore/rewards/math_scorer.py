"""The project's default math scorer: the response's final answer, normalisation, then exact math-verify.

Steps, cheapest first:

1. The final answer: whichever comes last of the last ``\\boxed{}`` / ``\\fbox{}`` (nested braces; a
   brace-less ``\\boxed 5`` keeps the whole expression up to ``$``, the line end or ``\\]``) and the last
   ``Answer:`` line within the last 500 characters (the reference's fallback). An earlier answer never
   overrides a later one.
2. Both sides cleaned (``\\left``/``\\right``, ``\\!`` and TeX spaces, ``dfrac``/``tfrac``, ``^\\circ``,
   ``\\text{}`` wrappers and trailing units, ``$``, a trailing period, a leading ``x =``) and compared as
   strings without whitespace; the reference's normalisation of the same final answer is accepted too.
3. Otherwise ``math-verify`` decides symbolic equivalence (``\\frac12`` = ``0.5``), with numbers compared
   at 15 decimals rather than math-verify's default 6 — a decimal is equal only to the value it
   writes (``0.142857`` is not ``1/7``). A ``\\mod`` / ``\\pmod`` the gold lacks is never equivalent
   (math-verify reads ``7 \\mod 10`` as 7). Answers longer than ``MAX_VERIFY_CHARS`` skip this step.

Every step is linear in the response length. :func:`score_math_answer` runs inline; the registry's
``math_compute_score`` runs it in the reward worker under a wall-clock limit (sympy can loop in C on
``9^{9^{9^9}}``). Scores follow the reference: +1 correct, -1 wrong.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from sdpg_mcore.rewards.math_dapo import TAIL_CHARS, normalize_final_answer

CORRECT_SCORE = 1.0
WRONG_SCORE = -1.0
MAX_VERIFY_CHARS = 400
NUMERIC_DECIMALS = 15
"""math-verify rounds numbers to this many decimals before comparing (its default 6 accepts 0.1000004 = 0.1)."""

# ``\boxed 5`` (no braces) only before a number, sign or command: ``in \boxed as asked`` is prose. The
# brace-less expression runs to ``$``, the end of the line, or the next box.
_BOX_START = re.compile(r"\\(?:boxed|fbox)(?:\s*(\{)|[ \t]+([-+\d\\(](?:(?!\\boxed|\\fbox)[^\n$])*))")
_BRACELESS_END = re.compile(r"\\\]|\\\)")
_ANSWER_LINE = re.compile(r"(?i)Answer[ \t]*:[ \t]*([^\n]+)")
_ANSWER_PREFIX = re.compile(r"(?i)^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*")
_STATED = re.compile(r"[\d\\]")
_MOD = re.compile(r"\\[bp]?mod(?![a-zA-Z])|\bmod\b")
# Multi-letter units only: a single letter after a number is more often a variable (``2m``) than metres.
_UNITS = (
    r"square|sq|cubic|cm|centimeters?|mm|millimeters?|meters?|km|kilometers?|inch(?:es)?|ft|feet|foot|"
    r"yards?|miles?|mph|kg|grams?|kilograms?|lbs?|pounds?|ounces?|oz|liters?|ml|sec|seconds?|minutes?|"
    r"hrs?|hours?|days?|weeks?|months?|years?|dollars?|cents?|units?|degrees?|radians?|ways|points|people|"
    r"students|books|marbles|apples|coins|times"
)
# One trailing unit, searched in a short window at the end: a pattern repeating units up to ``$`` over
# the whole answer is quadratic (``1 cm cm ... cm x``: every start scans the run again).
_TRAILING_UNIT = re.compile(r"(?<=[\d}).\s])\s*(?:" + _UNITS + r")\b(?:\^\{?[23]\}?|\^[23])?\s*$")
_UNIT_WINDOW = 48
_MAX_UNITS = 4
_LEADING_VARIABLE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*=\s*(?=[^=]+$)")


def _last_box(text: str) -> tuple[int, str | None] | None:
    """(start, content) of the last ``\\boxed``/``\\fbox``; content None if its brace never closes."""
    last = None
    for last in _BOX_START.finditer(text):  # noqa: B007 - the last match is the one wanted
        pass
    if last is None:
        return None
    if last.group(2) is not None:
        content = _BRACELESS_END.split(last.group(2), maxsplit=1)[0].strip()
        return last.start(), content.rstrip(".,;").strip()
    depth = 0
    for j in range(last.start(1), len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return last.start(), text[last.start(1) + 1 : j]
    return last.start(), None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (or ``\\boxed x``); None if absent/unclosed.

    A bare mention (``in \\boxed.``) is not a box and does not hide an earlier answer.
    """
    box = _last_box(text)
    return None if box is None else box[1]


def _states_an_answer(text: str) -> bool:
    """An ``Answer:`` line that states a value (a digit, a TeX command, or one word such as ``B``), not prose."""
    return _STATED.search(text) is not None or len(text.split()) <= 1


def extract_answer(solution: str) -> str | None:
    """The response's final answer: the later of its last box and its last ``Answer:`` line (tail only).

    An ``Answer:`` line after the box wins when it states a value (``Answer: 41`` overrides an
    earlier ``\\boxed{42}``); prose such as ``Answer: see above`` does not hide the box.
    """
    box = _last_box(solution)
    tail_start = max(0, len(solution) - TAIL_CHARS)
    line = None
    for line in _ANSWER_LINE.finditer(solution, tail_start):  # noqa: B007 - the last match is wanted
        pass
    if line is not None and (box is None or line.start() > box[0]):
        answer = line.group(1).strip().strip("*").strip()
        inner = _last_box(answer)
        answer = inner[1] if inner is not None else _ANSWER_PREFIX.sub("", answer)
        if box is None or (answer is not None and _states_an_answer(answer)):
            return answer
    return None if box is None else box[1]


def _strip_trailing_units(s: str) -> str:
    for _ in range(_MAX_UNITS):
        offset = max(0, len(s) - _UNIT_WINDOW)
        match = _TRAILING_UNIT.search(s, offset)
        if match is None:
            break
        s = s[: match.start()]
    return s


def clean_answer(answer: str) -> str:
    """Drop notation that does not change the value; keeps spaces (LaTeX needs them, e.g. ``\\pi r``)."""
    s = answer.strip()
    boxed = last_boxed(s)
    if boxed is not None and s.startswith(("\\boxed", "\\fbox")):
        s = boxed.strip()
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = s.replace("\\!", "")
    s = re.sub(r"\\[,;: ]", " ", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    stripped = _strip_trailing_units(s).strip()
    s = stripped or s
    s = _LEADING_VARIABLE.sub("", s)
    return s.strip().rstrip(".").strip()


def normalize_answer(answer: str) -> str:
    """:func:`clean_answer` for string comparison: no whitespace, ``\\frac12`` braced, ``1,000`` = ``1000``."""
    s = re.sub(r"\s+", "", clean_answer(answer))
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    return s


def math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence, exact for numbers, without its signal-based timeouts (the caller bounds time)."""
    from math_verify import parse, verify
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse("\\boxed{" + gold + "}", config, parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, float_rounding=NUMERIC_DECIMALS, timeout_seconds=None))


def _reference_equal(raw: str, ground_truth: str) -> bool:
    # The reference reads at most 500 characters, so its (partly quadratic) regexes never see more.
    return len(raw) <= TAIL_CHARS and normalize_final_answer(raw) == normalize_final_answer(ground_truth)


def score_math_answer(
    data_source: str | None, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Default math reward, inline: ``{"score": +1 | -1, "acc": bool, "pred": str, "timed_out": False}``."""
    raw = extract_answer(solution_str)
    if raw is None or not raw.strip():
        return {"score": WRONG_SCORE, "acc": False, "pred": "[INVALID]", "timed_out": False}
    pred = normalize_answer(raw)
    correct = _reference_equal(raw, ground_truth) or (bool(pred) and pred == normalize_answer(ground_truth))
    if (
        not correct
        and pred
        and len(raw) <= MAX_VERIFY_CHARS
        and (_MOD.search(raw) is None or _MOD.search(ground_truth))
    ):
        try:
            correct = math_verify_equal(clean_answer(ground_truth), clean_answer(raw))
        except Exception:  # math-verify raises on malformed LaTeX: not equal
            correct = False
    return {
        "score": CORRECT_SCORE if correct else WRONG_SCORE,
        "acc": correct,
        "pred": pred,
        "timed_out": False,
    }
