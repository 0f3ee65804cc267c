"""Trap answers the default scorer must reject, beside correct answers it must keep accepting.

Each entry is ``(response, ground_truth)``. ``TRAPS`` are wrong final answers that an equivalence
checker is tempted to accept; ``CORRECT`` are right answers in the notations models actually write.
"""

FILLER = "We work it out step by step. " * 25  # ~725 characters: pushes an early answer out of the tail

TRAPS = [
    # A brace-less box is one complete expression, not its first token.
    ("\\boxed 42 \\text{ or } 43", "42"),
    ("so $\\boxed 42 or 43$", "42"),
    ("\\boxed 7 \\mod 10", "7"),
    ("\\boxed -3 + x", "-3"),
    ("\\boxed 12 \\text{ and } 13", "12"),
    # Numbers match at the precision written, not at 6 decimals.
    ("\\boxed{0.1000004}", "0.1"),
    ("\\boxed{0.142857}", "\\frac{1}{7}"),
    ("\\boxed{1.41421356}", "\\sqrt{2}"),
    ("\\boxed{3.14159265}", "\\pi"),
    ("\\boxed{0.3333333}", "\\frac13"),
    ("\\boxed{2.0000001}", "2"),
    ("\\boxed{1.7320508}", "\\sqrt{3}"),
    ("\\boxed{0.6666667}", "\\frac{2}{3}"),
    ("Answer: 0.1000004", "0.1"),
    # Residues are not numbers.
    ("\\boxed{7 \\mod 10}", "7"),
    ("\\boxed{7 \\pmod{10}}", "7"),
    ("\\boxed{17 \\bmod 10}", "7"),
    ("Answer: 7 mod 10", "7"),
    # The final answer wins over an earlier one.
    ("\\boxed{42}\n" + FILLER + "\nAnswer: 2", "42"),
    ("\\boxed{42}\nWait, that is wrong.\nAnswer: 41", "42"),
    ("Answer: 42\n\\boxed{41}", "42"),
    ("\\boxed{\\frac12}\n" + FILLER + "Answer: 0.6", "0.5"),
    ("\\boxed{5}, no: \\boxed{6}", "5"),
    # Several answers are not one answer.
    ("\\boxed{42, 43}", "42"),
    ("\\boxed{42 \\text{ or } 43}", "42"),
    ("\\boxed{x = 42 \\text{ or } x = 43}", "42"),
]

CORRECT = [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac12}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{30^\\circ}", "30"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{12 \\text{ dollars}}", "12"),
    ("\\boxed{3 meters}", "3"),
    ("\\boxed{42.}", "42"),
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)"),
    ("\\boxed{1,\\!000}", "1000"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{.5}", "0.5"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{3.0}", "3"),
    ("\\boxed{10\\%}", "10"),
    ("\\boxed{\\$5}", "5"),
    ("\\boxed{\\textbf{(B)}}", "B"),
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}"),
    ("\\boxed{y = 2x + 1}", "2x+1"),
    ("\\boxed 42", "42"),
    ("\\boxed 5$.", "5"),
    ("$\\boxed 7$", "7"),
    ("\\fbox{42}", "42"),
    ("Answer: 42", "42"),
    ("answer: \\frac12", "0.5"),
    ("**Answer:** 42", "42"),
    ("Answer: $\\boxed{42}$", "42"),
    ("\\boxed{41}\nAnswer: 42", "42"),
    ("\\boxed{42}\nAnswer: 42", "42"),
    ("\\boxed{42}\nAnswer: The answer is 42.", "42"),
    ("\\boxed{42}\nAnswer: see the box above.", "42"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{42}" + " filler" * 200, "42"),
    ("\\boxed{0.125}", "\\frac18"),
    ("\\boxed{2.5}", "\\frac{5}{2}"),
    ("\\boxed{1.5}", "1.50"),
    ("\\boxed{0.333333333333333333}", "\\frac13"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{\\pi/4}", "\\frac{\\pi}{4}"),
    ("\\boxed{7 \\pmod{10}}", "7 \\pmod{10}"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("\\boxed{1.0 \\times 10^{3}}", "1000"),
]
