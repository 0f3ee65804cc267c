"""Answer extraction and normalisation of the default math scorer."""

import pytest

from sdpg_mcore.rewards import clean_answer, extract_answer, last_boxed, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{42}", "42"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\fbox{3}", "3"),
        ("\\boxed 5$.", "5"),
        ("\\boxed {8}", "8"),
        ("\\boxed{}", ""),
        ("\\boxed{unclosed", None),
        ("nothing", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_answer_line_fallback_only_without_a_box():
    assert extract_answer("work\nAnswer: **12**\n") == "12"
    assert extract_answer("\\boxed{3}\nAnswer: 12") == "3"
    assert extract_answer("Answer: 5" + "x" * 600) is None  # only the last 500 characters


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("1,\\!000", "1000"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("5 \\text{ cm}", "5"),
        ("5 \\text{cm}^2", "5"),
        ("12 square meters", "12"),
        ("42.", "42"),
        ("x = 3", "3"),
        ("\\theta = \\pi", "\\pi"),
        ("$5$", "5"),
        (".5", "0.5"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("2m", "2m"),  # a single letter is a variable, not metres
        ("x = y = 3", "x=y=3"),  # only a single leading assignment is dropped
        ("\\boxed{7}", "7"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_clean_keeps_spaces_latex_needs():
    assert clean_answer("2 \\pi r") == "2 \\pi r"
    assert normalize_answer("2 \\pi r") == "2\\pir"


def test_a_bare_mention_of_boxed_does_not_hide_the_answer():
    assert last_boxed("so \\boxed{5}. I wrote it in \\boxed as asked.") == "5"
    assert last_boxed("\\boxedfoo{3}") is None
