"""The reference record format, the teacher-context split, and the typed samples built from it.

A record (one row of a parquet / JSON-lines file, as in the reference SDPG data)::

    {"data_source": "math_dapo",
     "prompt": [{"role": "user", "content": "<question>[TEACHER_CONTEXT_TOKEN]<teacher context>"}],
     "reward_model": {"ground_truth": "42", "style": "rule"},
     "extra_info": {...}}

The first message whose content contains the sentinel is split there: the student sees the text
before it, the teacher sees before + after joined with no separator, as the reference's data does. Validation errors
are :class:`DataError` and name the file, the record and the field.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TEACHER_CONTEXT_TOKEN = "[TEACHER_CONTEXT_TOKEN]"

#: The reference teacher-context template (``{answer}`` is the ground truth).
REFERENCE_CONTEXT_TEMPLATE = (
    "The correct answer to this problem is: {answer}\n"
    "Use this to verify your reasoning, but show your full solution process."
)

#: The default student instruction (``{question}`` is the problem): the wording of Qwen's math prompts,
#: which the tiny tokenizer knows and the boxed scorers read.
DEFAULT_INSTRUCTION_TEMPLATE = (
    "{question} Please reason step by step, and put your final answer within \\boxed{{}}."
)

#: The reference's answer-format instructions (DAPO-Math prompts carry the first); ``answer_format=boxed``
#: swaps it for the second at load time, as the reference's dataset does.
ANSWER_COLON_INSTRUCTION = (
    "The last line of your response should be of the form Answer: $Answer"
    " (without quotes) where $Answer is the answer to the problem."
)
BOXED_INSTRUCTION = "Present your final answer inside \\boxed{}, for example \\boxed{42}."

SentinelFallback = Literal["error", "no_teacher_context"]
AnswerFormat = Literal["answer_colon", "boxed"]
Messages = list[dict[str, Any]]


class DataError(ValueError):
    """A user's data is malformed; the message names the file, the record and the field."""

    def __init__(self, source: str, index: int | None, field_name: str | None, problem: str):
        where = f"{source}"
        if index is not None:
            where += f", record {index}"
        if field_name is not None:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.index = index
        self.field_name = field_name


@dataclass
class PromptSample:
    """One prompt, tokenised for the student (no context) and for the teacher (with context)."""

    student_ids: list[int]
    """Chat-templated student prompt token ids (ends with the generation prompt)."""
    teacher_ids: list[int]
    """Chat-templated teacher prompt token ids; equal to ``student_ids`` when the record has no context."""
    ground_truth: str
    """``reward_model.ground_truth``, as a string."""
    data_source: str
    """Names the reward function (``sdpg_mcore.rewards`` registry)."""
    extra_info: dict[str, Any] = field(default_factory=dict)
    """The record's ``extra_info``, passed through to the reward function."""
    index: int = 0
    """Row number of the record in the loaded files (before filtering): a stable id for logs and groups."""
    has_teacher_context: bool = True
    """False when the record had no sentinel and the ``no_teacher_context`` fallback was used."""


def split_teacher_context(
    messages: Sequence[Mapping[str, Any]], sentinel: str = TEACHER_CONTEXT_TOKEN
) -> tuple[Messages, Messages | None]:
    """Split ``messages`` at the first message containing ``sentinel``.

    Returns ``(student_messages, teacher_messages)``; ``teacher_messages`` is None when no message
    contains the sentinel. Only the first occurrence in that message is split (the reference's
    ``str.split(token, 1)``), so a later sentinel stays in the teacher's text.
    """
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) and sentinel in content:
            before, after = content.split(sentinel, 1)
            student = [dict(copy.deepcopy(m)) for m in messages]
            teacher = [dict(copy.deepcopy(m)) for m in messages]
            student[i]["content"] = before
            teacher[i]["content"] = before + after
            return student, teacher
    return [dict(copy.deepcopy(m)) for m in messages], None


def apply_answer_format(messages: Messages, answer_format: AnswerFormat) -> tuple[Messages, bool]:
    """The reference's load-time rewrite: for ``boxed``, the Answer:-line instruction becomes the boxed one.

    Every message with the instruction has its first occurrence replaced (the reference's
    ``_apply_answer_format``); ``answer_colon`` leaves the messages as they are. Returns the messages
    and whether anything changed.
    """
    if answer_format == "answer_colon":
        return messages, False
    if answer_format != "boxed":
        raise ValueError(f"answer_format={answer_format!r}: choose 'answer_colon' or 'boxed'")
    changed = False
    out: Messages = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and ANSWER_COLON_INSTRUCTION in content:
            message = {**message, "content": content.replace(ANSWER_COLON_INSTRUCTION, BOXED_INSTRUCTION, 1)}
            changed = True
        out.append(message)
    return out, changed


def validate_messages(prompt: Any, source: str, index: int, key: str = "prompt") -> Messages:
    """Check that ``prompt`` is a chat message list (a bare string becomes one user message)."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, str)) or len(prompt) == 0:
        raise DataError(source, index, key, f"expected a non-empty list of chat messages, got {prompt!r:.80}")
    out: Messages = []
    for j, message in enumerate(prompt):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(
                source,
                index,
                f"{key}[{j}]",
                f"expected a {{'role': ..., 'content': ...}} dict, got {message!r:.80}",
            )
        if not isinstance(message["content"], str):
            raise DataError(
                source,
                index,
                f"{key}[{j}].content",
                f"expected a string, got {type(message['content']).__name__}",
            )
        out.append(dict(message))
    return out


def ground_truth_of(record: Mapping[str, Any], source: str, index: int) -> str:
    """``reward_model.ground_truth`` as a non-empty string (numbers are converted)."""
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
        raise DataError(
            source, index, "reward_model.ground_truth", "missing; expected {'ground_truth': '<answer>'}"
        )
    truth = reward_model["ground_truth"]
    if isinstance(truth, (int, float)) and not isinstance(truth, bool):
        truth = str(truth)
    if not isinstance(truth, str) or not truth.strip():
        raise DataError(
            source,
            index,
            "reward_model.ground_truth",
            f"empty or not a string ({truth!r}); every record needs an answer",
        )
    return truth


def split_record(
    record: Mapping[str, Any],
    source: str,
    index: int,
    *,
    sentinel: str = TEACHER_CONTEXT_TOKEN,
    missing_sentinel: SentinelFallback = "error",
    prompt_key: str = "prompt",
    answer_format: AnswerFormat = "answer_colon",
) -> tuple[Messages, Messages, bool]:
    """Validate a record's prompt, apply ``answer_format`` and split it: ``(student, teacher, has_context)``."""
    messages = validate_messages(record.get(prompt_key), source, index, prompt_key)
    messages, _ = apply_answer_format(messages, answer_format)
    student, teacher = split_teacher_context(messages, sentinel)
    if teacher is None:
        if missing_sentinel == "error":
            raise DataError(
                source,
                index,
                prompt_key,
                f"no message contains the sentinel {sentinel!r}; add the teacher context after it "
                "(tools/prepare_data.py does), or set missing_sentinel='no_teacher_context' for data "
                "without context (grpo/dapo)",
            )
        if missing_sentinel != "no_teacher_context":
            raise ValueError(f"missing_sentinel={missing_sentinel!r}: choose 'error' or 'no_teacher_context'")
        return student, copy.deepcopy(student), False
    return student, teacher, True
