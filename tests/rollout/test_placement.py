"""rollout/placement.py and its start-up check: launched SGLang servers stay off the trainer's GPUs.

The placement takes the node's GPU count as an input; the CLI tests run the real ``sdpg-train``
entry point as on an 8-GPU node (``sdpg_mcore.audit.simulated_node``: CUDA reports 8 devices, the
command must stop before touching one).
"""

import subprocess
import sys
import time

import pytest

from sdpg_mcore.rollout.placement import COLOCATED_MEM_FRACTION, PlacementError, place_servers, trainer_gpus

TORCHRUN_8 = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}


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


RECIPE = """
model: {{path: {model}}}
data: {{train_files: [a.jsonl], max_prompt_length: 16, max_response_length: 8, micro_batch_tokens: 64,
       batch_prompts: 4, mini_batch_prompts: 2}}
rollout: {{backend: sglang}}
"""


@pytest.fixture
def recipe(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model))
    return str(path)


def run_cli_on_node(gpus: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real ``sdpg-train`` entry point as on a node with ``gpus`` GPUs."""
    import os

    command = [
        sys.executable,
        "-m",
        "sdpg_mcore.audit.simulated_node",
        "--gpus",
        str(gpus),
        "-m",
        "sdpg_mcore.cli",
    ]
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_8 and not k.startswith("SLURM_")}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


def test_cli_refuses_a_server_on_trainer_rank_0_gpu_of_a_simulated_8_gpu_node(recipe):
    began = time.monotonic()
    proc = run_cli_on_node(8, "--config", recipe, "rollout.base_gpu_id=0", env=TORCHRUN_8)
    assert proc.returncode == 2, proc.stderr
    assert "sdpg-train: error: rollout server 0 would run on GPU(s) [0]" in proc.stderr
    assert "rollout.base_gpu_id" in proc.stderr and "rollout.colocated" in proc.stderr
    assert time.monotonic() - began < 60
    colocated = run_cli_on_node(8, "--config", recipe, "rollout.base_gpu_id=0", "rollout.colocated=true",
                                "model.transformer_impl=te", env=TORCHRUN_8)  # fmt: skip
    assert colocated.returncode == 2  # past the placement: stopped by the next check (no TE here)
    assert "would run on GPU" not in colocated.stderr and "model.transformer_impl" in colocated.stderr


def test_cli_placement_counts_local_ranks_not_the_world():
    """A 2-node torchrun job of 4 ranks per node on 8-GPU nodes: servers on GPUs 4.. are fine."""
    from sdpg_mcore.cli import check_node
    from sdpg_mcore.config import ConfigError, config_from_dict

    cfg = config_from_dict({"rollout": {"backend": "sglang", "num_servers": 2, "tp_size": 2}})
    check_node(cfg, local_world_size=4, gpu_count=8)  # GPUs 4-7 are free
    with pytest.raises(ConfigError, match="rollout.num_servers=2 x rollout.tp_size=2"):
        check_node(cfg, local_world_size=6, gpu_count=8)
    check_node(cfg, local_world_size=8, gpu_count=0)  # no GPU: the CPU servers need no placement
