"""Context parallelism without Transformer-Engine: the sequence layout and a causal attention.

Megatron's load-balanced layout: the sequence is cut into ``2 * CP`` equal chunks and CP rank ``r``
holds chunks ``r`` and ``2 * CP - 1 - r`` (so every rank gets the same share of causal work).

    tokens_local = split_to_cp_layout(tokens_BS, cp, cp_rank, dim=1)       # [B, S / CP]
    logits_full  = gather_from_cp_layout(logits_local, cp_group, dim=1)    # back to [B, S, ...]
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def cp_chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (out of ``2 * cp``) that ``cp_rank`` holds."""
    return cp_rank, 2 * cp - 1 - cp_rank


def cp_positions(seq_len: int, cp: int, cp_rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global token positions ``[S / CP]`` held by ``cp_rank`` (e.g. for rope or masks)."""
    return split_to_cp_layout(torch.arange(seq_len, device=device), cp, cp_rank, dim=0)


def split_to_cp_layout(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of ``x`` along ``dim`` (length divisible by ``2 * cp``): chunks r, 2cp-1-r."""
    if cp == 1:
        return x
    seq_len = x.shape[dim]
    if seq_len % (2 * cp) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp}; pad sequences to a multiple of {2 * cp}"
        )
    chunks = x.chunk(2 * cp, dim=dim)
    first, second = cp_chunk_ids(cp, cp_rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def restore_from_cp_layout(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of ``split_to_cp_layout``: ``parts[r]`` is rank r's local tensor; natural order out."""
    cp = len(parts)
    if cp == 1:
        return parts[0]
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, second = cp_chunk_ids(cp, rank)
        chunks[first], chunks[second] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


class _GatherFromCP(torch.autograd.Function):
    """All-gather over CP into natural order; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return restore_from_cp_layout(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        cp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return split_to_cp_layout(grad, cp, rank, dim=ctx.dim).contiguous(), None, None


def gather_from_cp_layout(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """The full sequence from every CP rank's local part, in natural token order.

    Differentiable: the backward hands each rank the gradient of its own tokens, which is right
    when every CP rank evaluates the same (replicated) function of the gathered tensor.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherFromCP.apply(x, group, dim)
