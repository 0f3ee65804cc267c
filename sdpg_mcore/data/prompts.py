"""Student and teacher prompt token ids from records, with the length policy counted for the log.

Each record's messages are split at the sentinel (``records.py``), an optional system prompt is
prepended, and both message lists are rendered with the tokenizer's chat template
(``add_generation_prompt=True`` plus configurable kwargs such as ``enable_thinking``) and encoded
*without* adding special tokens again: a Llama-3 template already starts with BOS, and encoding the
rendered text with ``add_special_tokens=True`` would double it.

Prompts longer than ``max_prompt_length`` are dropped (``overlong="filter"``, the default: counted and
reported at WARNING), cut (``"truncate"``), or rejected (``"error"``). Truncation cuts the question,
never what the prompt exists for: the student prompt loses tokens from the left (what the reference's
scripts ask for with ``data.truncation='left'``; its dataset code leaves the student prompt whole) and
keeps its assistant header; the teacher prompt keeps its privileged context and assistant header
whole and loses tokens from the left of the question it shares with the student (the reference cuts
the teacher from the right, silently dropping the context and the header; its filter measures the
raw record, sentinel and teacher context included: ``tests/train/test_reference_data_run.py``). With
``answer_format="boxed"`` the reference's Answer:-line instruction is rewritten to the boxed one first. Token ids are stored in one flat int32 buffer so 17k prompts cost megabytes,
not the ~36 bytes per token of Python int lists; :class:`PromptDataset` builds a
:class:`~sdpg_mcore.data.records.PromptSample` on access.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sdpg_mcore.data.loading import as_path_list, load_record_file
from sdpg_mcore.data.records import (
    TEACHER_CONTEXT_TOKEN,
    AnswerFormat,
    DataError,
    Messages,
    PromptSample,
    SentinelFallback,
    ground_truth_of,
    split_record,
)

logger = logging.getLogger(__name__)


@dataclass
class PromptConfig:
    """How records become prompt token ids."""

    max_prompt_length: int = 2048
    """Longest student prompt, in tokens (after the chat template)."""
    max_teacher_prompt_length: int | None = None
    """Longest teacher prompt; None means ``max_prompt_length`` (the reference uses one limit)."""
    overlong: Literal["filter", "truncate", "error"] = "filter"
    """Over-long prompts: drop (counted, WARNING), cut the question (never the teacher's context or the
    assistant header), or raise."""
    answer_format: AnswerFormat = "answer_colon"
    """``boxed`` rewrites the reference's Answer:-line instruction to its boxed one at load time."""
    prompt_key: str = "prompt"
    """Column holding the chat message list."""
    apply_chat_template: bool = True
    """False renders messages as their contents joined by newlines, encoded with the tokenizer's own
    special tokens (for base models without a chat template)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``apply_chat_template`` kwargs, e.g. ``{"enable_thinking": True}`` for Qwen3."""
    system_prompt: str | None = None
    """Prepended as a system message to records that have none."""
    sentinel: str = TEACHER_CONTEXT_TOKEN
    """Splits the student question from the teacher context."""
    missing_sentinel: SentinelFallback = "error"
    """Records without the sentinel: ``error``, or ``no_teacher_context`` (teacher prompt = student prompt)."""
    default_data_source: str | None = None
    """Used for files without a ``data_source`` column; None makes that column required."""

    def validate(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={self.max_prompt_length}: must be >= 1")
        if self.max_teacher_prompt_length is not None and self.max_teacher_prompt_length < 1:
            raise ValueError(
                f"max_teacher_prompt_length={self.max_teacher_prompt_length}: must be >= 1 or None"
            )
        if self.overlong not in ("filter", "truncate", "error"):
            raise ValueError(f"overlong={self.overlong!r}: choose 'filter', 'truncate' or 'error'")
        if self.answer_format not in ("answer_colon", "boxed"):
            raise ValueError(f"answer_format={self.answer_format!r}: choose 'answer_colon' or 'boxed'")
        if self.missing_sentinel not in ("error", "no_teacher_context"):
            raise ValueError(
                f"missing_sentinel={self.missing_sentinel!r}: choose 'error' or 'no_teacher_context'"
            )

    @property
    def teacher_limit(self) -> int:
        return self.max_teacher_prompt_length or self.max_prompt_length


@dataclass
class PromptStats:
    """Counts for the log: what the length policy and the sentinel fallback did."""

    num_records: int = 0
    num_kept: int = 0
    num_filtered: int = 0
    num_student_truncated: int = 0
    num_teacher_truncated: int = 0
    num_without_teacher_context: int = 0
    max_student_length: int = 0
    max_teacher_length: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def render_prompt(
    tokenizer,
    messages: Messages,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    apply_chat_template: bool = True,
) -> list[int]:
    """Chat-template ``messages`` with a generation prompt and encode without extra special tokens.

    With ``apply_chat_template=False`` the contents are joined by newlines and encoded with the
    tokenizer's own special tokens (BOS for Llama), for base models without a template.
    """
    if not apply_chat_template:
        return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **dict(chat_template_kwargs or {})
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: Messages, config: PromptConfig) -> list[int]:
    if config.system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": config.system_prompt}, *messages]
    return render_prompt(tokenizer, messages, config.chat_template_kwargs, config.apply_chat_template)


class PromptDataset:
    """Tokenised prompts: ``len``, ``ds[i] -> PromptSample``, ``stats``; ids live in flat int32 buffers."""

    def __init__(self, samples: Sequence[PromptSample], stats: PromptStats):
        self.stats = stats
        student = [s.student_ids for s in samples]
        teacher = [s.teacher_ids for s in samples]
        self._student_offsets = np.concatenate([[0], np.cumsum([len(x) for x in student])]).astype(np.int64)
        self._teacher_offsets = np.concatenate([[0], np.cumsum([len(x) for x in teacher])]).astype(np.int64)
        self._student = np.fromiter(
            (t for x in student for t in x), dtype=np.int32, count=self._student_offsets[-1]
        )
        self._teacher = np.fromiter(
            (t for x in teacher for t in x), dtype=np.int32, count=self._teacher_offsets[-1]
        )
        self._meta = [
            (s.ground_truth, s.data_source, s.extra_info, s.index, s.has_teacher_context) for s in samples
        ]

    def __len__(self) -> int:
        return len(self._meta)

    def __getitem__(self, i: int) -> PromptSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt index {i} out of range for {len(self)} prompts")
        i = i % len(self)
        ground_truth, data_source, extra_info, index, has_context = self._meta[i]
        s0, s1 = self._student_offsets[i], self._student_offsets[i + 1]
        t0, t1 = self._teacher_offsets[i], self._teacher_offsets[i + 1]
        return PromptSample(
            student_ids=self._student[s0:s1].tolist(),
            teacher_ids=self._teacher[t0:t1].tolist(),
            ground_truth=ground_truth,
            data_source=data_source,
            extra_info=dict(extra_info),
            index=index,
            has_teacher_context=has_context,
        )

    def batch(self, indices: Sequence[int]) -> list[PromptSample]:
        return [self[i] for i in indices]

    def student_lengths(self) -> np.ndarray:
        return np.diff(self._student_offsets)

    def teacher_lengths(self) -> np.ndarray:
        return np.diff(self._teacher_offsets)


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens ``a`` and ``b`` share at the start (student and teacher: the template head and the question)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def truncate_teacher(student: list[int], teacher: list[int], limit: int) -> list[int] | None:
    """``teacher`` cut to ``limit`` tokens from the left of the question; None if its own part is longer.

    The teacher's own part (everything after the prefix it shares with the student: the context,
    the rest of the message and the assistant header) is kept whole.
    """
    shared = min(shared_prefix_length(student, teacher), len(teacher) - 1)
    own = len(teacher) - shared
    if own > limit:
        return None
    return teacher[shared - (limit - own) : shared] + teacher[shared:]


def _apply_length_policy(
    student: list[int], teacher: list[int], config: PromptConfig, stats: PromptStats, source: str, row: int
) -> tuple[list[int], list[int]] | None:
    over_s = len(student) > config.max_prompt_length
    over_t = len(teacher) > config.teacher_limit
    if not (over_s or over_t):
        return student, teacher
    if config.overlong == "error":
        which = "student" if over_s else "teacher"
        raise DataError(
            source,
            row,
            config.prompt_key,
            f"{which} prompt has {len(student) if over_s else len(teacher)} tokens > limit "
            f"{config.max_prompt_length if over_s else config.teacher_limit}; raise max_prompt_length or set "
            "overlong to 'filter' or 'truncate'",
        )
    cut_teacher = truncate_teacher(student, teacher, config.teacher_limit) if over_t else teacher
    if config.overlong == "filter" or cut_teacher is None:
        stats.num_filtered += 1
        return None
    if over_s:
        stats.num_student_truncated += 1
        student = student[-config.max_prompt_length :]
    stats.num_teacher_truncated += int(over_t)
    return student, cut_teacher


def build_prompt_samples(
    records, tokenizer, config: PromptConfig, source: str = "<records>", first_index: int = 0
) -> tuple[list[PromptSample], PromptStats]:
    """Split, template, tokenise and length-check ``records`` (a ``datasets.Dataset`` or list of dicts)."""
    config.validate()
    stats = PromptStats()
    samples: list[PromptSample] = []
    for row, record in enumerate(records):
        stats.num_records += 1
        data_source = record.get("data_source") or config.default_data_source
        if not isinstance(data_source, str) or not data_source:
            raise DataError(source, row, "data_source", f"missing or not a string ({data_source!r})")
        truth = ground_truth_of(record, source, row)
        extra_info = record.get("extra_info") or {}
        if not isinstance(extra_info, Mapping):
            raise DataError(
                source, row, "extra_info", f"expected a dict or null, got {type(extra_info).__name__}"
            )
        student_msgs, teacher_msgs, has_context = split_record(
            record,
            source,
            row,
            sentinel=config.sentinel,
            missing_sentinel=config.missing_sentinel,
            prompt_key=config.prompt_key,
            answer_format=config.answer_format,
        )
        student_ids = _render(tokenizer, student_msgs, config)
        teacher_ids = _render(tokenizer, teacher_msgs, config) if has_context else list(student_ids)
        kept = _apply_length_policy(student_ids, teacher_ids, config, stats, source, row)
        if kept is None:
            continue
        student_ids, teacher_ids = kept
        stats.num_without_teacher_context += int(not has_context)
        stats.max_student_length = max(stats.max_student_length, len(student_ids))
        stats.max_teacher_length = max(stats.max_teacher_length, len(teacher_ids))
        samples.append(
            PromptSample(
                student_ids=student_ids,
                teacher_ids=teacher_ids,
                ground_truth=truth,
                data_source=data_source,
                extra_info=dict(extra_info),
                index=first_index + row,
                has_teacher_context=has_context,
            )
        )
    stats.num_kept = len(samples)
    return samples, stats


def _merge(total: PromptStats, part: PromptStats) -> None:
    for name, value in part.as_dict().items():
        merged = max(getattr(total, name), value) if name.startswith("max_") else getattr(total, name) + value
        setattr(total, name, merged)


def load_prompt_dataset(
    paths: str | Path | Sequence[str | Path], tokenizer, config: PromptConfig, split: str = "train"
) -> PromptDataset:
    """Load record files (parquet / JSON-lines / saved dataset dirs) and tokenise them into a PromptDataset.

    Errors name the file, the record (row within that file) and the field; ``PromptSample.index`` counts
    rows across all files in order.
    """
    samples: list[PromptSample] = []
    stats = PromptStats()
    first_index = 0
    for path in as_path_list(paths):
        required = (config.prompt_key, "reward_model") + (
            () if config.default_data_source else ("data_source",)
        )
        records = load_record_file(path, split, required=required)
        part, part_stats = build_prompt_samples(records, tokenizer, config, str(path), first_index)
        samples.extend(part)
        _merge(stats, part_stats)
        first_index += len(records)
    if not samples:
        raise DataError(
            ", ".join(map(str, paths if not isinstance(paths, (str, Path)) else [paths])),
            None,
            None,
            f"every record was filtered (longer than {config.max_prompt_length} tokens); raise max_prompt_length",
        )
    if stats.num_filtered:
        logger.warning(
            "dropped %d of %d prompts longer than max_prompt_length=%d tokens (student) / %d (teacher); "
            "raise the limit, or set data.filter_overlong_prompts=false to cut their questions instead",
            stats.num_filtered,
            stats.num_records,
            config.max_prompt_length,
            config.teacher_limit,
        )
    logger.info("prompts: %s", stats.as_dict())
    return PromptDataset(samples, stats)
