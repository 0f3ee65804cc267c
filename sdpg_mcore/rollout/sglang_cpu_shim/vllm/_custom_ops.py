"""``rotary_embedding`` with vLLM's signature, in plain torch (see ``__init__``)."""

from __future__ import annotations

import torch


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotate ``query`` and ``key`` in place, as vLLM's kernel does.

    ``query``/``key``: ``[T, num_heads * head_size]`` (or ``[T, num_heads, head_size]``);
    ``cos_sin_cache``: ``[max_position, rot_dim]``, cos in the first half, sin in the second; only the
    first ``rot_dim`` channels of each head rotate. ``is_neox``: halves rotate together (GPT-NeoX,
    Llama, Qwen) instead of interleaved pairs (GPT-J).
    """
    positions_T = positions.reshape(-1)
    cos_sin_TR = cos_sin_cache.index_select(0, positions_T)
    rot_dim = cos_sin_TR.shape[-1]
    cos_T1h, sin_T1h = (part[:, None, :] for part in cos_sin_TR.chunk(2, dim=-1))
    for x in (query, key):
        if x is None:
            continue
        rot_THR = x.view(positions_T.numel(), -1, head_size)[..., :rot_dim]
        cos, sin = cos_T1h.to(x.dtype), sin_T1h.to(x.dtype)
        if is_neox:
            x1, x2 = rot_THR.chunk(2, dim=-1)
            rot_THR.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
        else:
            x1, x2 = rot_THR[..., 0::2], rot_THR[..., 1::2]
            rot_THR.copy_(torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2))
