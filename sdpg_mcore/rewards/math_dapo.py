"""The reference reward, reproduced exactly: ``math_dapo.compute_score_boxed`` of the SDPG/verl code.

Strict mode (registry name ``math_strict``): the last ``\\boxed{}`` within the last 500 characters,
the Minerva/Hendrycks string normalisation, an ``Answer:`` line as fallback, and +1 / -1. No
symbolic equivalence, so ``\\frac12`` is not ``0.5`` here. The substitution tables below are the
reference's data; they must stay byte-identical for the rewards to match.
"""

from __future__ import annotations

import re
from typing import Any

_SUBSTITUTIONS = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]

_REMOVED_EXPRESSIONS = [
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    r"\mathrm{th}",
    r"^\circ",
    r"^{\circ}",
    r"\;",
    r",\!",
    "{,}",
    '"',
    "\\dots",
]

_ANSWER_LINE = re.compile(r"(?i)Answer[ \t]*:[ \t]*([^\n]+)")
TAIL_CHARS = 500


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (braces balanced) in ``text``, including the command; None if none closes."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def remove_boxed(boxed: str) -> str:
    prefix = "\\boxed{"
    assert boxed.startswith(prefix) and boxed.endswith("}"), boxed
    return boxed[len(prefix) : -1]


def normalize_final_answer(answer: str) -> str:
    """The reference's string normalisation (Minerva / lm-eval ``hendrycks_math``)."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED_EXPRESSIONS:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def strict_compute_score(
    data_source: str | None, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Reference ``compute_score_boxed``: ``{"score": +1.0 | -1.0, "acc": bool, "pred": str}``."""
    tail = solution_str[-TAIL_CHARS:]
    truth = normalize_final_answer(ground_truth)
    boxed = last_boxed_only_string(tail)
    if boxed is not None:
        pred = normalize_final_answer(remove_boxed(boxed))
        if pred == truth:
            return {"score": 1.0, "acc": True, "pred": pred}
    matches = _ANSWER_LINE.findall(tail)
    if matches:
        pred = normalize_final_answer(matches[-1].strip().strip("*").strip())
        if pred == truth:
            return {"score": 1.0, "acc": True, "pred": pred}
    pred = None if boxed is None else normalize_final_answer(remove_boxed(boxed))
    return {"score": -1.0, "acc": False, "pred": pred or "[INVALID]"}
