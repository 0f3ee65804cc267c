"""tools/prepare_data.py: raw and synthetic data in the record format, loaded back by the trainer's loader."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sdpg_mcore.data import ANSWER_COLON_INSTRUCTION, TEACHER_CONTEXT_TOKEN, PromptConfig, load_prompt_dataset
from sdpg_mcore.data.tiny_tokenizer import build_tiny_tokenizer
from sdpg_mcore.rewards import compute_score

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_data.py"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer("qwen")


def run(argv, capsys):
    """The command's exit status, stdout and stderr (``capsys``: the tests' old in-process signature)."""
    proc = subprocess.run([sys.executable, str(TOOL), *argv], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_synthetic_arithmetic_loads_back_and_fits_the_tiny_model(tmp_path, capsys, tokenizer):
    code, out, _ = run(
        [
            "--synthetic",
            "arithmetic",
            "--out",
            str(tmp_path),
            "--num-train",
            "40",
            "--num-test",
            "8",
            "--num-operands",
            "3",
            "--max-digits",
            "2",
            "--operators",
            "+-*",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["splits"]["train"]["records"] == 40 and summary["splits"]["test"]["records"] == 8
    train = load_prompt_dataset(tmp_path / "train.parquet", tokenizer, PromptConfig(max_prompt_length=200))
    assert len(train) == 40 and train.stats.num_filtered == 0
    for i in range(len(train)):
        sample = train[i]
        question = sample.extra_info["question"]
        # The answer is the true value of the expression (with * before +/-).
        assert sample.ground_truth == str(eval(question.removeprefix("What is ").removesuffix("?")))
        student, teacher = tokenizer.decode(sample.student_ids), tokenizer.decode(sample.teacher_ids)
        assert question in student and "correct answer" not in student
        assert f"The correct answer to this problem is: {sample.ground_truth}\n" in teacher
        assert len(question.split()) == 2 + 2 * 3 - 1
        # A correct boxed response scores +1 with the default reward for this data_source.
        assert (
            compute_score(sample.data_source, f"\\boxed{{{sample.ground_truth}}}", sample.ground_truth)[
                "score"
            ]
            == 1
        )
    assert max(train.teacher_lengths()) < 200  # tiny models have 256 positions
    # Same seed, same data; another seed, other data.
    run(
        [
            "--synthetic",
            "arithmetic",
            "--out",
            str(tmp_path / "again"),
            "--num-train",
            "40",
            "--num-test",
            "8",
            "--num-operands",
            "3",
            "--max-digits",
            "2",
            "--operators",
            "+-*",
        ],
        capsys,
    )
    assert pd.read_parquet(tmp_path / "again" / "train.parquet").equals(
        pd.read_parquet(tmp_path / "train.parquet")
    )


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_raw_files_with_custom_columns_and_split(tmp_path, capsys, tokenizer, suffix):
    frame = pd.DataFrame(
        {"problem": [f"Compute {i} + {i}." for i in range(10)], "final": [2 * i for i in range(10)]}
    )
    raw = tmp_path / f"raw.{suffix}"
    {
        "csv": lambda: frame.to_csv(raw, index=False),
        "jsonl": lambda: frame.to_json(raw, orient="records", lines=True),
        "parquet": lambda: frame.to_parquet(raw),
    }[suffix]()
    code, out, _ = run(
        [
            "--input",
            str(raw),
            "--question-key",
            "problem",
            "--answer-key",
            "final",
            "--test-size",
            "0.2",
            "--out",
            str(tmp_path / "out"),
            "--format",
            "jsonl",
            "--data-source",
            "my_math",
            "--instruction-template",
            "Q: {question}",
            "--context-separator",
            " ",
            "--context-template",
            "Hint: {answer}",
            "--system-prompt",
            "Be exact.",
        ],
        capsys,
    )
    assert code == 0 and "train" in out and "test" in out  # the table
    train = load_prompt_dataset(tmp_path / "out" / "train.jsonl", tokenizer, PromptConfig())
    test = load_prompt_dataset(tmp_path / "out" / "test.jsonl", tokenizer, PromptConfig())
    assert len(train) == 8 and len(test) == 2
    questions = {train[i].extra_info["question"] for i in range(8)} | {
        test[i].extra_info["question"] for i in range(2)
    }
    assert questions == set(frame["problem"])
    record = json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0])
    q, a = record["extra_info"]["question"], record["extra_info"]["answer"]
    assert record["prompt"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": f"Q: {q}{TEACHER_CONTEXT_TOKEN} Hint: {a}"},
    ]
    assert record["data_source"] == "my_math" and record["reward_model"]["ground_truth"] == a == str(int(a))


def test_no_teacher_context_and_boxed_extraction(tmp_path, capsys, tokenizer):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(
        "".join(
            json.dumps({"question": f"q{i}", "answer": f"so \\boxed{{\\frac{{{i}}}{{2}}}}"}) + "\n"
            for i in range(3)
        )
    )
    code, _, _ = run(
        [
            "--input",
            str(raw),
            "--extract-boxed-answer",
            "--no-teacher-context",
            "--out",
            str(tmp_path),
            "--no-shuffle",
        ],
        capsys,
    )
    assert code == 0
    frame = pd.read_parquet(tmp_path / "train.parquet")
    assert [r["ground_truth"] for r in frame["reward_model"]] == [
        "\\frac{0}{2}",
        "\\frac{1}{2}",
        "\\frac{2}{2}",
    ]
    assert not any(TEACHER_CONTEXT_TOKEN in p[0]["content"] for p in frame["prompt"])
    ds = load_prompt_dataset(
        tmp_path / "train.parquet", tokenizer, PromptConfig(missing_sentinel="no_teacher_context")
    )
    assert ds[1].student_ids == ds[1].teacher_ids and ds.stats.num_without_teacher_context == 3


@pytest.mark.parametrize(
    ("content", "args", "problem"),
    [
        ("question,answer\nq1,1\nq2,\n", [], r"raw.csv, record 1, field 'answer': empty answer"),
        ("question,answer\n,1\n", [], r"raw.csv, record 0, field 'question': empty question"),
        ("q,answer\nx,1\n", [], r"raw.csv, field 'question': missing column; found \['q', 'answer'\]"),
        ("question,answer\nq,1\n", ["--instruction-template", "no placeholder"], "must contain {question}"),
        ("question,answer\nq,1\n", ["--context-template", "{ans}"], "--context-template: only {answer}"),
        ("question,answer\nq,1\n", ["--test-size", "1"], "leaves no training rows"),
    ],
)
def test_bad_input_is_reported_with_file_record_and_field(tmp_path, capsys, content, args, problem):
    raw = tmp_path / "raw.csv"
    raw.write_text(content)
    code, _, err = run(["--input", str(raw), "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2
    assert re.search(problem, err), err


def test_unreadable_and_missing_files(tmp_path, capsys):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    code, _, err = run(["--input", str(tmp_path / "bad.parquet"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "bad.parquet: unreadable" in err
    code, _, err = run(["--input", str(tmp_path / "none.csv"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "none.csv: file does not exist" in err


def test_dry_run_writes_nothing(tmp_path, capsys):
    code, out, _ = run(["--synthetic", "arithmetic", "--out", str(tmp_path / "d"), "--dry-run"], capsys)
    assert code == 0 and "dry run" in out and not (tmp_path / "d").exists()


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True)
    # argparse's layout: an option's flags two spaces in, its help on the same line after two or more
    # spaces, or on the next, more deeply indented line.
    lines = result.stdout.splitlines()
    options = [(i, line) for i, line in enumerate(lines) if re.match(r"  -", line)]
    assert len(options) >= 25  # every option of every group
    for i, line in options:
        flags = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        has_help = len(flags) == 2 or re.match(r"\s{10,}\S", lines[i + 1]) is not None
        assert has_help or "--help" in line, f"{line.strip()} has no help text"
    code, _, err = run(["--out", "x"], None)  # neither --input nor --synthetic
    assert code == 2 and "give exactly one of --input FILE... or --synthetic arithmetic" in err


REFERENCE_PROMPTS = ROOT / "tests" / "data" / "fixtures" / "reference_prompts.json"
REFERENCE_STRINGS = json.loads(REFERENCE_PROMPTS.read_text())["strings"]


def _reference_layout_file(path):
    """A parquet in the reference's own layout (its sentinel and instruction, from the reference's
    ``RLHFDataset``: ``tests/data/fixtures/reference_prompts.json``): one record with its sentinel, one
    (verl) without."""
    instruction, sentinel = REFERENCE_STRINGS["answer_colon_instruction"], REFERENCE_STRINGS["sentinel"]
    records = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"Solve 2+2. {instruction}{sentinel}\n\nIt is 4."}],
            "ability": "MATH",
            "reward_model": {"ground_truth": "4", "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "a-1"},
        },
        {
            "data_source": "aime24",
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Solve 3+4. {instruction}"},
            ],
            "ability": "MATH",
            "reward_model": {"ground_truth": "7", "style": "rule"},
            "extra_info": {"index": "b-2"},
        },
    ]
    pd.DataFrame(records).to_parquet(path)


def test_reference_layout_input_is_read_as_records(tmp_path, capsys, tokenizer):
    src = tmp_path / "dapo.parquet"
    _reference_layout_file(src)
    code, out, err = run(
        ["--input", str(src), "--no-shuffle", "--out", str(tmp_path / "o"), "--answer-format", "boxed"],
        capsys,
    )
    assert code == 0, err
    written = pd.read_parquet(tmp_path / "o" / "train.parquet")
    assert list(written["data_source"]) == ["math_dapo", "aime24"]  # kept: they pick the scorer
    first, second = (list(p) for p in written["prompt"])
    assert first[0]["content"].count(TEACHER_CONTEXT_TOKEN) == 1 and first[0]["content"].endswith("It is 4.")
    assert second[0] == {"role": "system", "content": "Be brief."}
    # the context the tool adds is the reference README's template (fixture), after a blank line
    context = REFERENCE_STRINGS["context_template"].format(answer="7")
    assert second[1]["content"].endswith(REFERENCE_STRINGS["sentinel"] + "\n\n" + context)
    for message in (first[0], second[1]):
        assert ANSWER_COLON_INSTRUCTION not in message["content"]
        assert "\\boxed{42}" in message["content"]
    assert [e["index"] for e in written["extra_info"]] == [0, 1]
    loaded = load_prompt_dataset(
        tmp_path / "o" / "train.parquet", tokenizer, PromptConfig(max_prompt_length=400)
    )
    assert [loaded[i].ground_truth for i in range(2)] == ["4", "7"]
    assert "correct answer to this problem is: 7" in tokenizer.decode(loaded[1].teacher_ids)
    # GRPO data from the same file: the context (existing or not) is not written.
    run(["--input", str(src), "--no-shuffle", "--out", str(tmp_path / "g"), "--no-teacher-context"], capsys)
    grpo = pd.read_parquet(tmp_path / "g" / "train.parquet")
    assert all(TEACHER_CONTEXT_TOKEN not in m["content"] for p in grpo["prompt"] for m in p)
    assert ANSWER_COLON_INSTRUCTION in list(grpo["prompt"][0])[0]["content"]
