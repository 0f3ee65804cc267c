"""slurm/lib.sh role assignment and its errors, run in bash without Slurm (the node list is given)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "slurm" / "lib.sh"


def _roles(nodes: list[str], **env: str) -> subprocess.CompletedProcess:
    script = f"source {LIB}; NODES=({' '.join(nodes)}); sdpg_plan_roles && sdpg_print_roles"
    return subprocess.run(
        ["bash", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True
    )


def test_dedicated_70b_layout():
    proc = _roles([f"n{i}" for i in range(1, 7)], GPUS_PER_NODE="8", ROLLOUT_TP="8", ROLLOUT_NODES="2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "trainer: 4 node(s) (n1 n2 n3 n4) x 8 tasks = 32 ranks; master n1:?" in lines
    assert [line for line in lines if line.startswith("server")] == [
        "server 0: http://n5:30000 on n5 gpus=0,1,2,3,4,5,6,7",
        "server 1: http://n6:30000 on n6 gpus=0,1,2,3,4,5,6,7",
        "servers listen on: 0.0.0.0",  # the job spans hosts: reachable from the trainer's nodes
    ]
    assert "trainer rollout.urls: http://n5:30100" in lines


def test_colocated_one_node_without_router():
    """One host: the servers listen on loopback only, and the trainer reaches them there."""
    proc = _roles(["gpu1"], ROLLOUT_MODE="colocated", GPUS_PER_NODE="8", ROLLOUT_TP="2", USE_ROUTER="0")
    assert proc.returncode == 0, proc.stderr
    servers = [line for line in proc.stdout.splitlines() if line.startswith("server")]
    assert servers == [
        f"server {i}: http://127.0.0.1:{30000 + i} on gpu1 gpus={2 * i},{2 * i + 1}" for i in range(4)
    ] + ["servers listen on: 127.0.0.1"]
    assert (
        "trainer rollout.urls: " + ",".join(f"http://127.0.0.1:{30000 + i}" for i in range(4)) in proc.stdout
    )
    assert "x 8 tasks = 8 ranks" in proc.stdout


def test_repeated_host_gets_distinct_ports():
    """DRY_RUN repeats the one real node; servers of the same host must not share a port."""
    proc = _roles(["vm", "vm", "vm"], GPUS_PER_NODE="2", ROLLOUT_TP="1", ROLLOUT_NODES="2")
    assert proc.returncode == 0, proc.stderr
    ports = [
        line.split("http://127.0.0.1:")[1].split()[0]
        for line in proc.stdout.splitlines()
        if line.startswith("server ")
    ]
    assert ports == ["30000", "30001", "30002", "30003"]


@pytest.mark.parametrize(
    "nodes,env,message",
    [
        (
            ["n1"],
            {"GPUS_PER_NODE": "8", "ROLLOUT_TP": "8"},
            "ROLLOUT_MODE=dedicated needs 1 <= ROLLOUT_NODES < nodes",
        ),
        (["n1", "n2"], {"GPUS_PER_NODE": "8", "ROLLOUT_TP": "3"}, "ROLLOUT_TP=3 must divide GPUS_PER_NODE=8"),
        (["n1", "n2"], {"GPUS_PER_NODE": "8", "ROLLOUT_TP": "8", "ROLLOUT_MODE": "mixed"}, "is not one of"),
    ],
)
def test_bad_settings_exit_2_with_message(nodes, env, message):
    proc = _roles(nodes, **env)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_node_list_outside_slurm_and_fake_nodes_guard():
    proc = subprocess.run(
        ["bash", "-c", f"source {LIB}; sdpg_node_list"], capture_output=True, text=True, env={}
    )
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST is empty" in proc.stderr
    proc = subprocess.run(
        ["bash", "-c", f"source {LIB}; scontrol() {{ echo real1; }}; sdpg_node_list"],
        capture_output=True,
        text=True,
        env={"SLURM_JOB_NODELIST": "real1", "SDPG_FAKE_NODES": "3", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "only allowed with DRY_RUN=1" in proc.stderr


def _overrides(mode: str) -> list[str]:
    script = (
        f"source {LIB}; NODES=(n1 n2); sdpg_plan_roles && sdpg_print_roles >&2 && "
        "RUN_DIR=/r MODEL_PATH=/m sdpg_trainer_overrides"
    )
    env = {"PATH": "/usr/bin:/bin", "GPUS_PER_NODE": "8", "ROLLOUT_TP": "8", "ROLLOUT_MODE": mode}
    proc = subprocess.run(
        ["bash", "-c", script], env={**env, "ROLLOUT_NODES": "1"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines(), proc.stderr


def test_trainer_is_told_whether_the_servers_share_its_gpus():
    """Colocated servers: the trainer hands them its memory (rollout.colocated=true) and sends weights
    through disk (a distributed group refuses two ranks on one GPU; each server sees only its own
    GPUs, so tensor handles from the sending rank's GPU cannot reach it). Dedicated: own nodes."""
    colocated, roles = _overrides("colocated")
    assert colocated[-2:] == ["rollout.colocated=true", "rollout.weight_sync=disk"]
    assert "servers share the trainer's GPUs" in roles
    dedicated, roles = _overrides("dedicated")
    assert dedicated[-1] == "rollout.colocated=false" and "rollout.weight_sync=disk" not in dedicated
    assert "gpus: servers on their own nodes (n2), none on a trainer GPU" in roles
    assert dedicated[:3] == ["trainer.run_dir=/r", "model.path=/m", "rollout.backend=external"]
