"""The reward table: expected scores of the default (math-verify) and strict (reference) scorers."""

import sys
from pathlib import Path

import pytest

from sdpg_mcore.rewards import (
    boxed_score,
    compute_score,
    math_compute_score,
    resolve_reward_fn,
    score_math_answer,
)

sys.path.insert(0, str(Path(__file__).parent))
from trap_cases import CORRECT, TRAPS  # noqa: E402

# (response, ground truth, default score, reference boxed score)
CASES = [
    ("so the answer is \\boxed{42}.", "42", 1, 1),
    ("\\boxed{41}", "42", -1, -1),
    ("\\boxed{\\frac12}", "0.5", 1, -1),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1, -1),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1, -1),
    ("\\boxed{\\tfrac{1}{2}}", "\\frac12", 1, -1),
    ("\\boxed{\\frac{1}{2}}", "\\frac12", 1, 1),
    ("\\boxed{x = 3}", "3", 1, 1),
    ("\\boxed{x=3}", "3", 1, 1),
    ("\\boxed{30^\\circ}", "30", 1, 1),
    ("\\boxed{30^{\\circ}}", "30", 1, 1),
    ("\\boxed{5 \\text{ cm}}", "5", 1, 1),
    ("\\boxed{12 \\text{ dollars}}", "12", 1, 1),
    ("\\boxed{7 \\text{ students}}", "7", 1, 1),
    ("\\boxed{3 meters}", "3", 1, 1),
    ("\\boxed{42.}", "42", 1, -1),
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)", 1, -1),
    ("\\boxed{1,\\!000}", "1000", 1, 1),
    ("\\boxed{1,000}", "1000", 1, 1),
    ("\\boxed{.5}", "0.5", 1, -1),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1, -1),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1, -1),
    ("\\boxed{2\\pi}", "2\\pi", 1, 1),
    ("\\boxed{\\pi}", "3.14159", -1, -1),
    ("\\boxed{\\frac{3}{4}}", "\\frac{4}{3}", -1, -1),
    ("\\boxed{-7}", "7", -1, -1),
    ("The answer is 42.", "42", -1, -1),
    ("no box at all", "42", -1, -1),
    ("\\boxed{}", "42", -1, -1),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1, 1),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1, -1),
    ("\\boxed{\\frac{1}{\\frac{1}{2}}}", "2", 1, -1),
    ("first \\boxed{1} then \\boxed{2}", "2", 1, 1),
    ("first \\boxed{2} then \\boxed{1}", "2", -1, -1),
    ("\\fbox{42}", "42", 1, -1),
    ("\\boxed 42", "42", 1, -1),
    ("\\boxed 42 \\text{ or } 43", "42", -1, -1),
    ("\\boxed{0.1000004}", "0.1", -1, -1),
    ("\\boxed{7 \\mod 10}", "7", -1, -1),
    ("\\boxed{42}\n" + "filler " * 100 + "\nAnswer: 2", "42", -1, -1),
    ("\\boxed{42}\nAnswer: 2", "42", -1, 1),  # the reference takes the box; the final answer is 2
    ("\\boxed{42", "42", -1, -1),
    ("Answer: 42", "42", 1, 1),
    ("answer: \\frac12", "0.5", 1, -1),
    ("\\boxed{41}\nAnswer: 42", "42", 1, 1),
    ("\\boxed{" + "9" * 5000 + "}", "9", -1, -1),
    ("\\boxed{" + "+".join(["x"] * 2000) + "}", "2000x", -1, -1),
    ("\\boxed{42}" + " filler" * 200, "42", 1, -1),
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}", 1, -1),
    ("\\boxed{10\\%}", "10", 1, -1),
    ("\\boxed{\\$5}", "5", 1, 1),
    ("\\boxed{$5$}", "5", 1, 1),
    ("\\boxed{\\textbf{(B)}}", "B", 1, -1),
    ("\\boxed{B}", "B", 1, 1),
    ("\\boxed{2^{10}}", "1024", 1, -1),
    ("\\boxed{3.0}", "3", 1, -1),
    ("\\boxed{\\infty}", "\\infty", 1, 1),
    ("\\boxed{y = 2x + 1}", "2x+1", 1, 1),
]


def test_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("response", "truth", "default", "strict"), CASES, ids=[f"case{i}" for i in range(len(CASES))]
)
def test_default_and_strict_scores(response, truth, default, strict):
    result = math_compute_score("math_dapo", response, truth)
    assert result["score"] == default, result
    assert result["acc"] == (default == 1) and result["timed_out"] is False
    strict_result = boxed_score(response, truth)
    assert strict_result["score"] == strict, strict_result
    assert strict_result["acc"] == (strict == 1)
    assert score_math_answer("math_dapo", response, truth) == result  # the worker adds only the limit


def test_traps_are_rejected_and_correct_answers_kept():
    accepted_traps = [c for c in TRAPS if math_compute_score("math", *c)["score"] == 1.0]
    rejected_correct = [c for c in CORRECT if math_compute_score("math", *c)["score"] != 1.0]
    assert accepted_traps == [] and rejected_correct == []
    assert len(TRAPS) >= 20 and len(CORRECT) >= 40


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
