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
