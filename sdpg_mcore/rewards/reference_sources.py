"""The reference's other two scorers, for the data sources it does not score with ``math_dapo``.

- ``gsm8k_score`` (``openai/gsm8k``): the last ``#### <number>`` within the last 300 characters,
  commas and ``$`` dropped, compared as a string: 1.0 if equal, else 0.0 (also without an answer).
- ``math_verify_score`` (MATH-500, MATH, Minerva, OlympiadBench): math-verify's ``math_metric`` with
  the gold in ``\\boxed{}`` and the prediction read from the whole response by expression or LaTeX
  extraction: 1.0 if equivalent, else 0.0, and 0.0 on any error — as the reference calls it,
  including math-verify's own signal-based timeouts (the caller adds the wall-clock limit).

Both keep the reference's 0/1 scale; with group-normalised advantages that is equivalent to ±1.
Checked against the reference's own outputs with the ``math_dapo`` scorers (``math_dapo.py``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

GSM8K_TAIL_CHARS = 300
_GSM8K_ANSWER = re.compile("#### (\\-?[0-9\\.\\,]+)")


def gsm8k_score(
    data_source: str | None, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None
) -> float:
    """Reference ``gsm8k.compute_score`` (method ``strict``): 1.0 or 0.0."""
    answers = _GSM8K_ANSWER.findall(solution_str[-GSM8K_TAIL_CHARS:])
    if not answers:
        return 0.0
    return 1.0 if answers[-1].replace(",", "").replace("$", "") == ground_truth else 0.0


def math_verify_score(
    data_source: str | None, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None
) -> float:
    """Reference ``math_verify.compute_score``: 1.0 if math-verify finds the response equivalent, else 0.0."""
    from math_verify.metric import math_metric
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    verify_func = math_metric(
        gold_extraction_target=(LatexExtractionConfig(),),
        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
    )
    try:
        score, _ = verify_func(["\\boxed{" + ground_truth + "}"], [solution_str])
    except Exception:  # the reference: any failure (no gold parsed, timeout, bad LaTeX) scores 0
        return 0.0
    return float(score)
