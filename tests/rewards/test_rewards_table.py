"""The reward table: the default (math-verify) scorer's scores, and the strict scorer against the reference.

The default scores are written by hand (``trap_cases.TABLE``): they are this project's choice. The
reference's scores are not: they are what its own ``default_compute_score`` returned for each row
(``fixtures/reference_scores.json``, written by ``tests/make_reference_fixtures.py`` from a checkout of
the reference), and the strict scorer must return the same dict (score, acc and pred). Where the two
scorers disagree the difference is intended (the default compares answers symbolically and takes the
final answer); the tests below list it rather than hide it.
"""

import json
from pathlib import Path

import pytest
from trap_cases import CORRECT, TABLE, TRAPS

from sdpg_mcore.rewards import (
    boxed_score,
    compute_score,
    math_compute_score,
    resolve_reward_fn,
    score_math_answer,
)

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "reference_scores.json").read_text())
REGENERATE = "regenerate it: see tests/make_reference_fixtures.py (--only rewards)"


def _reference_outcomes(section: str, answer_format: str) -> dict[tuple[str, str], dict]:
    return {(c["response"], c["truth"]): c["reference"][answer_format] for c in REFERENCE[section]}


REFERENCE_BOXED = _reference_outcomes("table", "boxed")
ROWS = [
    (response, truth, default, REFERENCE_BOXED.get((response, truth))) for response, truth, default in TABLE
]


def test_table_is_large_enough_and_every_row_has_the_reference_score():
    assert len(TABLE) >= 40
    missing = [(response, truth) for response, truth, _, reference in ROWS if reference is None]
    assert missing == [], f"rows missing from fixtures/reference_scores.json; {REGENERATE}"


@pytest.mark.parametrize(
    ("response", "truth", "default", "reference"), ROWS, ids=[f"case{i}" for i in range(len(ROWS))]
)
def test_default_and_strict_scores(response, truth, default, reference):
    result = math_compute_score("math_dapo", response, truth)
    assert result["score"] == default, result
    assert result["acc"] == (default == 1) and result["timed_out"] is False
    assert boxed_score(response, truth) == reference  # the reference's own dict, pred included
    assert score_math_answer("math_dapo", response, truth) == result  # the worker adds only the limit


def test_where_the_default_scorer_departs_from_the_reference():
    """Rows the default accepts and the reference's boxed scorer rejects are equivalent notations its
    string comparison misses; the one row it rejects and the reference accepts has a box followed by
    a different final answer (the default takes the final answer, the reference the box)."""
    accepted_only_by_default = [(r, t) for r, t, d, ref in ROWS if d == 1 and ref["score"] == -1.0]
    rejected_only_by_default = [(r, t) for r, t, d, ref in ROWS if d == -1 and ref["score"] == 1.0]
    assert rejected_only_by_default == [("\\boxed{42}\nAnswer: 2", "42")]
    assert ("\\boxed{\\frac12}", "0.5") in accepted_only_by_default
    assert len(accepted_only_by_default) == 20
    agree = sum(d == ref["score"] for _, _, d, ref in ROWS)
    assert agree + len(accepted_only_by_default) + len(rejected_only_by_default) == len(ROWS)


def test_traps_are_rejected_and_correct_answers_kept():
    accepted_traps = [c for c in TRAPS if math_compute_score("math", *c)["score"] == 1.0]
    rejected_correct = [c for c in CORRECT if math_compute_score("math", *c)["score"] != 1.0]
    assert accepted_traps == [] and rejected_correct == []
    assert len(TRAPS) >= 20 and len(CORRECT) >= 40
    # The reference's boxed scorer (fixture): it accepts a box or an Answer: line, whichever matches,
    # so two traps with a correct answer followed by a different one pass; it rejects 28 of the
    # correct answers, written in notations its string comparison does not equate.
    reference_traps = [pair for pair, ref in _reference_outcomes("traps", "boxed").items() if ref["acc"]]
    assert reference_traps == [
        ("\\boxed{42}\nWait, that is wrong.\nAnswer: 41", "42"),
        ("Answer: 42\n\\boxed{41}", "42"),
    ]
    reference_correct = _reference_outcomes("correct", "boxed")
    assert len(reference_correct) == len(CORRECT)
    assert sum(not ref["acc"] for ref in reference_correct.values()) == 28


def test_registry_names_reach_the_same_scorers():
    response, truth = "\\boxed{\\frac12}", "0.5"
    assert compute_score("math_dapo", response, truth)["score"] == 1.0
    assert compute_score("aime24", response, truth)["score"] == 1.0  # prefix
    assert compute_score("some_new_source", response, truth)["score"] == 1.0  # default
    assert (
        resolve_reward_fn("math_strict", answer_format="boxed")("math_dapo", response, truth)["score"] == -1.0
    )


def test_pred_reports_the_extracted_answer():
    assert math_compute_score("math", "so \\boxed{\\dfrac{1}{2}}.", "0.5")["pred"] == "\\frac{1}{2}"
    assert math_compute_score("math", "no box", "0.5")["pred"] == "[INVALID]"
    assert boxed_score("\\boxed{7}", "8")["pred"] == "7"
