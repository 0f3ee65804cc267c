"""Pure tensor transforms between HF tensors and Megatron tensors (full or one TP shard).

Three directions, all driven by a ``ParamRule``:

- ``build_mcore_shard``: HF tensors -> the Megatron tensor of one TP rank (``tp_size=1`` gives the
  full tensor). It asks a ``read(name, dim, start, stop, out=None)`` callback for the HF rows/columns it
  needs, so a rank (or the offline converter) never materialises more than its own slice.
- ``gather_mcore_shards``: the TP shards of all ranks -> the full (TP-independent) Megatron tensor.
- ``split_mcore_full``: the full Megatron tensor -> HF-named, HF-shaped tensors (padding dropped).

Layouts (``G`` query groups, ``h`` query heads per group, ``d`` head dim, ``F`` ffn, ``P`` padded vocab):
``linear_qkv`` rows are ``[q_g (h*d), k_g (d), v_g (d)]`` for ``g`` in ``0..G-1``, and TP rank ``r``
holds groups ``[r*G/tp, (r+1)*G/tp)`` — a contiguous row block, so the full tensor is the
concatenation of the shards. ``linear_fc1`` is ``[gate; up]`` globally but each rank holds
``[gate_r; up_r]``, so gathering must regroup the halves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from checkpoints_convert.arch_maps import Fuse, ModelDims, ParamRule, Shard

#: read(hf_name, dim, start, stop, out=None) -> that slice of the HF tensor (dim None: the whole
#: tensor); with ``out`` (a contiguous tensor, dim 0 only) the rows are read into it and it is returned.
ReadFn = Callable[..., torch.Tensor]


def _span(total: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    if total % tp_size:
        raise ValueError(f"a dimension of size {total} cannot be split over tensor-parallel size {tp_size}")
    step = total // tp_size
    return tp_rank * step, (tp_rank + 1) * step


def build_mcore_shard(
    rule: ParamRule,
    read: ReadFn,
    hf_shapes: dict[str, tuple[int, ...]],
    dims: ModelDims,
    layer: int | None,
    tp_rank: int,
    tp_size: int,
    padded_vocab: int,
) -> torch.Tensor:
    """The Megatron tensor of ``rule`` held by TP rank ``tp_rank`` (the full tensor at ``tp_size=1``)."""
    names = rule.hf_names(layer)
    if rule.fuse is Fuse.COPY:
        (name,) = names
        if rule.shard is Shard.REPLICATED:
            return read(name, None, 0, 0)
        dim = 1 if rule.shard is Shard.ROW else 0
        start, stop = _span(hf_shapes[name][dim], tp_rank, tp_size)
        return read(name, dim, start, stop)
    # Fused tensors: allocate the result once and read each HF slice straight into its rows, so
    # building a tensor of N bytes needs N bytes (not 2N for reading then concatenating).
    rest = tuple(hf_shapes[names[0]][1:])
    dtype = read(names[0], 0, 0, 0).dtype
    if rule.fuse is Fuse.QKV:
        groups = dims.num_query_groups // tp_size
        first = tp_rank * groups
        q_rows, kv_rows = dims.heads_per_group * dims.head_dim, dims.head_dim
        out = torch.empty(groups, q_rows + 2 * kv_rows, *rest, dtype=dtype)
        for i, g in enumerate(range(first, first + groups)):
            read(names[0], 0, g * q_rows, (g + 1) * q_rows, out[i, :q_rows])
            read(names[1], 0, g * kv_rows, (g + 1) * kv_rows, out[i, q_rows : q_rows + kv_rows])
            read(names[2], 0, g * kv_rows, (g + 1) * kv_rows, out[i, q_rows + kv_rows :])
        return out.reshape(groups * (q_rows + 2 * kv_rows), *rest)
    if rule.fuse is Fuse.GATE_UP:
        start, stop = _span(hf_shapes[names[0]][0], tp_rank, tp_size)
        out = torch.empty(2 * (stop - start), *rest, dtype=dtype)
        read(names[0], 0, start, stop, out[: stop - start])
        read(names[1], 0, start, stop, out[stop - start :])
        return out
    if rule.fuse is Fuse.VOCAB:
        vocab = hf_shapes[names[0]][0]
        start, stop = _span(padded_vocab, tp_rank, tp_size)
        out = torch.zeros(stop - start, *rest, dtype=dtype)
        real_start, real_stop = min(start, vocab), min(stop, vocab)  # empty when the shard is all padding
        read(names[0], 0, real_start, real_stop, out[: real_stop - real_start])
        return out
    raise AssertionError(f"unhandled fuse {rule.fuse}")


def mcore_full_shape(
    rule: ParamRule, hf_shapes: dict[str, tuple[int, ...]], layer: int | None, padded_vocab: int
) -> tuple[int, ...]:
    """Shape of the full (TP-unsharded) Megatron tensor of ``rule``."""
    shapes = [hf_shapes[n] for n in rule.hf_names(layer)]
    if rule.fuse is Fuse.COPY:
        return shapes[0]
    if rule.fuse in (Fuse.QKV, Fuse.GATE_UP):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return (padded_vocab, *shapes[0][1:])


def gather_mcore_shards(rule: ParamRule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full Megatron tensor from the TP shards of ranks ``0..tp-1`` (inverse of ``build_mcore_shard``)."""
    if rule.shard is Shard.REPLICATED or len(shards) == 1:
        return shards[0]
    if rule.shard is Shard.ROW:
        return torch.cat(shards, dim=1)
    if rule.fuse is Fuse.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def split_mcore_full(
    rule: ParamRule, full: torch.Tensor, dims: ModelDims, layer: int | None
) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs from the full Megatron tensor; padded vocabulary rows are dropped."""
    names = rule.hf_names(layer)
    if rule.fuse is Fuse.COPY:
        return [(names[0], full)]
    if rule.fuse is Fuse.VOCAB:
        return [(names[0], full[: dims.vocab_size].contiguous())]
    if rule.fuse is Fuse.GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return [(names[0], gate.contiguous()), (names[1], up.contiguous())]
    rest = full.shape[1:]
    q_rows = dims.heads_per_group * dims.head_dim
    grouped = full.reshape(dims.num_query_groups, q_rows + 2 * dims.head_dim, *rest)
    q, k, v = grouped.split([q_rows, dims.head_dim, dims.head_dim], dim=1)
    return [(n, t.reshape(-1, *rest).contiguous()) for n, t in zip(names, (q, k, v))]
