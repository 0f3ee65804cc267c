"""The synthetic arithmetic task: problems, worked responses the scorer reads, and records that load as
SDPG prompts."""

import json
import random

import pytest

from sdpg_mcore.data import PromptConfig, load_prompt_dataset
from sdpg_mcore.data.arithmetic import (
    arithmetic_problem,
    evaluate,
    problem_of,
    split_problems,
    worked_response,
    write_arithmetic_task,
    write_split_task,
)
from sdpg_mcore.rewards import last_boxed


def test_problems_are_deterministic_and_answered_with_precedence():
    draw = [
        arithmetic_problem(random.Random(3), num_operands=3, max_operand=99, operators="+-*") for _ in "ab"
    ]
    assert draw[0] == draw[1]
    rng = random.Random(0)
    for _ in range(200):
        question, answer = arithmetic_problem(rng, num_operands=3, max_operand=99, operators="+-*")
        expression = question.removeprefix("What is ").removesuffix("?")
        assert int(answer) == eval(expression)  # noqa: S307 - a generated integer expression
        assert all(0 <= int(x) <= 99 for x in expression.split()[::2])
    assert evaluate([2, 3, 4, 5], ["+", "*", "-"]) == 9


def test_one_digit_problems_cover_both_operators():
    rng = random.Random(1)
    problems = [arithmetic_problem(rng) for _ in range(100)]
    assert {q.split()[3] for q, _ in problems} == {"+", "-"}
    assert all(0 <= int(q.split()[2]) <= 9 and 0 <= int(q.split()[4][:-1]) <= 9 for q, _ in problems)


def test_the_scorers_box_parser_reads_the_worked_response():
    assert worked_response("What is 3 + 4?", "7") == "3 + 4 = 7. The answer is \\boxed{7}."
    assert last_boxed(worked_response("What is 1 - 3?", "-2")) == "-2"
    assert last_boxed("\\boxed{1} then \\boxed{-2}") == "-2" and last_boxed("no box") is None


def test_task_records_split_into_student_and_teacher_prompts(tmp_path, qwen_tokenizer):
    tok = qwen_tokenizer
    paths = write_arithmetic_task(tmp_path, {"train": 20, "heldout": 6}, max_operand=4)
    data = load_prompt_dataset([str(paths["heldout"])], tok, PromptConfig(max_prompt_length=96))
    assert len(data) == 6
    for i in range(len(data)):
        p = data.batch([i])[0]
        question, answer = p.extra_info["question"], p.extra_info["answer"]
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        assert 0 <= int(a) <= 4 and 0 <= int(b) <= 4
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert p.ground_truth == answer
        assert p.extra_info["reference_response"].endswith(f"\\boxed{{{answer}}}.")
        student, teacher = tok.decode(p.student_ids), tok.decode(p.teacher_ids)
        assert f"The correct answer to this problem is: {answer}" in teacher
        assert "correct answer" not in student and teacher.startswith(student.split("<|im_end|>")[0])
    train = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    held = [json.loads(x) for x in paths["heldout"].read_text().splitlines()]
    assert len(train) == 20 and [r["extra_info"]["question"] for r in train[:6]] != [
        r["extra_info"]["question"] for r in held
    ]


def test_problem_split_is_disjoint_seeded_and_covers_the_space():
    split = split_problems(max_operand=9, heldout_fraction=0.25, seed=3)
    assert len(split.heldout) == 50 and len(split.train) == 150
    assert not set(split.heldout) & set(split.train)
    space = {(a, op, b) for op in "+-" for a in range(10) for b in range(10)}
    assert set(split.heldout) | set(split.train) == space
    assert split == split_problems(max_operand=9, heldout_fraction=0.25, seed=3)
    assert split.heldout != split_problems(max_operand=9, heldout_fraction=0.25, seed=4).heldout
    assert problem_of((3, "-", 7)) == ("What is 3 - 7?", "-4")
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_problems(max_operand=1, heldout_fraction=0.0, seed=0)


def test_split_task_trains_on_no_held_out_problem(tmp_path):
    split = split_problems(max_operand=9, heldout_fraction=0.25, seed=1)
    paths = write_split_task(tmp_path, split, num_train=3000, num_seen=50, seed=1)
    questions = {
        name: [json.loads(x)["extra_info"]["question"] for x in path.read_text().splitlines()]
        for name, path in paths.items()
    }
    heldout = {problem_of(t)[0] for t in split.heldout}
    train = {problem_of(t)[0] for t in split.train}
    assert not heldout & set(questions["train"])
    assert set(questions["train"]) == train  # 3000 draws reach all 150 training problems
    assert sorted(questions["heldout"]) == sorted(heldout)
    assert len(set(questions["seen"])) == 50 and set(questions["seen"]) <= train
