import pytest
import torch
import torch.distributed as dist

from sdpg_mcore.parallel.spawn import spawn_ranks


def _allreduce_rank(rank, world_size, scale):
    t = torch.tensor([float(rank) * scale])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_spawn_ranks_runs_real_allreduce():
    assert spawn_ranks(_allreduce_rank, 3, args=(2.0,)) == [6.0, 6.0, 6.0]


def test_spawn_ranks_reports_failing_rank():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        spawn_ranks(_fail_on_rank_one, 2)


def _return_tensor(rank, world_size):
    return {"rank": rank, "values": torch.arange(4, dtype=torch.float64) * rank}


def test_spawn_ranks_returns_tensors_by_value():
    results = spawn_ranks(_return_tensor, 2)
    assert [r["rank"] for r in results] == [0, 1]
    assert torch.equal(results[1]["values"], torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64))


def _die_silently_on_rank_one(rank, world_size):
    import os
    import time

    if rank == 1:
        os._exit(3)  # no result, no traceback: as when a child cannot even import its function
    time.sleep(600)  # rank 0 would wait for rank 1 in a collective
    return rank


def test_spawn_ranks_fails_at_once_when_a_rank_dies_without_a_result():
    import time

    began = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"rank\(s\) \[1\] .* exited without a result \(exit codes \{1: 3\}\)"
    ):
        spawn_ranks(_die_silently_on_rank_one, 2, timeout_s=300)
    assert time.monotonic() - began < 60  # not the 300 s timeout
