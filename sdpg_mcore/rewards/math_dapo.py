"""The reference's two ``math_dapo`` scorers, reproduced exactly (SDPG's verl fork, ``reward_score/math_dapo.py``).

- ``answer_colon`` (the reference's default, ``compute_score``): the last ``Answer: ...`` line within
  the last 300 characters (``(?i)Answer\\s*:\\s*`` — the colon may be followed by a line break),
  normalised and string-compared; ``[INVALID]`` when there is none.
- ``boxed`` (``compute_score_boxed``, for ``answer_format=boxed`` prompts): the last ``\\boxed{}``
  within the last 500 characters, then an ``Answer:`` line on one line as fallback.

Both use the Minerva/Hendrycks string normalisation and give +1 / -1 with ``acc`` and ``pred``. No
symbolic equivalence, so ``\\frac12`` is not ``0.5`` here. The substitution tables below are the
reference's data; they must stay byte-identical for the rewards to match. The scores are checked
against the reference's own outputs (``tests/rewards/fixtures/reference_scores.json``, written from its
code by ``tests/make_reference_fixtures.py``) by ``tests/tools/test_check_reward_agreement.py``.
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
_ANSWER_COLON = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
TAIL_CHARS = 500
"""The boxed scorer reads the last 500 characters of a response."""
ANSWER_COLON_TAIL_CHARS = 300
"""The answer_colon scorer reads the last 300 characters ("the longest answer in MATH-500 has 159")."""


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


def answer_colon_score(solution_str: str, ground_truth: str) -> dict[str, Any]:
    """Reference ``compute_score``: ``{"score": +1.0 | -1.0, "acc": bool, "pred": str}``."""
    matches = _ANSWER_COLON.findall(solution_str[-ANSWER_COLON_TAIL_CHARS:])
    pred = normalize_final_answer(matches[-1] if matches else "[INVALID]")
    correct = pred == normalize_final_answer(ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def boxed_score(solution_str: str, ground_truth: str) -> dict[str, Any]:
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


ANSWER_FORMATS = {"answer_colon": answer_colon_score, "boxed": boxed_score}


def math_dapo_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    answer_format: str = "answer_colon",
) -> dict[str, Any]:
    """The reference scorer for ``answer_format`` (``answer_colon`` | ``boxed``), with verl's signature."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r}: choose one of {sorted(ANSWER_FORMATS)}")
    return ANSWER_FORMATS[answer_format](solution_str, ground_truth)
