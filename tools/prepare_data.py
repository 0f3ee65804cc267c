"""Turn question/answer data into SDPG's record format (parquet or JSON-lines), or make a synthetic task.

    python tools/prepare_data.py --synthetic arithmetic --out data/arith           # tiny CPU example
    python tools/prepare_data.py --input raw.csv --question-key problem --answer-key answer \\
        --test-size 0.05 --out data/mine --format parquet
    python tools/prepare_data.py --input raw.jsonl --no-teacher-context --out data/grpo   # GRPO/DAPO data
    python tools/prepare_data.py --input dapo-math-17k.parquet --out data/dapo --answer-format boxed

An ``--input`` file in the reference/verl layout (a ``prompt`` column of chat messages and a
``reward_model`` column with ``ground_truth``) is read as it is: its messages, ``data_source`` and
``extra_info`` are kept, and the teacher context is added after the sentinel in its first user message
unless the record already has one. ``--answer-format boxed`` applies the reference's instruction
rewrite (Answer: line -> ``\\boxed{}``) to the written prompts.

Each output record (``sdpg_mcore/data/README.md``)::

    {"data_source": ..., "prompt": [{"role": "user",
      "content": "<instruction(question)>[TEACHER_CONTEXT_TOKEN]<separator><context(answer)>"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "<answer>"},
     "extra_info": {"index": i, "split": ..., "question": ..., "answer": ...}}

The student sees the text before the sentinel; the teacher sees it followed by the context (default:
the reference template). ``sdpg_mcore.data.load_prompt_dataset`` loads the output directly.
Prints a table of what was written (``--json``: a machine-readable summary instead).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sdpg_mcore.data.arithmetic import arithmetic_problem  # noqa: E402
from sdpg_mcore.data.records import (  # noqa: E402
    DEFAULT_INSTRUCTION_TEMPLATE,
    REFERENCE_CONTEXT_TEMPLATE,
    TEACHER_CONTEXT_TOKEN,
    DataError,
    apply_answer_format,
    validate_messages,
)

RAW_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def _read_frame(path: Path):
    import pandas as pd

    if not path.is_file():
        raise DataError(str(path), None, None, "file does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            return pd.read_json(path, lines=not text.lstrip().startswith("["), dtype=False)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas / pyarrow parse errors
        raise DataError(str(path), None, None, f"unreadable: {type(exc).__name__}: {exc}") from exc
    raise DataError(str(path), None, None, f"unsupported file type {suffix!r}; use one of {RAW_SUFFIXES}")


def is_record_layout(columns, question_key: str) -> bool:
    """The reference/verl layout: chat messages in ``prompt`` and the answer in ``reward_model``."""
    return "prompt" in columns and "reward_model" in columns and question_key not in columns


def _plain(value: Any) -> Any:
    """pandas/pyarrow values (numpy arrays of dicts) as plain Python lists and dicts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_records(path: Path, frame) -> list[dict[str, Any]]:
    """Items of a reference/verl-layout file: its messages, ground truth, data_source and extra_info."""
    items = []
    for row, record in enumerate(frame.to_dict("records")):
        messages = validate_messages(_plain(record["prompt"]), str(path), row)
        reward_model = _plain(record["reward_model"])
        answer = _text(reward_model.get("ground_truth")) if isinstance(reward_model, dict) else ""
        if not answer:
            raise DataError(str(path), row, "reward_model.ground_truth", "missing or empty")
        extra_info = _plain(record.get("extra_info")) or {}
        data_source = record.get("data_source")
        items.append(
            {
                "messages": messages,
                "answer": answer,
                "data_source": data_source if isinstance(data_source, str) and data_source else None,
                "extra_info": extra_info if isinstance(extra_info, dict) else {},
            }
        )
    if not items:
        raise DataError(str(path), None, None, "contains no rows")
    return items


def read_raw(path: Path, question_key: str, answer_key: str, extract_boxed: bool) -> list[dict[str, Any]]:
    """Items from a q/a file (parquet / JSON-lines / JSON / CSV) or a reference-layout file; errors name
    file, row and column. A q/a item has ``question`` and ``answer``; a record item ``messages`` too."""
    frame = _read_frame(path)
    if is_record_layout(frame.columns, question_key):
        return read_records(path, frame)
    for key, flag in ((question_key, "--question-key"), (answer_key, "--answer-key")):
        if key not in frame.columns:
            raise DataError(str(path), None, key, f"missing column; found {list(frame.columns)} (set {flag})")
    items = []
    for row, (question, answer) in enumerate(zip(frame[question_key], frame[answer_key])):
        question, answer = _text(question), _text(answer)
        if extract_boxed and answer:
            from sdpg_mcore.rewards.math_scorer import last_boxed

            answer = last_boxed(answer) or ""
        if not question:
            raise DataError(str(path), row, question_key, "empty question")
        if not answer:
            raise DataError(
                str(path),
                row,
                answer_key,
                "empty answer" + (" (no \\boxed{} in it)" if extract_boxed else ""),
            )
        items.append({"question": question, "answer": answer})
    if not items:
        raise DataError(str(path), None, None, "contains no rows")
    return items


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def synthetic_arithmetic(
    num: int, rng: random.Random, num_operands: int = 2, max_digits: int = 1, operators: str = "+-"
) -> list[dict[str, str]]:
    """``num`` problems ``What is a op b ...?`` with ``num_operands`` operands of up to ``max_digits`` digits."""
    if num_operands < 2:
        raise ValueError(f"--num-operands={num_operands}: must be >= 2")
    if not 1 <= max_digits <= 6:
        raise ValueError(f"--max-digits={max_digits}: must lie in [1, 6]")
    if not operators or set(operators) - set("+-*"):
        raise ValueError(f"--operators={operators!r}: use a non-empty subset of '+-*'")
    options = dict(num_operands=num_operands, max_operand=10**max_digits - 1, operators=operators)
    problems = (arithmetic_problem(rng, **options) for _ in range(num))
    return [{"question": question, "answer": answer} for question, answer in problems]


def _with_context(messages: list[dict[str, Any]], context: str, keep: bool) -> list[dict[str, Any]]:
    """Add ``sentinel + context`` to the first user message (none if one has the sentinel); or strip it."""
    out = [dict(m) for m in messages]
    for message in out:
        if TEACHER_CONTEXT_TOKEN in message["content"]:
            if not keep:
                message["content"] = message["content"].split(TEACHER_CONTEXT_TOKEN, 1)[0]
            return out
    if keep:
        user = next((m for m in out if m.get("role") == "user"), out[-1])
        user["content"] += TEACHER_CONTEXT_TOKEN + context
    return out


def make_record(item: dict[str, Any], index: int, split: str, args: argparse.Namespace) -> dict[str, Any]:
    answer = item["answer"]
    context = args.context_separator + args.context_template.format(answer=answer)
    if "messages" in item:
        messages = _with_context(item["messages"], context, keep=not args.no_teacher_context)
        extra_info = {**item["extra_info"], "index": index, "split": split}
    else:
        messages = [{"role": "user", "content": args.instruction_template.format(question=item["question"])}]
        messages = _with_context(messages, context, keep=not args.no_teacher_context)
        extra_info = {"index": index, "split": split, "question": item["question"], "answer": answer}
    if args.system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": args.system_prompt})
    messages, _ = apply_answer_format(messages, args.answer_format)
    return {
        "data_source": args.data_source or item.get("data_source") or "math",
        "prompt": messages,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": extra_info,
    }


def write_records(records: list[dict[str, Any]], path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)


def _split_sizes(num: int, test_size: float) -> int:
    if test_size < 0 or (test_size >= 1 and test_size != int(test_size)):
        raise ValueError(f"--test-size={test_size}: a fraction in [0, 1) or a whole number of rows")
    num_test = int(test_size) if test_size >= 1 else round(num * test_size)
    if num_test >= num:
        raise ValueError(f"--test-size={test_size} leaves no training rows out of {num}")
    return num_test


def build_splits(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(args.seed)
    if args.synthetic:
        kwargs = dict(num_operands=args.num_operands, max_digits=args.max_digits, operators=args.operators)
        train = synthetic_arithmetic(args.num_train, rng, **kwargs)
        test = synthetic_arithmetic(args.num_test, rng, **kwargs)
        return {"train": train, "test": test} if test else {"train": train}
    pairs = []
    for path in args.input:
        pairs.extend(read_raw(Path(path), args.question_key, args.answer_key, args.extract_boxed_answer))
    if not args.no_shuffle:
        rng.shuffle(pairs)
    num_test = _split_sizes(len(pairs), args.test_size)
    splits = {"train": pairs[num_test:]}
    if num_test:
        splits["test"] = pairs[:num_test]
    return splits


def validate_templates(args: argparse.Namespace) -> None:
    for name, template, key in (
        ("--instruction-template", args.instruction_template, "question"),
        ("--context-template", args.context_template, "answer"),
    ):
        try:
            rendered = template.format(**{key: "X"})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"{name}: only {{{key}}} may appear in braces (write literal braces as {{{{}}}}): {exc}"
            ) from exc
        if "X" not in rendered:
            raise ValueError(f"{name}={template!r} must contain {{{key}}}")
        if TEACHER_CONTEXT_TOKEN in template:
            raise ValueError(
                f"{name} must not contain the sentinel {TEACHER_CONTEXT_TOKEN}; it is added between them"
            )


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Build the splits, write them (unless ``--dry-run``) and return the summary."""
    validate_templates(args)
    splits = build_splits(args)
    out = Path(args.out)
    summary: dict[str, Any] = {"out": str(out), "format": args.format, "dry_run": args.dry_run, "splits": {}}
    for split, pairs in splits.items():
        records = [make_record(item, i, split, args) for i, item in enumerate(pairs)]
        path = out / f"{split}.{args.format}"
        if not args.dry_run:
            write_records(records, path, args.format)
        summary["splits"][split] = {
            "path": str(path),
            "records": len(records),
            "mean_question_chars": round(
                sum(len(p.get("question") or p["messages"][-1]["content"]) for p in pairs) / len(pairs), 1
            ),
            "teacher_context": not args.no_teacher_context,
            "example": records[0]["prompt"][-1]["content"],
        }
    return summary


def print_table(summary: dict[str, Any]) -> None:
    rows = [("split", "records", "mean question chars", "teacher context", "file")]
    for split, info in summary["splits"].items():
        file = info["path"] + (" (dry run, not written)" if summary["dry_run"] else "")
        rows.append(
            (
                split,
                str(info["records"]),
                str(info["mean_question_chars"]),
                str(info["teacher_context"]),
                file,
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    first = next(iter(summary["splits"].values()))
    print(f"\nexample prompt content:\n{first['example']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (exactly one)")
    src.add_argument(
        "--input", nargs="+", metavar="FILE", help=f"raw question/answer file(s): {', '.join(RAW_SUFFIXES)}"
    )
    src.add_argument(
        "--synthetic", choices=["arithmetic"], help="generate a synthetic task instead of reading --input"
    )
    raw = p.add_argument_group("raw input")
    raw.add_argument(
        "--question-key", default="question", help="column holding the question (default: question)"
    )
    raw.add_argument(
        "--answer-key", default="answer", help="column holding the final answer (default: answer)"
    )
    raw.add_argument(
        "--extract-boxed-answer",
        action="store_true",
        help="the answer column is a solution: use its last \\boxed{}",
    )
    raw.add_argument(
        "--test-size", type=float, default=0.0, help="held-out fraction (<1) or row count (>=1); default 0"
    )
    raw.add_argument("--no-shuffle", action="store_true", help="keep the input order before splitting")
    syn = p.add_argument_group("synthetic arithmetic")
    syn.add_argument("--num-train", type=int, default=512, help="training problems (default 512)")
    syn.add_argument(
        "--num-test", type=int, default=64, help="test problems (default 64; 0 writes no test split)"
    )
    syn.add_argument(
        "--num-operands", type=int, default=2, help="operands per problem: difficulty (default 2)"
    )
    syn.add_argument("--max-digits", type=int, default=1, help="digits per operand: difficulty (default 1)")
    syn.add_argument(
        "--operators", default="+-", help="operators to draw from, a subset of '+-*' (default '+-')"
    )
    fmt = p.add_argument_group("record format")
    fmt.add_argument(
        "--instruction-template",
        default=DEFAULT_INSTRUCTION_TEMPLATE,
        help="student text; {question} is replaced",
    )
    fmt.add_argument(
        "--context-template",
        default=REFERENCE_CONTEXT_TEMPLATE,
        help="teacher context; {answer} is replaced (default: the reference template)",
    )
    fmt.add_argument(
        "--context-separator",
        default="\n\n",
        help="text between the question and the context (default: blank line)",
    )
    fmt.add_argument(
        "--no-teacher-context", action="store_true", help="write no sentinel/context (GRPO/DAPO data)"
    )
    fmt.add_argument("--system-prompt", default=None, help="prepend this system message to every prompt")
    fmt.add_argument(
        "--data-source",
        default=None,
        help="data_source field: picks the reward function (default: the record's own, else math)",
    )
    fmt.add_argument(
        "--answer-format",
        choices=["answer_colon", "boxed"],
        default="answer_colon",
        help="boxed: rewrite the reference's Answer:-line instruction to its \\boxed{} one (default: keep)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output directory; writes train.<format> and test.<format>")
    out.add_argument(
        "--format", choices=["parquet", "jsonl"], default="parquet", help="output format (default parquet)"
    )
    out.add_argument("--seed", type=int, default=0, help="shuffling / generation seed (default 0)")
    out.add_argument("--dry-run", action="store_true", help="build and report, write nothing")
    out.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.input) == bool(args.synthetic):
        parser.error("give exactly one of --input FILE... or --synthetic arithmetic")
    try:
        summary = prepare(args)
    except ValueError as exc:  # DataError included: a user mistake, reported without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
