"""Agreement of the strict scorer with the SDPG reference's own scores, case by case.

The cases: a deterministic generator of responses (:func:`generate`) and the listed table, trap and
correct cases, whose reference outcomes a fixture holds (``tests/rewards/fixtures/reference_scores.json``,
written by ``tests/make_reference_fixtures.py`` from a checkout of the reference). :func:`compare` scores
each with ``compute_score_strict`` and counts agreement per answer format and scorer;
``tools/check_reward_agreement.py`` prints it. The generator uses only the standard library, so the
fixture writer loads this file under the reference's own Python.
"""

from __future__ import annotations

import collections
import hashlib
import random
from collections.abc import Iterator

# Generated cases: the answer written in a box, on an ``Answer:`` line (same line, next line, bold,
# lower case), both, neither, several times, unclosed, brace-less, as ``#### n``; far from or near the
# end (the reference reads the last 300 / 500 characters); the ground truth equal, equivalent in
# another notation, or different. Deterministic for a seed.
ANSWERS = [
    "42",
    "-7",
    "0",
    "1000",
    "1,000",
    "12345",
    "3.5",
    "0.5",
    ".5",
    "0.1000004",
    "0.142857",
    "1.41421356",
    "\\frac{1}{2}",
    "\\frac12",
    "\\dfrac{3}{4}",
    "\\tfrac{1}{3}",
    "\\frac{\\sqrt{3}}{2}",
    "\\sqrt{2}",
    "\\sqrt2",
    "2\\sqrt{3}",
    "\\pi",
    "2\\pi",
    "\\frac{\\pi}{4}",
    "x^2+2x+1",
    "(x+1)^2",
    "(1, 2)",
    "\\left(1,2\\right)",
    "[0, 1)",
    "\\{1,2\\}",
    "x = 3",
    "y=2x+1",
    "5 \\text{ cm}",
    "12 dollars",
    "30^\\circ",
    "30^{\\circ}",
    "\\$5",
    "$5$",
    "10\\%",
    "\\text{(B)}",
    "B",
    "\\textbf{(C)}",
    "7 \\mod 10",
    "42 \\text{ or } 43",
    "1 \\text{ and } 2",
    "\\infty",
    "-\\infty",
    "2^{10}",
    "1024",
    "3.0",
    "e^{i\\pi}",
    "\\overline{AB}",
    "\\mbox{yes}",
    "a \\text{ m}",
    "4 square units",
    "\\boxed{9}",
    "9 = 9",
    "\\ldots",
    "1\\;000",
    "{,}5",
    '"no"',
    "an apple",
    "a 3",
    "8.$",
    "\\frac 12",
    "\\sqrt 5",
    "\\fracab",
    "",
]
EQUIVALENT = {
    "42": ["42.0", "42.", "\\text{42}", "$42$", "x = 42", "42 \\text{ ways}"],
    "0.5": ["\\frac{1}{2}", "\\frac12", ".5", "1/2"],
    "1000": ["1,000", "1,\\!000", "1000.0", "10^3"],
    "\\frac{1}{2}": ["0.5", "\\dfrac{1}{2}", "1/2"],
    "\\sqrt{2}": ["\\sqrt2", "2^{1/2}", "1.41421356"],
    "30": ["30^\\circ", "30^{\\circ}", "30 degrees"],
    "7": ["7 \\mod 10", "7.0", "07"],
}
GSM8K_TRUTHS = ["42", "-7", "1000", "3.5", "18", "0"]
SOURCES = [
    "math_dapo",
    "math",
    "math_dapo_reasoning",
    "aime24",
    "aime25",
    "amc23",
    "math_500",
    "HuggingFaceH4/MATH-500",
    "lighteval/MATH",
    "DigitalLearningGmbH/MATH-lighteval",
    "minerva-math",
    "olympiadbench",
    "openai/gsm8k",
]
UNKNOWN_SOURCES = ["my_dataset", "gsm8k", "MATH-500", ""]
FILLER = [
    "Let me think step by step. ",
    "We compute the sum carefully. ",
    "So $x = 3$ and $y = 4$. ",
    "Therefore the area is \\boxed{17} in the first case. ",
    "Answer: not yet.\n",
    "$$a^2+b^2=c^2$$\n",
    "Check: 2 + 2 = 4. ",
    "\\[ \\frac{1}{2} \\]\n",
    "#### 12\n",
    "The answer is 5.\n",
    "** ",
    "\n\n",
]


def _filler(rng: random.Random, chars: int) -> str:
    out = []
    while sum(map(len, out)) < chars:
        out.append(rng.choice(FILLER))
    return "".join(out)


def _placement(rng: random.Random, answer: str, other: str) -> str:
    kind = rng.randrange(20)
    forms = [
        f"\\boxed{{{answer}}}",
        f"Answer: {answer}",
        f"**Answer:** {answer}",
        f"Answer:\n{answer}",
        f"answer : {answer}",
        f"ANSWER:\t{answer}",
        f"Final Answer: $\\boxed{{{answer}}}$",
        f"\\boxed{{{other}}}\nAnswer: {answer}",
        f"Answer: {answer}\n\\boxed{{{other}}}",
        f"\\boxed{{{answer}}} and then \\boxed{{{other}}}",
        f"\\boxed{{{other}}} and then \\boxed{{{answer}}}",
        f"\\boxed{{{answer}",
        f"\\boxed {answer}",
        f"\\fbox{{{answer}}}",
        f"#### {answer}",
        f"The final answer is {answer}.",
        f"\\boxed{{\\boxed{{{answer}}}}}",
        f"Answer: **{answer}**",
        f"$\\boxed{{{answer}}}$.",
        f"Answer: {answer} (since \\boxed{{{other}}} was wrong)",
    ]
    return forms[kind]


def generate(n: int, seed: int = 0, sources: list[str] | None = None) -> Iterator[tuple[str, str, str]]:
    """``n`` triples ``(data_source, response, ground_truth)``."""
    rng = random.Random(seed)
    sources = sources or SOURCES
    for _ in range(n):
        data_source = rng.choice(sources)
        gsm8k = data_source == "openai/gsm8k"
        truth = rng.choice(GSM8K_TRUTHS if gsm8k else [a for a in ANSWERS if a] + list(EQUIVALENT))
        roll = rng.random()
        if roll < 0.55:
            answer = truth
        elif roll < 0.6 and truth in EQUIVALENT:
            answer = rng.choice(EQUIVALENT[truth])
        else:
            answer = rng.choice(ANSWERS)
        other = rng.choice(ANSWERS)
        body = f"#### {answer}" if gsm8k and rng.random() < 0.5 else _placement(rng, answer, other)
        before = _filler(rng, rng.choice([0, 50, 250, 450, 900]))
        after = _filler(rng, rng.choice([0] * 8 + [30, 120, 280, 480, 700]))
        yield data_source, before + body + after, truth


def case_digest(data_source: str, response: str, truth: str) -> str:
    """A short fingerprint of a generated case: the fixture stores it instead of the long response."""
    return hashlib.sha256("\x00".join((data_source, response, truth)).encode()).hexdigest()[:16]


def fixture_cases(fixture: dict) -> Iterator[tuple[str, str, str, dict]]:
    """``(data_source, response, truth, reference outcomes by format)`` of every case in a fixture.

    The generated cases are rebuilt with :func:`generate` from the fixture's ``n`` and ``seed`` and
    checked against its digests, so a changed generator cannot pass against stale outcomes.
    """
    for section in ("table", "traps", "correct"):
        for case in fixture.get(section, []):
            yield case["data_source"], case["response"], case["truth"], case["reference"]
    generated = fixture["generated"]
    cases = generate(generated["n"], generated["seed"], SOURCES + UNKNOWN_SOURCES)
    for (data_source, response, truth), stored in zip(cases, generated["cases"], strict=True):
        if case_digest(data_source, response, truth) != stored["digest"]:
            raise ValueError(
                "the case generator no longer produces the fixture's cases: regenerate the fixture "
                "with tests/make_reference_fixtures.py --only rewards"
            )
        yield data_source, response, truth, stored["reference"]


def outcome(fn, *args, **kwargs):
    """A scorer's result as JSON: its dict, a float, or the name of the exception it raised."""
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError:
        return "NotImplementedError"
    return result if isinstance(result, dict) else float(result)


def compare(fixture: dict, timeout_s: float | None) -> tuple[dict[str, collections.Counter], list[dict]]:
    """Counts per ``format/scorer`` (cases, agree, ref_correct) and the first 50 disagreements."""
    from sdpg_mcore.rewards import compute_score_strict

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    disagreements = []
    for data_source, response, truth, reference in fixture_cases(fixture):
        scorer = "unknown" if data_source in UNKNOWN_SOURCES else data_source.split("/")[0]
        for answer_format, ref in reference.items():
            ours = outcome(
                compute_score_strict,
                data_source,
                response,
                truth,
                answer_format=answer_format,
                timeout_s=timeout_s,
            )
            key = f"{answer_format}/{scorer}"
            counts[key]["cases"] += 1
            counts[key]["agree"] += ref == ours
            counts[key]["ref_correct"] += isinstance(ref, dict) and ref["acc"] or ref == 1.0
            if ref != ours and len(disagreements) < 50:
                disagreements.append(
                    {"data_source": data_source, "response": response, "truth": truth,
                     "answer_format": answer_format, "reference": ref, "ours": ours}
                )  # fmt: skip
    return counts, disagreements
