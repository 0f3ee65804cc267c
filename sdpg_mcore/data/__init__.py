"""Prompt data for SDPG: record loading, the teacher-context split, chat templates, sampling, packing.

See SDPG.md §4. The trainer's entry points:

    dataset = load_prompt_dataset(paths, tokenizer, PromptConfig(max_prompt_length=2048))
    sampler = PromptSampler(len(dataset), batch_size=128, seed=0)
    prompts = dataset.batch(sampler.next_batch())          # list[PromptSample]
    groups = split_into_micro_batches(lengths, max_tokens)  # then pack_sequences(...) per group
"""

from sdpg_mcore.data.loading import load_record_file, load_records
from sdpg_mcore.data.packing import (
    PackedBatch,
    PaddedBatch,
    pack_sequences,
    pad_batch,
    split_into_micro_batches,
    unpack_response,
)
from sdpg_mcore.data.prompts import (
    PromptConfig,
    PromptDataset,
    PromptStats,
    build_prompt_samples,
    load_prompt_dataset,
    render_prompt,
)
from sdpg_mcore.data.records import (
    REFERENCE_CONTEXT_TEMPLATE,
    TEACHER_CONTEXT_TOKEN,
    DataError,
    PromptSample,
    RolloutSample,
    split_teacher_context,
)
from sdpg_mcore.data.sampler import PromptSampler

__all__ = [
    "REFERENCE_CONTEXT_TEMPLATE",
    "TEACHER_CONTEXT_TOKEN",
    "DataError",
    "PackedBatch",
    "PaddedBatch",
    "PromptConfig",
    "PromptDataset",
    "PromptSample",
    "PromptSampler",
    "PromptStats",
    "RolloutSample",
    "build_prompt_samples",
    "load_prompt_dataset",
    "load_record_file",
    "load_records",
    "pack_sequences",
    "pad_batch",
    "render_prompt",
    "split_into_micro_batches",
    "split_teacher_context",
    "unpack_response",
]
