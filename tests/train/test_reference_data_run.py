"""A tiny run from a parquet file in the reference's own layout, with an over-long prompt in it.

The parquet's rows and what the reference's own dataset code made of them come from
``tests/data/fixtures/reference_prompts.json`` (written by ``tests/make_reference_fixtures.py``: the
sentinel and the answer-format instructions from the reference's ``RLHFDataset``, the context
template from its README, and ``RLHFDataset``'s output on these rows with the tiny tokenizer). Our
loader must give the same student prompt (the reference's ``raw_prompt`` under the chat template)
and the same teacher prompt ids. Where it departs on purpose the test says so: the over-long prompt
is dropped and reported (WARNING with the count), measured on the student and teacher prompts (the
reference measures the raw record, sentinel, context and the instruction it later rewrites included,
and at this limit drops every row); with filtering off the over-long teacher prompt keeps its
privileged context and assistant header (the reference cuts it from the right). The reference's
answer_format rewrite and its boxed scorer (``reward.strict``) run end to end.
"""

import json
from pathlib import Path

import pandas as pd
import pytest

from sdpg_mcore.config import load_config
from sdpg_mcore.data import (
    ANSWER_COLON_INSTRUCTION,
    BOXED_INSTRUCTION,
    REFERENCE_CONTEXT_TEMPLATE,
    TEACHER_CONTEXT_TOKEN,
)
from sdpg_mcore.parallel.spawn import spawn_ranks

REPO = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((REPO / "tests" / "data" / "fixtures" / "reference_prompts.json").read_text())
MAX_PROMPT = REFERENCE["max_prompt_length"]
LONG_ROW = REFERENCE["long_row"]
NUM_ROWS = len(REFERENCE["records"])


def _reference_run(max_prompt_length: int, filter_overlong: bool) -> dict[int, dict]:
    """The reference dataset's rows (by record number) for one setting of the fixture."""
    (run,) = [r for r in REFERENCE["runs"] if (r["max_prompt_length"], r["filter_overlong_prompts"]) ==
              (max_prompt_length, filter_overlong)]  # fmt: skip
    return {int(row["index"].removeprefix("dapo-")): row for row in run["rows"]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The parquet (cheap); the model directory is made only by the run that needs it."""
    root = tmp_path_factory.mktemp("refdata")
    pd.DataFrame(REFERENCE["records"]).to_parquet(root / "math-dapo-teacher.parquet")
    return root


def test_layout_strings_are_the_reference_s():
    strings = REFERENCE["strings"]
    assert TEACHER_CONTEXT_TOKEN == strings["sentinel"]
    assert ANSWER_COLON_INSTRUCTION == strings["answer_colon_instruction"]
    assert BOXED_INSTRUCTION == strings["boxed_instruction"]
    assert REFERENCE_CONTEXT_TEMPLATE == strings["context_template"]


def _overrides(assets, run_dir, *extra):
    return [
        f"model.path={assets / 'model'}",
        f"data.train_files=[{assets / 'math-dapo-teacher.parquet'}]",
        f"trainer.run_dir={run_dir}",
        f"data.max_prompt_length={MAX_PROMPT}",
        "data.batch_prompts=4",
        "data.mini_batch_prompts=2",
        "rollout.n=2",
        "reward.strict=true",
        "reward.answer_format=boxed",
        "algorithm.kl_exclude_eos=true",
        "logging.progress=false",
        "logging.tensorboard=false",
        *extra,
    ]


def _train_logged(rank, world_size, overrides, log_path):
    import logging

    handler = logging.FileHandler(log_path)
    handler.setLevel(logging.WARNING)
    logging.getLogger("sdpg_mcore").addHandler(handler)
    from sdpg_mcore.train.trainer import train

    return train(load_config(REPO / "examples" / "tiny" / "sdpg.yaml", overrides))


def _teacher_prompts(assets, tmp_path, *extra):
    from sdpg_mcore.data.tiny_tokenizer import build_tiny_tokenizer
    from sdpg_mcore.train.trainer import load_prompts

    cfg = load_config(REPO / "examples" / "tiny" / "sdpg.yaml", _overrides(assets, tmp_path / "x", *extra))
    tokenizer = build_tiny_tokenizer("qwen")  # the tiny model's tokenizer (sdpg_mcore.train.warm_start)
    return load_prompts(cfg, cfg.data.train_files, tokenizer, needs_teacher=True), tokenizer


@pytest.mark.parametrize("filter_overlong", [True, False])
def test_no_teacher_prompt_loses_its_context(assets, tmp_path, filter_overlong):
    dataset, tok = _teacher_prompts(
        assets, tmp_path, f"data.filter_overlong_prompts={str(filter_overlong).lower()}"
    )
    indices = [dataset[i].index for i in range(len(dataset))]
    assert indices == [i for i in range(NUM_ROWS) if not (filter_overlong and i == LONG_ROW)]
    assert dataset.stats.num_filtered == int(filter_overlong)
    marker = "QUESTION_END"
    chat_suffix = tok.apply_chat_template(
        [{"role": "user", "content": marker}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=True,
    ).split(marker)[1]  # end of the user turn + the assistant header
    assert "assistant" in chat_suffix
    for i in range(len(dataset)):
        sample = dataset[i]
        teacher, student = tok.decode(sample.teacher_ids), tok.decode(sample.student_ids)
        context = REFERENCE_CONTEXT_TEMPLATE.format(answer=sample.ground_truth)
        assert teacher.endswith(context + chat_suffix), teacher[-200:]
        assert student.endswith("for example \\boxed{42}." + chat_suffix), student[
            -200:
        ]  # answer_format=boxed
        assert "Answer: $Answer" not in teacher and "correct answer" not in student
        assert len(sample.teacher_ids) <= MAX_PROMPT and len(sample.student_ids) <= MAX_PROMPT
    if not filter_overlong:
        assert dataset.stats.num_student_truncated == dataset.stats.num_teacher_truncated == 1
    _compare_with_the_reference(dataset, tok, filter_overlong)


def _compare_with_the_reference(dataset, tok, filter_overlong: bool) -> None:
    """Same student and teacher prompts as the reference's dataset, except where we differ on purpose."""
    # The reference's filter at this limit drops every row (it counts the raw record); at 160 it keeps
    # the rows we keep.
    assert _reference_run(MAX_PROMPT, True) == {}
    assert sorted(_reference_run(160, True)) == [i for i in range(NUM_ROWS) if i != LONG_ROW]
    reference = _reference_run(MAX_PROMPT, False) if not filter_overlong else _reference_run(160, True)
    for i in range(len(dataset)):
        sample, ref = dataset[i], reference[dataset[i].index]
        student = tok.apply_chat_template(
            ref["raw_prompt"], add_generation_prompt=True, enable_thinking=True, return_dict=False
        )
        if sample.index != LONG_ROW:
            assert sample.student_ids == student and sample.teacher_ids == ref["teacher_ids"]
            continue
        # The long row, kept uncut by the reference's dataset: we cut its student prompt from the left,
        # and its teacher prompt from the left of the question; the reference cut the teacher prompt
        # from the right, losing the privileged context and the assistant header.
        assert len(student) > MAX_PROMPT and sample.student_ids == student[-MAX_PROMPT:]
        assert len(ref["teacher_ids"]) == MAX_PROMPT and "correct answer" not in ref["teacher_text"]
        assert (
            ref["teacher_text"].startswith(tok.decode(student[:40]))
            and "assistant" not in ref["teacher_text"]
        )


@pytest.mark.slow
def test_tiny_run_drops_and_reports_the_overlong_prompt(assets, tmp_path):
    from sdpg_mcore.train.warm_start import warm_start_tiny_model

    warm_start_tiny_model(assets / "model", seed=0, sft_steps=3, batch_size=4, eval_prompts=2)
    log = tmp_path / "warnings.log"
    spawn_ranks(_train_logged, 1, args=(_overrides(assets, tmp_path / "run", "trainer.total_steps=2"), str(log)),
                timeout_s=300)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["num_responses"] == 8 and r["kl_mean"] > 0 for r in records)
    warnings = log.read_text()
    assert f"dropped 1 of 16 prompts longer than max_prompt_length={MAX_PROMPT}" in warnings, warnings
