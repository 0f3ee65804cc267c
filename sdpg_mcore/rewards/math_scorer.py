"""The project's default math scorer: last boxed answer, normalisation, then math-verify equivalence.

Steps, cheapest first:

1. the last ``\\boxed{}`` / ``\\fbox{}`` (nested braces; also ``\\boxed 5``) in the response, else the
   last ``Answer:`` line within the last 500 characters (the reference's fallback);
2. both sides cleaned (``\\left``/``\\right``, ``\\!`` and TeX spaces, ``dfrac``/``tfrac``, ``^\\circ``,
   ``\\text{}`` wrappers and trailing units, ``$``, a trailing period, a leading ``x =``) and compared as
   strings without whitespace; whatever strict mode (the reference scorer) accepts is accepted too;
3. otherwise ``math-verify`` decides symbolic/numeric equivalence (``\\frac12`` = ``0.5``) under a wall-
   clock limit: outside a pool worker the check runs in a one-worker :class:`TimeoutPool` that is
   killed and replaced on timeout (sympy can loop in C on ``9^{9^{9^9}}``; signals cannot stop it from
   a thread). Answers longer than ``MAX_VERIFY_CHARS`` skip this step.

Scores follow the reference: +1 correct, -1 wrong.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
from typing import Any

from sdpg_mcore.rewards.math_dapo import TAIL_CHARS, strict_compute_score
from sdpg_mcore.rewards.pool import TimeoutPool, in_worker

logger = logging.getLogger(__name__)

CORRECT_SCORE = 1.0
WRONG_SCORE = -1.0
MAX_VERIFY_CHARS = 400
DEFAULT_VERIFY_TIMEOUT_S = 5.0

# ``\boxed 5`` (no braces) only before a number, sign or command: ``in \boxed as asked`` is prose.
_BOX_START = re.compile(r"\\(?:boxed|fbox)(?:\s*(\{)| +([-+\d\\(][^\s$]*))")
_ANSWER_LINE = re.compile(r"(?i)Answer[ \t]*:[ \t]*([^\n]+)")
# Multi-letter units only: a single letter after a number is more often a variable (``2m``) than metres.
_UNITS = (
    r"square|sq|cubic|cm|centimeters?|mm|millimeters?|meters?|km|kilometers?|inch(?:es)?|ft|feet|foot|"
    r"yards?|miles?|mph|kg|grams?|kilograms?|lbs?|pounds?|ounces?|oz|liters?|ml|sec|seconds?|minutes?|"
    r"hrs?|hours?|days?|weeks?|months?|years?|dollars?|cents?|units?|degrees?|radians?|ways|points|people|"
    r"students|books|marbles|apples|coins|times"
)
_TRAILING_UNITS = re.compile(r"(?<=[\d}).\s])\s*(?:(?:" + _UNITS + r")\b(?:\^\{?[23]\}?|\^[23])?\s*)+$")
_LEADING_VARIABLE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*=\s*(?=[^=]+$)")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (or ``\\boxed x``); None if absent/unclosed.

    A bare mention (``in \\boxed.``) is not a box and does not hide an earlier answer.
    """
    last = next(reversed(list(_BOX_START.finditer(text))), None)
    if last is None:
        return None
    if last.group(2) is not None:
        return last.group(2)
    depth = 0
    for j in range(last.start(1), len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[last.start(1) + 1 : j]
    return None


def extract_answer(solution: str) -> str | None:
    """The last boxed answer, else the last ``Answer:`` line in the response tail."""
    boxed = last_boxed(solution)
    if boxed is not None:
        return boxed
    matches = _ANSWER_LINE.findall(solution[-TAIL_CHARS:])
    return matches[-1].strip().strip("*").strip() if matches else None


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
    stripped = _TRAILING_UNITS.sub("", s).strip()
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
    """math-verify equivalence, inline and without its signal-based timeouts (the caller bounds time)."""
    from math_verify import parse, verify
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse("\\boxed{" + gold + "}", config, parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


_shared_pool: TimeoutPool | None = None
_shared_lock = threading.Lock()


def _pool() -> TimeoutPool:
    global _shared_pool
    if _shared_pool is None:
        _shared_pool = TimeoutPool(num_workers=1)
        atexit.register(_shared_pool.close)
    return _shared_pool


def verify_with_timeout(
    gold: str, pred: str, timeout_s: float | None = DEFAULT_VERIFY_TIMEOUT_S
) -> bool | None:
    """:func:`math_verify_equal` bounded by ``timeout_s``; None when it ran out of time.

    Inside a pool worker (or with ``timeout_s=None``) it runs inline: the enclosing task's limit applies.
    """
    if timeout_s is None or in_worker():
        try:
            return math_verify_equal(gold, pred)
        except Exception:  # math-verify raises on malformed LaTeX: not equal
            return False
    with _shared_lock:
        result = _pool().run(math_verify_equal, gold, pred, timeout_s=timeout_s)
    if result.timed_out:
        logger.warning("math-verify timed out after %.1fs on %r vs %r", timeout_s, pred[:80], gold[:80])
        return None
    if result.error is not None:
        raise RuntimeError(f"math-verify worker failed:\n{result.error}")
    return bool(result.value)


def math_compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    verify_timeout_s: float | None = DEFAULT_VERIFY_TIMEOUT_S,
) -> dict[str, Any]:
    """Default math reward: ``{"score": +1 | -1, "acc": bool, "pred": str, "timed_out": bool}``."""
    strict = strict_compute_score(data_source, solution_str, ground_truth, extra_info)
    raw = extract_answer(solution_str)
    if strict["acc"] or raw is None or not raw.strip():
        return {**strict, "timed_out": False}
    pred = normalize_answer(raw)
    correct = bool(pred) and pred == normalize_answer(ground_truth)
    timed_out = False
    if not correct and pred and len(raw) <= MAX_VERIFY_CHARS:
        verdict = verify_with_timeout(clean_answer(ground_truth), clean_answer(raw), verify_timeout_s)
        timed_out = verdict is None
        correct = bool(verdict)
    return {
        "score": CORRECT_SCORE if correct else WRONG_SCORE,
        "acc": correct,
        "pred": pred,
        "timed_out": timed_out,
    }
