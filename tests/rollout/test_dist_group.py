"""The weight-update group's rendezvous keys match SGLang's ``init_custom_process_group`` exactly."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist

from sdpg_mcore.rollout.dist_group import WeightUpdateGroup, host_store, start_collective


def sglang_join(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str, timeout_s: float
):
    """SGLang 0.5.23's ``init_custom_process_group`` (sglang/srt/utils/common.py), as it runs on a server."""
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        dist.Backend("gloo"),
        store,
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def test_sglang_side_joins_and_receives_a_broadcast():
    store = host_store("127.0.0.1", 0, timeout_s=20)
    received = {}

    def server() -> None:
        pg = sglang_join("127.0.0.1", store.port, 1, 2, "sdpg_weights_pp0", timeout_s=20)
        buffer = torch.zeros(5)
        dist.broadcast(buffer, src=0, group=pg)
        received["tensor"] = buffer

    thread = threading.Thread(target=server)
    thread.start()
    group = WeightUpdateGroup.create(
        "gloo",
        "127.0.0.1",
        store.port,
        rank=0,
        world_size=2,
        group_name="sdpg_weights_pp0",
        timeout_s=20,
        store=store,
    )
    group.broadcast(torch.arange(5, dtype=torch.float32), 0)
    thread.join(timeout=30)
    assert torch.equal(received["tensor"], torch.arange(5, dtype=torch.float32))
    group.destroy()


def test_destroy_does_not_wait_for_a_broadcast_nobody_joined():
    """A server that refused a bucket never joins its broadcast, and gloo cannot abort one: dropping
    the group must not block the trainer until the group's timeout (it did, for 120 s, in CI)."""
    store = host_store("127.0.0.1", 0, timeout_s=20)
    timeout_s = 6.0
    joined = threading.Thread(
        target=sglang_join, args=("127.0.0.1", store.port, 1, 2, "refused", timeout_s), daemon=True
    )
    joined.start()
    group = WeightUpdateGroup.create(
        "gloo", "127.0.0.1", store.port, rank=0, world_size=2, group_name="refused", timeout_s=timeout_s,
        store=store,
    )  # fmt: skip
    joined.join()
    sent = start_collective(lambda: group.broadcast(torch.ones(68), 0))  # rank 1 never receives
    time.sleep(0.5)
    start = time.monotonic()
    group.destroy(after=sent)
    assert time.monotonic() - start < 1.0 and not sent.done()
    with pytest.raises(RuntimeError, match="[Tt]imed out"):
        sent.result(timeout=4 * timeout_s)
    assert group.pg is None  # dropped in the broadcast's thread once it ended
