"""A weight-update process group that lives beside (not inside) the default ``torch.distributed`` world.

The trainer already runs Megatron's default group; the servers run none. SGLang's
``init_custom_process_group`` solves this with a private rendezvous; we do the same with public
API: a ``TCPStore`` hosted by rank 0 (the trainer's source rank), the same ``PrefixStore`` keys,
and a backend object (``ProcessGroupGloo`` on CPU, ``ProcessGroupNCCL`` on GPU) built directly
on it. Collectives are called on that object, so the default group is never touched.

    group = WeightUpdateGroup.create("gloo", "127.0.0.1", port, rank=0, world_size=3, group_name="pp0")
    group.broadcast(flat_tensor, src=0)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


@dataclass
class WeightUpdateGroup:
    """A rank's handle on one named weight-update group."""

    backend: str
    rank: int
    world_size: int
    group_name: str
    pg: Any
    store: Any

    @classmethod
    def create(
        cls,
        backend: str,
        master_address: str,
        master_port: int,
        *,
        rank: int,
        world_size: int,
        group_name: str,
        timeout_s: float = 300.0,
    ) -> WeightUpdateGroup:
        """Join (rank > 0) or host (rank 0) the group; blocks until all ``world_size`` ranks arrived."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(
            master_address,
            int(master_port),
            world_size,
            is_master=(rank == 0),
            timeout=timeout,
            wait_for_workers=False,
        )
        # The key layout of torch's ``_new_process_group_helper`` ("<group>/<device>/"), which SGLang's
        # ``init_custom_process_group`` goes through: a real SGLang server can join this group.
        device = "cuda" if backend == "nccl" else "cpu"
        prefixed = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", store))
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        # No extra handshake: SGLang does none after joining, so one here would hang against it.
        # (Gloo connects every pair in its constructor; NCCL connects at the first collective.)
        return cls(backend, rank, world_size, group_name, pg, store)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Broadcast ``tensor`` in place from ``src`` (blocking)."""
        self.pg.broadcast(tensor, src).wait()

    def broadcast_many(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Broadcast each tensor in place, all in flight at once (matched by order on every rank)."""
        works = [self.pg.broadcast(t, src) for t in tensors]
        for work in works:
            work.wait()

    def barrier(self) -> None:
        """All ranks meet (a 1-element broadcast, which every backend implements)."""
        device = "cuda" if self.backend == "nccl" else "cpu"
        self.broadcast(torch.zeros(1, device=device), 0)

    def destroy(self) -> None:
        """Drop the backend and the store connection."""
        shutdown = getattr(self.pg, "shutdown", None)
        if callable(shutdown) and self.backend == "nccl":
            shutdown()
        self.pg = None
        self.store = None
