"""Load record files (parquet, JSON-lines, JSON, or a saved ``datasets`` directory) as a HF ``Dataset``.

Parquet is read with pyarrow and JSON-lines line by line, so a broken file is reported with its path
and line, and nothing is written to the HF cache. Several files are concatenated in order;
:func:`load_prompt_dataset` (``prompts.py``) reads them one by one so that errors name the file.

    records = load_records(["train.parquet", "more.jsonl"])
    check_columns(records, "train.parquet")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sdpg_mcore.data.records import DataError

REQUIRED_COLUMNS = ("prompt", "reward_model", "data_source")
SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    str(path), line_no - 1, None, f"line {line_no} is not valid JSON ({exc.msg})"
                ) from exc
            if not isinstance(row, dict):
                raise DataError(str(path), line_no - 1, None, f"line {line_no} is not a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return _read_jsonl(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), None, None, f"not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(str(path), i, None, "expected a list of JSON objects")
    return rows


def _read_file(path: Path):
    import datasets

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            from datasets.table import InMemoryTable

            return datasets.Dataset(InMemoryTable(pq.read_table(path)))
        if suffix in (".jsonl", ".ndjson"):
            return datasets.Dataset.from_list(_read_jsonl(path))
        if suffix == ".json":
            return datasets.Dataset.from_list(_read_json(path))
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(str(path), None, None, f"unreadable: not UTF-8 text ({exc.reason})") from exc
    except Exception as exc:  # pyarrow errors, permission errors, inconsistent JSON types
        raise DataError(str(path), None, None, f"unreadable: {type(exc).__name__}: {exc}") from exc
    raise DataError(
        str(path), None, None, f"unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}"
    )


def _read_saved_dataset(path: Path, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError or its own errors
        raise DataError(
            str(path), None, None, f"not a saved dataset directory (datasets.load_from_disk: {exc})"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(str(path), None, None, f"has splits {sorted(loaded)}, not {split!r}")
        loaded = loaded[split]
    return loaded


def load_record_file(path: str | Path, split: str = "train", required: Sequence[str] = REQUIRED_COLUMNS):
    """One file or saved-dataset directory as a ``datasets.Dataset``, with its columns checked.

    ``split`` picks the split of a saved ``DatasetDict`` directory.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, None, "file or directory does not exist")
    loaded = _read_saved_dataset(path, split) if path.is_dir() else _read_file(path)
    if len(loaded) == 0:
        raise DataError(str(path), None, None, "contains no records")
    check_columns(loaded, str(path), required)
    return loaded


def as_path_list(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """One path or several, as a non-empty list."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if len(paths) == 0:
        raise ValueError("no data files given")
    return [Path(p) for p in paths]


def load_records(paths: str | Path | Sequence[str | Path], split: str = "train"):
    """Load and concatenate record files into one ``datasets.Dataset`` (rows in file order)."""
    import datasets

    path_list = as_path_list(paths)
    parts = [load_record_file(p, split) for p in path_list]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except Exception as exc:
        raise DataError(
            ", ".join(map(str, path_list)), None, None, f"files have incompatible columns: {exc}"
        ) from exc


def check_columns(records, source: str, required: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Raise :class:`DataError` naming ``source`` and the missing column(s)."""
    missing = [c for c in required if c not in records.column_names]
    if missing:
        raise DataError(
            source,
            None,
            missing[0],
            f"missing column(s) {missing}; found {records.column_names}. Convert raw question/answer data "
            "with tools/prepare_data.py",
        )
