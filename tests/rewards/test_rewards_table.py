"""The reward table: expected scores of the default (math-verify) and strict (reference) scorers."""

import pytest

from sdpg_mcore.rewards import compute_score, math_compute_score, resolve_reward_fn, strict_compute_score

# (response, ground truth, default score, strict score)
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
    strict_result = strict_compute_score("math_dapo", response, truth)
    assert strict_result["score"] == strict, strict_result
    assert strict_result["acc"] == (strict == 1)
    # The default scorer accepts everything the reference accepts.
    assert not (strict == 1 and default != 1)


def test_registry_names_reach_the_same_scorers():
    response, truth = "\\boxed{\\frac12}", "0.5"
    assert compute_score("math_dapo", response, truth)["score"] == 1.0
    assert compute_score("aime24", response, truth)["score"] == 1.0  # prefix
    assert compute_score("some_new_source", response, truth)["score"] == 1.0  # default
    assert resolve_reward_fn("math_strict")("math_dapo", response, truth)["score"] == -1.0


def test_pred_reports_the_extracted_answer():
    assert math_compute_score("math", "so \\boxed{\\dfrac{1}{2}}.", "0.5")["pred"] == "\\frac{1}{2}"
    assert math_compute_score("math", "no box", "0.5")["pred"] == "[INVALID]"
    assert strict_compute_score("math", "\\boxed{7}", "8")["pred"] == "7"
