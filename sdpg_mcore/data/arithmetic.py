"""The synthetic arithmetic task: problems, their worked responses, and SDPG records of them.

One generator serves the tiny example's data (``tools/prepare_data.py --synthetic arithmetic``), the
tiny model's warm start (``sdpg_mcore.train.warm_start``) and the algorithm benchmark's task
(``tools/bench_algos.py``), so the three draw the same problems from the same seed:

    rng = random.Random(0)
    question, answer = arithmetic_problem(rng)                          # one-digit a + b or a - b
    arithmetic_problem(rng, num_operands=3, max_operand=99, operators="+-*")
    write_arithmetic_task(out, {"train": 2048, "heldout": 64}, max_operand=4)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sdpg_mcore.data.records import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    REFERENCE_CONTEXT_TEMPLATE,
    TEACHER_CONTEXT_TOKEN,
)


def evaluate(operands: list[int], operators: list[str]) -> int:
    """Integer value with the usual precedence (``*`` before ``+``/``-``), without ``eval``."""
    terms, signs = [operands[0]], []
    for op, value in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(op)
    total = terms[0]
    for sign, term in zip(signs, terms[1:]):
        total = total + term if sign == "+" else total - term
    return total


def arithmetic_problem(
    rng: random.Random, *, num_operands: int = 2, max_operand: int = 9, operators: str = "+-"
) -> tuple[str, str]:
    """``(question, answer)`` of one problem ``What is a op b ...?``.

    The operands are uniform in ``[0, max_operand]``, the operators drawn from ``operators`` (a subset
    of ``+-*``); ``rng`` gives the operands first, then the operators. The caller checks the options
    (``num_operands >= 2``): the entry point that took them from a user names them best.
    """
    operands = [rng.randint(0, max_operand) for _ in range(num_operands)]
    ops = [rng.choice(operators) for _ in range(num_operands - 1)]
    expression = str(operands[0]) + "".join(f" {op} {value}" for op, value in zip(ops, operands[1:]))
    return f"What is {expression}?", str(evaluate(operands, ops))


def worked_response(question: str, answer: str) -> str:
    """The response a solver would write: the expression, its value, and the boxed answer."""
    expression = question.removeprefix("What is ").removesuffix("?")
    return f"{expression} = {answer}. The answer is \\boxed{{{answer}}}."


def arithmetic_record(
    question: str, answer: str, index: int, split: str, *, data_source: str = "math_dapo"
) -> dict:
    """One SDPG record (``tools/prepare_data.py``'s layout, the default instruction and the reference's
    teacher context) with the worked response in ``extra_info.reference_response`` for the mechanism
    probe (``sdpg_mcore.train.mechanism``)."""
    content = (
        DEFAULT_INSTRUCTION_TEMPLATE.format(question=question)
        + TEACHER_CONTEXT_TOKEN
        + "\n\n"
        + REFERENCE_CONTEXT_TEMPLATE.format(answer=answer)
    )
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {
            "index": index,
            "split": split,
            "question": question,
            "answer": answer,
            "reference_response": worked_response(question, answer),
        },
    }


def write_arithmetic_task(
    out: Path, sizes: dict[str, int], max_operand: int, seed: int = 1234
) -> dict[str, Path]:
    """``OUT/<split>.jsonl`` of :func:`arithmetic_record` s for each ``split: records`` of ``sizes``.

    Each split is its own seeded sample (``seed`` plus the split's position in ``sizes``): a held-out
    split holds unseen prompts of the same distribution, not unseen problems when the space is small.
    """
    paths = {}
    for offset, (split, num) in enumerate(sizes.items()):
        rng = random.Random(seed + offset)
        records = [
            arithmetic_record(*arithmetic_problem(rng, max_operand=max_operand), i, split) for i in range(num)
        ]
        path = out / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths[split] = path
    return paths
