"""Every rank binds to its own GPU: ``device_binding`` picks NCCL + ``cuda:local_rank`` whenever a GPU
is visible (gloo on the host otherwise), for torchrun/Slurm launches, ``spawn_ranks`` and a process
group another launcher made. CPU-checkable parts: the pure choice, the binding of an existing real
gloo world on a simulated GPU node, and that nothing else creates a default process group."""

import re
from pathlib import Path

import pytest

from sdpg_mcore.parallel.spawn import check_gpus_for_ranks, spawn_ranks
from sdpg_mcore.parallel.state import DeviceBinding, device_binding, resolve_launch_env, slurm_tasks_on_node

REPO = Path(__file__).resolve().parents[2]


def test_nccl_on_the_local_rank_gpu_whenever_cuda_is_present():
    assert [device_binding(r, 8) for r in range(8)] == [DeviceBinding("nccl", r) for r in range(8)]
    assert device_binding(3, 0) == DeviceBinding("gloo", None)
    # One GPU shown per task (Slurm --gpus-per-task=1, per-task CUDA_VISIBLE_DEVICES): each uses its cuda:0.
    assert device_binding(5, 1) == DeviceBinding("nccl", 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        device_binding(-1, 8)


def test_local_world_size_from_torchrun_and_slurm():
    torchrun = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    assert resolve_launch_env(torchrun).local_world_size == 8
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "12", "SLURM_NODELIST": "n[1-2]", "SLURM_LOCALID": "1"}
    assert (
        resolve_launch_env({**slurm, "SLURM_TASKS_PER_NODE": "8,4", "SLURM_NODEID": "1"}).local_world_size
        == 4
    )
    assert slurm_tasks_on_node("8(x4)", 3) == 8
    assert slurm_tasks_on_node("2(x3),1", 3) == 1
    with pytest.raises(ValueError, match="SLURM_NODEID=2"):
        slurm_tasks_on_node("8", 2)
    assert resolve_launch_env({}).local_world_size == 1


def test_spawn_refuses_more_ranks_than_gpus_before_starting_any():
    check_gpus_for_ranks(4, 0)  # CPU: gloo, any number of ranks
    check_gpus_for_ranks(4, 4)
    with pytest.raises(ValueError, match="4 ranks on a machine that shows 1 GPU"):
        check_gpus_for_ranks(4, 1)


def _bind_existing_world(rank, world_size):
    """A real gloo world made by ``spawn_ranks`` (no GPU here), then ``initialize_distributed`` as on a
    node of 4 GPUs: it must bind this rank to ``cuda:LOCAL_RANK`` even though the group exists."""
    import torch

    from sdpg_mcore.audit.simulated_node import simulated_gpus
    from sdpg_mcore.parallel import state

    bound = []
    saved = torch.cuda.set_device
    torch.cuda.set_device = bound.append
    try:
        with simulated_gpus(4):
            env = state.initialize_distributed()
    finally:
        torch.cuda.set_device = saved
    return env.local_rank, env.local_world_size, bound


def test_an_existing_process_group_still_binds_each_rank_to_its_gpu():
    results = spawn_ranks(_bind_existing_world, 2)
    assert results == [(0, 2, [0]), (1, 2, [1])]


def test_only_the_parallel_package_creates_process_groups():
    """Tools and the package reach NCCL only through ``parallel.state`` (which binds the device first)."""
    offenders = []
    for path in [
        *REPO.glob("sdpg_mcore/**/*.py"),
        *REPO.glob("tools/*.py"),
        *REPO.glob("checkpoints_convert/**/*.py"),
    ]:
        if "sdpg_mcore/parallel/" in str(path):
            continue
        if re.search(r"\binit_process_group\(", path.read_text()):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
