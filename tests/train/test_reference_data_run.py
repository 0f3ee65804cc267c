"""A tiny run from a parquet file in the reference's own layout, with an over-long prompt in it.

The over-long prompt is dropped and reported (WARNING with the count); no teacher prompt loses its
privileged context or assistant header, whether over-long prompts are dropped or cut; the reference's
answer_format rewrite and its boxed scorer (``reward.strict``) run end to end.
"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sdpg_mcore.config import load_config
from sdpg_mcore.data import ANSWER_COLON_INSTRUCTION, REFERENCE_CONTEXT_TEMPLATE, TEACHER_CONTEXT_TOKEN
from sdpg_mcore.parallel.spawn import spawn_ranks

REPO = Path(__file__).resolve().parents[2]
MAX_PROMPT = 120
LONG_ROW = 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The parquet (cheap); the model directory is made only by the run that needs it."""
    root = tmp_path_factory.mktemp("refdata")
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--synthetic", "arithmetic", "--out",
         str(root / "syn"), "--format", "jsonl", "--num-train", "16", "--num-test", "0"],
        check=True, capture_output=True,
    )  # fmt: skip
    questions = [json.loads(line)["extra_info"] for line in (root / "syn" / "train.jsonl").open()]
    records = []
    for i, q in enumerate(questions):
        question = q["question"] + (" and 1" * 150 if i == LONG_ROW else "")
        context = "\n\n" + REFERENCE_CONTEXT_TEMPLATE.format(answer=q["answer"])
        records.append(
            {
                "data_source": "math_dapo",
                "prompt": [
                    {
                        "role": "user",
                        "content": f"{question} {ANSWER_COLON_INSTRUCTION}{TEACHER_CONTEXT_TOKEN}{context}",
                    }
                ],  # fmt: skip
                "ability": "MATH",
                "reward_model": {"ground_truth": q["answer"], "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": f"dapo-{i}"},
            }
        )
    pd.DataFrame(records).to_parquet(root / "math-dapo-teacher.parquet")
    return root


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
    tokenizer = build_tiny_tokenizer("qwen")  # the tiny model's tokenizer (tools/make_tiny_model.py)
    return load_prompts(cfg, cfg.data.train_files, tokenizer, needs_teacher=True), tokenizer


@pytest.mark.parametrize("filter_overlong", [True, False])
def test_no_teacher_prompt_loses_its_context(assets, tmp_path, filter_overlong):
    dataset, tok = _teacher_prompts(
        assets, tmp_path, f"data.filter_overlong_prompts={str(filter_overlong).lower()}"
    )
    indices = [dataset[i].index for i in range(len(dataset))]
    assert indices == [i for i in range(16) if not (filter_overlong and i == LONG_ROW)]
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


@pytest.mark.slow
def test_tiny_run_drops_and_reports_the_overlong_prompt(assets, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_model

    make_tiny_model.make_tiny_model(assets / "model", seed=0, sft_steps=3, batch_size=4, eval_prompts=2)
    log = tmp_path / "warnings.log"
    spawn_ranks(_train_logged, 1, args=(_overrides(assets, tmp_path / "run", "trainer.total_steps=2"), str(log)),
                timeout_s=300)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["num_responses"] == 8 and r["kl_mean"] > 0 for r in records)
    warnings = log.read_text()
    assert f"dropped 1 of 16 prompts longer than max_prompt_length={MAX_PROMPT}" in warnings, warnings
