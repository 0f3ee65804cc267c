"""Launch-environment parsing (pure) and Megatron process groups on real gloo ranks."""

import pytest
import torch.distributed as dist

from sdpg_mcore.parallel import state
from sdpg_mcore.parallel.spawn import spawn_ranks


def test_torchrun_env_wins_over_slurm():
    env = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="h0", MASTER_PORT="1234")
    env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_NODELIST="n[1-2]")
    launch = state.resolve_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)
    assert (launch.master_addr, launch.master_port, launch.source) == ("h0", 1234, "torchrun")


def test_slurm_env_takes_master_from_nodelist_and_port_from_job_id():
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5", SLURM_NODELIST="gpu[007-008,010]")
    env["SLURM_JOB_ID"] = "123456"
    launch = state.resolve_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.source) == (5, 16, 5, "slurm")
    assert launch.master_addr == "gpu007"
    assert launch.master_port == 20000 + 123456 % 20000


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node1", "node1"), ("a[3-4],b1", "a3"), ("gpu[010,012]-ib", "gpu010-ib"), ("x1,y[1-2]", "x1")],
)
def test_first_slurm_host(nodelist, first):
    assert state.first_slurm_host(nodelist) == first


def test_single_process_and_bad_values():
    assert state.resolve_launch_env({}).source == "single"
    with pytest.raises(ValueError, match="RANK"):
        state.resolve_launch_env(dict(RANK="x", WORLD_SIZE="2"))
    with pytest.raises(ValueError, match="outside world size"):
        state.resolve_launch_env(dict(RANK="2", WORLD_SIZE="2"))
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        state.resolve_launch_env(dict(SLURM_PROCID="0", SLURM_NTASKS="2"))


def _layouts(rank, world_size):
    launch = state.initialize_distributed()  # reuses spawn_ranks' group
    assert launch.source == "existing" and launch.world_size == world_size
    out = {}
    for tp, pp in ((2, 2), (1, 2)):  # each layout costs seconds of group creation
        layout = state.initialize_model_parallel(tp=tp, pp=pp, seed=7)
        out[(tp, pp)] = layout
    try:
        state.initialize_model_parallel(tp=3)
    except ValueError as err:
        out["error"] = str(err)
    state.destroy()
    from megatron.core import parallel_state

    out["destroyed"] = not parallel_state.model_parallel_is_initialized()
    out["still_dist"] = dist.is_initialized()
    return out


@pytest.mark.slow  # four-rank layouts also run in the default suite's TP2 x PP2 step parity
def test_model_parallel_layouts_on_four_ranks():
    results = spawn_ranks(_layouts, 4)
    for rank, out in enumerate(results):
        assert out[(2, 2)].dp == 1 and out[(1, 2)].dp == 2
        assert out[(2, 2)].tp_rank == rank % 2 and out[(2, 2)].pp_rank == rank // 2
        assert (
            out[(1, 2)].dp_rank == rank % 2 and out[(1, 2)].pp_rank == rank // 2 and out[(1, 2)].tp_rank == 0
        )
        assert "world size 4 is not divisible by tp*pp*cp = 3*1*1 = 3" in out["error"]
        assert out["destroyed"] and out["still_dist"]
