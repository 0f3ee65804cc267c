"""A weight-update process group that lives beside (not inside) the default ``torch.distributed`` world.

The trainer already runs Megatron's default group; the servers run none. SGLang's
``init_custom_process_group`` solves this with a private rendezvous; we do the same with public
API: a ``TCPStore`` hosted by rank 0 (the trainer's source rank, on a port its own host picks),
the same ``PrefixStore`` keys as SGLang's side (:func:`group_store`), and a backend object
(``ProcessGroupGloo`` on CPU, ``ProcessGroupNCCL`` on GPU) built directly on it. Collectives are
called on that object, so the default group is never touched.

    store = host_store("10.0.0.5")                     # port 0: the OS picks a free one, store.port says which
    # ... tell the servers (master_address, store.port) over HTTP, then:
    group = WeightUpdateGroup.create("gloo", "10.0.0.5", store.port, rank=0, world_size=3,
                                     group_name="pp0", store=store)
    group.broadcast(flat_tensor, src=0)
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


def group_store(store: Any, group_name: str, device: str) -> Any:
    """The keys SGLang's side of the group uses, over the shared rendezvous ``store``.

    ``init_custom_process_group`` (sglang/srt/utils/common.py) wraps its rendezvous store in
    ``PrefixStore(group_name, ...)``, then torch's ``_new_process_group_helper`` adds
    ``PrefixStore(f"{group_name}/", ...)`` and ``PrefixStore(f"{device}/", ...)``: both sides must
    read and write the same keys, or each waits for the other until the timeout.
    """
    sglang_prefixed = dist.PrefixStore(group_name, store)
    return dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", sglang_prefixed))


def host_store(address: str, port: int = 0, timeout_s: float = 300.0) -> Any:
    """Rank 0's rendezvous ``TCPStore`` on this host; ``port=0`` lets the OS pick (read ``.port``)."""
    return dist.TCPStore(
        address,
        int(port),
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def routable_address(server_urls: list[str]) -> str:
    """This host's address as the servers reach it: loopback when they all run here, else the
    address of the interface that routes to the first remote server (a UDP connect sends nothing)."""
    from urllib.parse import urlparse

    hosts = [urlparse(u).hostname or "127.0.0.1" for u in server_urls]
    remote = [h for h in hosts if not _is_loopback(h)]
    if not remote:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(remote[0]), 9))
        return probe.getsockname()[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        store: Any = None,
    ) -> WeightUpdateGroup:
        """Join (rank > 0) or host (rank 0) the group; blocks until all ``world_size`` ranks arrived.

        Rank 0 may pass the ``store`` it already hosts (:func:`host_store`) after telling the
        servers its port."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(
                master_address,
                int(master_port),
                world_size,
                is_master=(rank == 0),
                timeout=timeout,
                wait_for_workers=False,
            )
        device = "cuda" if backend == "nccl" else "cpu"
        prefixed = group_store(store, group_name, device)
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

    def destroy(self, *, after: Future | None = None) -> None:
        """Drop the backend and the store connection, without waiting for a collective in flight.

        NCCL aborts its communicators now (the collective in flight fails). Gloo cannot abort one:
        neither ``abort`` nor ``shutdown`` ends it, and the backend's destructor waits for it (up to
        the group's timeout). So a gloo group whose collective ``after`` is still running is dropped
        when that ends, in the thread that ran it, and the caller goes on at once."""
        if self.backend == "nccl" and callable(getattr(self.pg, "shutdown", None)):
            self.pg.shutdown()
        if after is not None and not after.done():
            after.add_done_callback(lambda _: self._drop())
        else:
            self._drop()

    def _drop(self) -> None:
        self.pg = None
        self.store = None


def start_collective(fn: Callable[[], Any], name: str = "weight-sync-collective") -> Future:
    """Run ``fn`` (a collective, or forming a group) in a daemon thread of its own; its future.

    Not in a thread pool: a collective that a refusing server never joins ends only at the group's
    timeout, and meanwhile it must neither hold a pool worker the next group needs nor keep the
    interpreter from exiting."""
    future: Future = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001 (the waiter re-raises it)
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
