"""Check ``compute_score_strict`` against the SDPG reference's own scoring code on generated responses.

The reference (its verl fork, ``verl/utils/reward_score/``) is not part of this repository: copy its
``__init__.py``, ``math_dapo.py``, ``gsm8k.py`` and ``math_verify.py`` into a directory (the
``deprecated`` import of ``__init__.py`` may be stubbed) and pass it as ``--reference``. Every case
is scored by the reference's ``default_compute_score(..., answer_format=F)`` and by ours for both
formats; results (score, acc, pred — or the exception for an unknown source) must be identical.

    python tools/check_reward_agreement.py --reference /tmp/refscore --cases 6000
    python tools/check_reward_agreement.py --reference /tmp/refscore --cases 500 --timeout-s 10   # via the worker
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sdpg_mcore.rewards import compute_score_strict

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


def load_reference(directory: Path):
    init = directory / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "refscore", init, submodule_search_locations=[str(directory)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["refscore"] = module
    spec.loader.exec_module(module)
    return module.default_compute_score


def _outcome(fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError:
        return "NotImplementedError"
    return result if isinstance(result, dict) else float(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", type=Path, required=True, help="directory with the reference's reward_score files"
    )
    parser.add_argument(
        "--cases", type=int, default=6000, help="generated responses (each scored in both formats)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout-s", type=float, default=None, help="score ours in the reward worker under this limit"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write counts and the first disagreements here"
    )
    args = parser.parse_args()
    reference = load_reference(args.reference)
    cases = list(generate(args.cases, args.seed, SOURCES + UNKNOWN_SOURCES))
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    disagreements = []
    start = time.monotonic()
    for data_source, response, truth in cases:
        scorer = "unknown" if data_source in UNKNOWN_SOURCES else data_source.split("/")[0]
        for answer_format in ("answer_colon", "boxed"):
            ref = _outcome(reference, data_source, response, truth, answer_format=answer_format)
            ours = _outcome(
                compute_score_strict,
                data_source,
                response,
                truth,
                answer_format=answer_format,
                timeout_s=args.timeout_s,
            )
            key = f"{answer_format}/{scorer}"
            counts[key]["cases"] += 1
            counts[key]["agree"] += ref == ours
            counts[key]["ref_correct"] += isinstance(ref, dict) and ref["acc"] or ref == 1.0
            if ref != ours and len(disagreements) < 50:
                disagreements.append(
                    {
                        "data_source": data_source,
                        "response": response,
                        "truth": truth,
                        "answer_format": answer_format,
                        "reference": ref,
                        "ours": ours,
                    }
                )
    total = sum(c["cases"] for c in counts.values())
    agree = sum(c["agree"] for c in counts.values())
    print(f"{'format/scorer':38s} {'cases':>6s} {'agree':>6s} {'ref correct':>11s}")
    for key in sorted(counts):
        c = counts[key]
        print(f"{key:38s} {c['cases']:6d} {c['agree']:6d} {c['ref_correct']:11d}")
    print(f"{'total':38s} {total:6d} {agree:6d}   ({time.monotonic() - start:.0f} s)")
    for d in disagreements[:5]:
        print("DISAGREE", json.dumps(d)[:400])
    if args.json:
        args.json.write_text(
            json.dumps(
                {"total": total, "agree": agree, "counts": counts, "disagreements": disagreements},
                indent=1,
                default=str,
            )
        )
    return 0 if agree == total else 1


if __name__ == "__main__":
    sys.exit(main())
