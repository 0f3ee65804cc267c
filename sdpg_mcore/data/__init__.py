"""Prompt data for SDPG: record loading, the teacher-context split, chat templates, sampling.

The record format is in ``data/README.md``. The trainer's entry points:

    dataset = load_prompt_dataset(paths, tokenizer, PromptConfig(max_prompt_length=2048))
    sampler = PromptSampler(len(dataset), batch_size=128, seed=0)
    prompts = dataset.batch(sampler.next_batch())          # list[PromptSample]

Micro-batches of the step's responses are planned by ``train/batch.py``.

Names are imported lazily (PEP 562) so that ``sdpg_mcore.data.records`` — all a CLI's ``--help``
needs — does not pull in torch and ``datasets``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "sdpg_mcore.data.arithmetic": [
        "ProblemSplit",
        "arithmetic_problem",
        "arithmetic_record",
        "problem_of",
        "split_problems",
        "worked_response",
        "write_arithmetic_task",
        "write_split_task",
    ],
    "sdpg_mcore.data.loading": ["load_record_file", "load_records"],
    "sdpg_mcore.data.prompts": [
        "PromptConfig",
        "PromptDataset",
        "PromptStats",
        "build_prompt_samples",
        "load_prompt_dataset",
        "render_prompt",
    ],
    "sdpg_mcore.data.records": [
        "ANSWER_COLON_INSTRUCTION",
        "BOXED_INSTRUCTION",
        "DEFAULT_INSTRUCTION_TEMPLATE",
        "REFERENCE_CONTEXT_TEMPLATE",
        "TEACHER_CONTEXT_TOKEN",
        "DataError",
        "PromptSample",
        "apply_answer_format",
        "split_teacher_context",
    ],
    "sdpg_mcore.data.sampler": ["PromptSampler"],
    "sdpg_mcore.data.tiny_tokenizer": ["build_tiny_tokenizer", "save_tiny_tokenizer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'sdpg_mcore.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
