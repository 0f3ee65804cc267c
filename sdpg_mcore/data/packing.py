"""Micro-batches by token budget, sequence packing (THD, ``cu_seqlens``) and right-padded batches.

A sample is ``prompt + response`` token ids. Logits at position ``t`` predict token ``t + 1``, so the
positions whose logits predict response tokens are ``prompt_len - 1 ... len - 2``: that is the
``loss_mask`` here, and ``target_ids`` holds the token each such position predicts.

    groups = split_into_micro_batches(lengths, max_tokens=6144)
    for group in groups:
        packed = pack_sequences([seqs[i] for i in group], [plens[i] for i in group], sample_indices=group)
        ...  # model(packed.input_ids_T[None], position_ids=packed.position_ids_T[None], cu_seqlens...)
        per_sample = unpack_response(logprobs_T, packed)   # one tensor of response length per sample
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _lpt(lengths: Sequence[int], order: list[int], num_bins: int) -> list[list[int]]:
    """Longest-processing-time greedy: each sample (longest first) goes to the least-loaded bin."""
    heap = [(0, b) for b in range(num_bins)]
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def _first_fit_decreasing(lengths: Sequence[int], order: list[int], max_tokens: int) -> list[list[int]]:
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def split_into_micro_batches(
    lengths: Sequence[int], max_tokens: int, *, min_num_micro_batches: int = 1, balanced: bool = True
) -> list[list[int]]:
    """Group sample indices into micro-batches of at most ``max_tokens`` tokens each.

    First-fit decreasing gives a feasible count; with ``balanced`` the fewest bins (from the lower
    bound ``ceil(total / max_tokens)`` up) for which a longest-first greedy keeps every bin within the
    budget is used instead, so micro-batches carry similar token counts. ``min_num_micro_batches``
    forces at least that many (all DP ranks must run the same number). Indices inside a micro-batch
    are ascending and micro-batches are ordered by their first index, so the plan is deterministic
    and the caller can scatter results back by index.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    if len(lengths) == 0:
        return []
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(
                f"sample {i} has {n} tokens > the micro-batch budget max_tokens={max_tokens}; raise the budget "
                "to at least max_prompt_length + max_response_length"
            )
        if n < 0:
            raise ValueError(f"sample {i} has negative length {n}")
    if min_num_micro_batches > len(lengths):
        raise ValueError(f"min_num_micro_batches={min_num_micro_batches} > {len(lengths)} samples")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins = _first_fit_decreasing(lengths, order, max_tokens)
    target = max(len(bins), min_num_micro_batches)
    if balanced:
        lower = max(math.ceil(sum(lengths) / max_tokens), min_num_micro_batches, 1)
        for k in range(lower, target + 1):
            candidate = _lpt(lengths, order, k)
            if all(sum(lengths[i] for i in b) <= max_tokens for b in candidate) and all(candidate):
                bins = candidate
                break
    while len(bins) < min_num_micro_batches:
        # Split the fullest multi-sample bin; any single sample fits the budget.
        b = max((b for b in bins if len(b) > 1), key=len)
        bins.append([b.pop()])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def _check_sample(i: int, seq_len: int, prompt_len: int) -> None:
    if not 1 <= prompt_len <= seq_len:
        raise ValueError(
            f"sample {i}: prompt_len={prompt_len} must lie in [1, {seq_len}] (the sequence length)"
        )


@dataclass
class PackedBatch:
    """Several samples packed into one row (THD layout); ``T`` = total tokens including padding."""

    input_ids_T: torch.Tensor
    position_ids_T: torch.Tensor
    """Restart at 0 for each sample."""
    target_ids_T: torch.Tensor
    """Token predicted by position t (the next token of the same sample); ``pad_id`` where none."""
    loss_mask_T: torch.Tensor
    """True where the logits predict a response token (``prompt_len - 1 ... len - 2`` of each sample)."""
    cu_seqlens: torch.Tensor
    """int32 [S + 1]: cumulative real sample lengths (Megatron ``cu_seqlens_q``)."""
    cu_seqlens_padded: torch.Tensor
    """int32 [S + 1]: where each sample starts in the row; the last segment absorbs the row padding."""
    max_seqlen: int
    seq_lens: list[int]
    prompt_lens: list[int]
    sample_indices: list[int]
    num_padding: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_T.numel())


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    *,
    sample_indices: Sequence[int] | None = None,
    pad_id: int = 0,
    pad_sequence_to_multiple_of: int = 1,
    pad_total_to_multiple_of: int = 1,
) -> PackedBatch:
    """Concatenate ``sequences`` (prompt + response ids) into one row with boundaries and masks.

    ``pad_sequence_to_multiple_of`` pads each sample (context parallelism needs multiples of 2·CP);
    ``pad_total_to_multiple_of`` pads the row (sequence parallelism needs multiples of TP).
    """
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt lengths")
    if len(sequences) == 0:
        raise ValueError("pack_sequences: no sequences")
    seq_lens = [len(s) for s in sequences]
    for i, (n, p) in enumerate(zip(seq_lens, prompt_lens)):
        _check_sample(i, n, p)
    m = pad_sequence_to_multiple_of
    padded = [-(-n // m) * m for n in seq_lens]
    total = sum(padded)
    row_total = -(-total // pad_total_to_multiple_of) * pad_total_to_multiple_of
    padded[-1] += row_total - total

    input_ids = torch.full((row_total,), pad_id, dtype=torch.long)
    target_ids = torch.full((row_total,), pad_id, dtype=torch.long)
    position_ids = torch.zeros(row_total, dtype=torch.long)
    loss_mask = torch.zeros(row_total, dtype=torch.bool)
    start = 0
    for seq, n, p, width in zip(sequences, seq_lens, prompt_lens, padded):
        ids = torch.as_tensor(list(seq), dtype=torch.long)
        input_ids[start : start + n] = ids
        target_ids[start : start + n - 1] = ids[1:]
        position_ids[start : start + width] = torch.arange(width)
        loss_mask[start + p - 1 : start + n - 1] = True
        start += width
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
    cu_padded = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu_padded[1:] = torch.cumsum(torch.tensor(padded), 0)
    return PackedBatch(
        input_ids_T=input_ids,
        position_ids_T=position_ids,
        target_ids_T=target_ids,
        loss_mask_T=loss_mask,
        cu_seqlens=cu,
        cu_seqlens_padded=cu_padded,
        max_seqlen=max(padded),
        seq_lens=seq_lens,
        prompt_lens=list(prompt_lens),
        sample_indices=list(sample_indices) if sample_indices is not None else list(range(len(sequences))),
        num_padding=row_total - sum(seq_lens),
    )


def unpack_response(values_T: torch.Tensor, packed: PackedBatch) -> list[torch.Tensor]:
    """Split per-position values (``[T, ...]``) into one tensor per sample over its response positions."""
    out = []
    for start, n, p in zip(packed.cu_seqlens_padded.tolist(), packed.seq_lens, packed.prompt_lens):
        out.append(values_T[start + p - 1 : start + n - 1])
    return out


@dataclass
class PaddedBatch:
    """Right-padded ``[B, T]`` batch; masks follow the same convention as :class:`PackedBatch`."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    """True on real tokens."""
    position_ids_BT: torch.Tensor
    target_ids_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    seq_lens: list[int]
    prompt_lens: list[int]


def pad_batch(
    sequences: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    *,
    pad_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> PaddedBatch:
    """Right-pad ``sequences`` to the longest (rounded up to ``pad_to_multiple_of``)."""
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt lengths")
    if len(sequences) == 0:
        raise ValueError("pad_batch: no sequences")
    seq_lens = [len(s) for s in sequences]
    for i, (n, p) in enumerate(zip(seq_lens, prompt_lens)):
        _check_sample(i, n, p)
    width = -(-max(seq_lens) // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(sequences)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    target_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.bool)
    loss_mask = torch.zeros((batch, width), dtype=torch.bool)
    for b, (seq, n, p) in enumerate(zip(sequences, seq_lens, prompt_lens)):
        ids = torch.as_tensor(list(seq), dtype=torch.long)
        input_ids[b, :n] = ids
        target_ids[b, : n - 1] = ids[1:]
        attention[b, :n] = True
        loss_mask[b, p - 1 : n - 1] = True
    position_ids = torch.arange(width).expand(batch, width).clone()
    return PaddedBatch(
        input_ids_BT=input_ids,
        attention_mask_BT=attention,
        position_ids_BT=position_ids,
        target_ids_BT=target_ids,
        loss_mask_BT=loss_mask,
        seq_lens=seq_lens,
        prompt_lens=list(prompt_lens),
    )
