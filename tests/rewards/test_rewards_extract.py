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
        ("\\boxed 42 \\text{ or } 43", "42 \\text{ or } 43"),  # the whole expression, not its first token
        ("\\[\\boxed 7 \\]", "7"),
        ("\\boxed 3 then \\boxed{4}", "4"),
        ("\\boxed {8}", "8"),
        ("\\boxed{}", ""),
        ("\\boxed{unclosed", None),
        ("nothing", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_the_final_answer_wins():
    assert extract_answer("work\nAnswer: **12**\n") == "12"
    assert extract_answer("\\boxed{3}\nAnswer: 12") == "12"
    assert extract_answer("Answer: 12\nso \\boxed{3}") == "3"
    assert extract_answer("Answer: $\\boxed{7}$") == "7"
    assert extract_answer("\\boxed{3}\nAnswer: The final answer is 3.") == "3."
    assert extract_answer("\\boxed{3}\nAnswer: see above") == "3"  # prose does not hide the box
    assert extract_answer("\\boxed{3}\nAnswer: B") == "B"
    assert extract_answer("Answer: 5" + "x" * 600) is None  # Answer: lines only in the last 500 characters
    assert extract_answer("\\boxed{5}" + "x" * 600) == "5"  # boxes anywhere


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
