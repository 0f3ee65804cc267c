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


# torch >= 2.13 renamed the flat collectives; GPU images may carry an older torch.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherSeq(torch.autograd.Function):
    """``[S/CP, ...]`` in CP layout -> ``[S, ...]`` in natural order; backward reduce-scatters.

    Every CP rank attends to the full K/V, so the gradient of a rank's K/V slice is the sum of the
    contributions from all ranks' queries: a reduce-scatter of the full-sequence gradients.
    """

    @staticmethod
    def forward(ctx, x_local, group):
        ctx.group = group
        cp = dist.get_world_size(group)
        flat = torch.empty(
            (cp * x_local.shape[0], *x_local.shape[1:]), dtype=x_local.dtype, device=x_local.device
        )
        _all_gather_flat(flat, x_local.contiguous(), group=group)
        return restore_from_cp_layout(list(flat.chunk(cp, dim=0)), dim=0)

    @staticmethod
    def backward(ctx, grad_full):
        cp = dist.get_world_size(ctx.group)
        by_rank = torch.cat([split_to_cp_layout(grad_full, cp, r, dim=0) for r in range(cp)], dim=0)
        grad_local = torch.empty(
            (grad_full.shape[0] // cp, *grad_full.shape[1:]), dtype=grad_full.dtype, device=grad_full.device
        )
        _reduce_scatter_flat(grad_local, by_rank.contiguous(), group=ctx.group)
        return grad_local, None


def cp_causal_attention(
    query_SBHD: torch.Tensor,
    key_SBGD: torch.Tensor,
    value_SBGD: torch.Tensor,
    group,
    *,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention of this rank's queries against the whole sequence's keys and values.

    Inputs are this rank's tokens in CP layout, Megatron's ``[s, b, heads, d]`` (query) and
    ``[s, b, groups, d]`` (key/value, GQA groups). K/V are all-gathered over ``group`` (backward:
    reduce-scatter); the causal mask uses global positions. Returns ``[s, b, heads * d]``.
    """
    cp = 1 if group is None else dist.get_world_size(group)
    cp_rank = 0 if group is None else dist.get_rank(group)
    seq_local = query_SBHD.shape[0]
    if cp > 1:
        key_SBGD = _AllGatherSeq.apply(key_SBGD, group)
        value_SBGD = _AllGatherSeq.apply(value_SBGD, group)
    seq_full = key_SBGD.shape[0]
    assert seq_full == seq_local * cp, (seq_full, seq_local, cp)
    q_pos = cp_positions(seq_full, cp, cp_rank, device=query_SBHD.device)
    k_pos = torch.arange(seq_full, device=query_SBHD.device)
    allowed_QK = q_pos[:, None] >= k_pos[None, :]
    heads, groups = query_SBHD.shape[2], key_SBGD.shape[2]
    # [s, b, n, d] -> [b, n, s, d]; GQA: each K/V group serves heads/groups consecutive query heads
    q = query_SBHD.permute(1, 2, 0, 3)
    k = key_SBGD.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)
    v = value_SBGD.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)
    out_BNSD = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed_QK, dropout_p=dropout_p, scale=softmax_scale
    )
    return out_BNSD.permute(2, 0, 1, 3).reshape(seq_local, query_SBHD.shape[1], heads * query_SBHD.shape[3])


class ContextParallelAttention(torch.nn.Module):
    """Core attention for Megatron's local layer spec under context parallelism (no TE needed).

    Drop-in for ``DotProductAttention`` (same constructor and forward signature, which Megatron's
    ``SelfAttention`` calls); causal only, no packed sequences. The ``attention_mask`` argument is
    ignored: causality comes from global token positions, and right padding does not affect the
    real tokens of a causal model.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType

        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"ContextParallelAttention supports causal masks only, got {attn_mask_type}")
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by ContextParallelAttention")
        self.config = config
        self.layer_number = layer_number
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp_group or parallel_state.get_context_parallel_group(check_initialized=False)
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("ContextParallelAttention supports neither packed sequences nor attention bias")
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return cp_causal_attention(
                    query, key, value, self.cp_group, softmax_scale=self.softmax_scale, dropout_p=dropout_p
                )
        return cp_causal_attention(query, key, value, self.cp_group, softmax_scale=self.softmax_scale)
