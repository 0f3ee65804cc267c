"""The synthetic arithmetic task: problems, their worked responses, and SDPG records of them.

One generator serves the tiny example's data (``tools/prepare_data.py --synthetic arithmetic``), the
tiny model's warm start (``sdpg_mcore.train.warm_start``) and the algorithm benchmark's task
(``tools/bench_algos.py``), so the three draw the same problems from the same seed:

    rng = random.Random(0)
    question, answer = arithmetic_problem(rng)                          # one-digit a + b or a - b
    arithmetic_problem(rng, num_operands=3, max_operand=99, operators="+-*")
    write_arithmetic_task(out, {"train": 2048, "heldout": 64}, max_operand=4)

The benchmark splits by *problem*, not by prompt: :func:`split_problems` holds out a seeded share of
the ``(a, op, b)`` triples, and :func:`write_split_task` writes training data from the others only,
the held-out problems (never trained on, nor in the warm start) and a sample of the training problems:

    split = split_problems(max_operand=9, heldout_fraction=0.25, seed=0)   # 150 train, 50 held out
    write_split_task(out, split, num_train=2048, num_seen=50, seed=0)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
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


Triple = tuple[int, str, int]
"""One two-operand problem ``(a, op, b)``: ``What is a op b?``."""


def problem_of(triple: Triple) -> tuple[str, str]:
    """``(question, answer)`` of one triple, worded as :func:`arithmetic_problem` words it."""
    a, op, b = triple
    return f"What is {a} {op} {b}?", str(evaluate([a, b], [op]))


@dataclass(frozen=True)
class ProblemSplit:
    """Disjoint training and held-out problems of one problem space."""

    train: tuple[Triple, ...]
    """Problems the training data and the warm start draw from."""
    heldout: tuple[Triple, ...]
    """Problems no training row or warm-start row holds: accuracy on them is generalisation."""


def split_problems(
    *, max_operand: int, heldout_fraction: float, seed: int, operators: str = "+-"
) -> ProblemSplit:
    """Hold out ``round(heldout_fraction * |space|)`` of the triples ``(a, op, b)``, operands in
    ``[0, max_operand]``, chosen by ``random.Random(seed)`` (a seeded rule: the same seed, the same
    split). Both parts come back sorted."""
    space = [(a, op, b) for op in operators for a in range(max_operand + 1) for b in range(max_operand + 1)]
    num_heldout = round(heldout_fraction * len(space))
    if not 0 < num_heldout < len(space):
        raise ValueError(
            f"heldout_fraction={heldout_fraction} holds out {num_heldout} of {len(space)} problems; "
            "choose a share that leaves both parts non-empty"
        )
    heldout = set(random.Random(seed).sample(space, num_heldout))
    return ProblemSplit(
        train=tuple(sorted(t for t in space if t not in heldout)), heldout=tuple(sorted(heldout))
    )


def write_split_task(
    out: Path, split: ProblemSplit, *, num_train: int, num_seen: int, seed: int
) -> dict[str, Path]:
    """``OUT/train.jsonl`` (``num_train`` rows drawn from ``split.train``), ``OUT/heldout.jsonl`` (every
    held-out problem once) and ``OUT/seen.jsonl`` (``num_seen`` distinct training problems), all from
    ``random.Random(seed)``."""
    rng = random.Random(seed)
    rows = {
        "train": [rng.choice(split.train) for _ in range(num_train)],
        "heldout": list(split.heldout),
        "seen": rng.sample(split.train, min(num_seen, len(split.train))),
    }
    paths = {}
    for name, triples in rows.items():
        records = [arithmetic_record(*problem_of(t), i, name) for i, t in enumerate(triples)]
        paths[name] = out / f"{name}.jsonl"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        # Atomic: a benchmark rewrites the files while runs of another invocation may be reading them.
        tmp = paths[name].with_name(f".{name}.jsonl.{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, paths[name])
    return paths
