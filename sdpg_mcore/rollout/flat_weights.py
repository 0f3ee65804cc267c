"""Receive flattened weight buckets straight into a model's parameters, without the copy out of the bucket.

A ``load_format="flattened_bucket"`` update sends one buffer holding a bucket's tensors back to back.
The first time a bucket layout (its tuple of names) arrives, the buffer is received fresh and the
parameters are re-pointed at views of it (``param.data = view``): their old storage is released, so
memory does not grow. Every later update with the same layout is received into that same buffer,
which *is* the parameters: no copy, no extra memory. The trainer sends the same layout every step.

Before receiving in place the parameters are checked to still be those views (another layout or a
reload may have re-pointed them); if not, the bucket is received fresh again. Parameters that cannot
be views of the bucket (a different dtype, the same parameter under two names, e.g. tied embeddings)
are copied instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _BoundBucket:
    buffer: torch.Tensor
    data_ptrs: list[int]


class FlatBucketReceiver:
    """Per-layout buffers whose views are the model's parameters (see the module docstring)."""

    def __init__(self) -> None:
        self._bound: dict[tuple[str, ...], _BoundBucket] = {}
        self._layout_of: dict[str, tuple[str, ...]] = {}
        self.num_in_place = 0
        """Updates received straight into the parameters (for tests and logs)."""

    @torch.no_grad()
    def receive(
        self,
        names: list[str],
        params: list[torch.nn.Parameter],
        dtype: torch.dtype,
        recv: Callable[[torch.Tensor], None],
    ) -> None:
        """Fill ``params`` from one flat bucket of ``dtype``; ``recv(buffer)`` writes the bucket into ``buffer``."""
        layout = tuple(names)
        bound = self._bound.get(layout)
        if bound is not None and bound.buffer.dtype == dtype and _still_views(params, bound.data_ptrs):
            recv(bound.buffer)
            self.num_in_place += 1
            return
        numels = [p.numel() for p in params]
        buffer = torch.empty(sum(numels), dtype=dtype)
        recv(buffer)
        views = [view.view_as(p) for p, view in zip(params, buffer.split(numels))]
        if any(p.dtype != dtype for p in params) or len({id(p) for p in params}) < len(params):
            for param, view in zip(params, views):
                param.copy_(view)
            return
        for param, view in zip(params, views):
            param.data = view
        self._bind(layout, _BoundBucket(buffer, [p.data_ptr() for p in params]))

    def _bind(self, layout: tuple[str, ...], bound: _BoundBucket) -> None:
        """Remember ``layout``; forget layouts sharing a name with it (their parameters moved here)."""
        for name in layout:
            previous = self._layout_of.get(name)
            if previous is not None and previous != layout:
                self._bound.pop(previous, None)
            self._layout_of[name] = layout
        self._bound[layout] = bound


def _still_views(params: list[torch.nn.Parameter], data_ptrs: list[int]) -> bool:
    return all(p.data_ptr() == ptr for p, ptr in zip(params, data_ptrs))
