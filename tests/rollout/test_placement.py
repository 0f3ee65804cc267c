"""rollout/placement.py: launched SGLang servers stay off the trainer's GPUs (the node's GPU count is an
input; sdpg-train's exit 2 on a simulated 8-GPU node: tests/test_cli_node.py)."""

import pytest

from sdpg_mcore.rollout.placement import COLOCATED_MEM_FRACTION, PlacementError, place_servers, trainer_gpus


def test_default_puts_servers_after_the_trainer_gpus():
    placement = place_servers(
        num_servers=2, tp_size=2, base_gpu_id=None, colocated=False, local_world_size=4, gpu_count=8
    )
    assert placement.trainer_gpus == (0, 1, 2, 3)
    assert placement.base_gpu_id == 4 and placement.server_gpus == ((4, 5), (6, 7))
    assert placement.mem_fraction_static is None  # SGLang's own default on GPUs of their own


def test_server_on_trainer_rank_0_gpu_is_refused_naming_the_keys():
    with pytest.raises(PlacementError) as err:
        place_servers(
            num_servers=1, tp_size=1, base_gpu_id=0, colocated=False, local_world_size=8, gpu_count=8
        )
    message = str(err.value)
    assert "rollout server 0 would run on GPU(s) [0]" in message
    assert "rollout.base_gpu_id" in message and "rollout.colocated=true" in message
    with pytest.raises(PlacementError, match=r"GPU\(s\) \[3\].*free: \[4, 5, 6, 7\]"):
        place_servers(
            num_servers=2, tp_size=2, base_gpu_id=3, colocated=False, local_world_size=4, gpu_count=8
        )


def test_a_full_node_leaves_no_gpu_for_servers_unless_colocated():
    with pytest.raises(
        PlacementError, match=r"need GPUs 8\.\.8 .*has 8 GPU\(s\), 8 of them used.*free: none"
    ):
        place_servers(
            num_servers=1, tp_size=1, base_gpu_id=None, colocated=False, local_world_size=8, gpu_count=8
        )
    shared = place_servers(
        num_servers=4, tp_size=2, base_gpu_id=None, colocated=True, local_world_size=8, gpu_count=8
    )
    assert shared.base_gpu_id == 0 and shared.server_gpus[3] == (6, 7)
    assert shared.mem_fraction_static == COLOCATED_MEM_FRACTION
    given = place_servers(
        num_servers=1, tp_size=8, base_gpu_id=None, colocated=True, local_world_size=8, gpu_count=8,
        mem_fraction_static=0.3,
    )  # fmt: skip
    assert given.mem_fraction_static == 0.3


def test_trainer_gpus_follow_the_process_group_binding():
    assert trainer_gpus(8, 8) == tuple(range(8))
    assert trainer_gpus(2, 8) == (0, 1)
    assert trainer_gpus(8, 1) == (0,)  # one GPU per task (Slurm --gpus-per-task=1): each sees GPU 0
