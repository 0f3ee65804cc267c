"""Real SGLang's launch flags, start-up checks, CPU shim and weight-group layout (no server needed)."""

from __future__ import annotations

import json

import pytest
import torch

from sdpg_mcore.rollout.dist_group import routable_address
from sdpg_mcore.rollout.sglang_launch import (
    SHIM_DIR,
    ServerFacts,
    SGLangServerError,
    check_facts,
    cpu_thread_binding,
    parse_version,
    sglang_command,
)
from sdpg_mcore.rollout.weight_sync import DistributedWeightSync


def _command(model_path, **overrides):
    kwargs = dict(
        python="py",
        model_path=str(model_path),
        host="127.0.0.1",
        port=30002,
        index=1,
        tp_size=2,
        dp_size=1,
        base_gpu_id=0,
        cuda=True,
        deterministic=True,
    )
    return sglang_command(**{**kwargs, **overrides})


def test_gpu_command_line(tmp_path):
    cmd, env = _command(tmp_path, dp_size=2, mem_fraction_static=0.7, enable_memory_saver=True)
    joined = " ".join(cmd)
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    for flag in (
        "--tp-size 2",
        "--dp-size 2",
        "--base-gpu-id 4",
        "--mem-fraction-static 0.7",
        "--port 30002",
    ):
        assert flag in joined, flag
    # the client sends sampling_seed: SGLang ignores it without this flag
    assert "--enable-deterministic-inference" in cmd and "--enable-memory-saver" in cmd
    assert "--device" not in cmd and env == {}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_command_line(tmp_path, dtype):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": dtype}))
    cmd, env = _command(tmp_path, cuda=False, enable_memory_saver=True)
    joined = " ".join(cmd)
    assert "--enable-memory-saver" not in cmd
    for flag in ("--device cpu", "--attention-backend torch_native", "--disable-cuda-graph", "--tp-size 2"):
        assert flag in joined, flag
    # fp32 checkpoints stay fp32 (SGLang would cast them to fp16 on CPU); others keep SGLang's choice
    assert ("--dtype float32" in joined) == (dtype == "float32")
    assert "--enable-deterministic-inference" not in cmd  # needs fa3/flashinfer/triton attention
    assert "--base-gpu-id" not in cmd
    assert env["SGLANG_CPU_OMP_THREADS_BIND"].count("|") == 1  # one core per TP rank
    assert env["PYTHONPATH"].split(":")[0] == str(SHIM_DIR)
    with pytest.raises(SGLangServerError, match="dp_size"):
        _command(tmp_path, cuda=False, dp_size=2)


def test_cpu_thread_binding():
    assert cpu_thread_binding(0, 2, [0, 1]) == "0|1"
    assert cpu_thread_binding(1, 2, [0, 1]) == "0|1"  # fewer cores than ranks: servers share them
    assert cpu_thread_binding(1, 2, [0, 1, 2, 3]) == "2|3"


def test_version_and_dp_checks():
    assert parse_version("0.5.23") == (0, 5, 23) and parse_version("0.5.23.post1") == (0, 5, 23)
    assert parse_version("0.5.23-sdpg-dev") == (0, 5, 23)
    good = ServerFacts("http://a:1", "0.5.23", tp_size=2, dp_size=1)
    check_facts([good], weight_sync="distributed")
    with pytest.raises(SGLangServerError, match=r"0\.5\.8.*>= 0\.5\.21"):
        check_facts([ServerFacts("http://a:1", "0.5.8", 1, 1)], weight_sync="disk")
    data_parallel = ServerFacts("http://a:1", "0.5.23", 1, 2)
    with pytest.raises(SGLangServerError, match="--dp-size 2"):
        check_facts([data_parallel], weight_sync="distributed")
    check_facts([data_parallel], weight_sync="disk")


def test_group_layout_counts_every_tp_rank():
    # a TP-k server holds k ranks of the group: rank = rank_offset + tp_rank
    sync = DistributedWeightSync(
        ["http://a:1", "http://b:2", "http://c:3"], server_tp_sizes=[2, 4, 1], master_address="10.0.0.1"
    )
    assert sync.world_size == 1 + 2 + 4 + 1
    assert sync.rank_offsets() == [1, 3, 7]
    sync.close()


def test_master_address_is_routable():
    assert routable_address(["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"
    sync = DistributedWeightSync(["http://127.0.0.1:1"])
    assert sync.master_address == "127.0.0.1" and sync.master_port == 0  # 0: picked on this host at connect
    sync.close()


def _rotary_reference(x_TD, positions_T, cos_sin_PR, head_size, is_neox):
    """fp64 rotation as complex multiplication, pair by pair."""
    rot = cos_sin_PR.shape[-1]
    half = rot // 2
    out = x_TD.clone().view(x_TD.shape[0], -1, head_size)
    for t, p in enumerate(positions_T.tolist()):
        for h in range(out.shape[1]):
            for i in range(half):
                a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
                z = complex(out[t, h, a], out[t, h, b]) * complex(cos_sin_PR[p, i], cos_sin_PR[p, half + i])
                out[t, h, a], out[t, h, b] = z.real, z.imag
    return out.view_as(x_TD)


@pytest.mark.parametrize("is_neox", [True, False])
def test_cpu_shim_rotary_matches_reference(is_neox):
    import importlib.util

    spec = importlib.util.spec_from_file_location("shim_ops", SHIM_DIR / "vllm" / "_custom_ops.py")
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    torch.manual_seed(0)
    head_size, rot, heads, kv_heads = 8, 6, 3, 1  # partial rotary: the last 2 channels stay
    theta_PH = torch.arange(16, dtype=torch.float64)[:, None] * (
        10000 ** (-torch.arange(rot // 2) / (rot // 2))
    )
    cos_sin_PR = torch.cat([theta_PH.cos(), theta_PH.sin()], dim=-1)
    positions_T = torch.tensor([3, 0, 15, 7])
    query_TD = torch.randn(4, heads * head_size, dtype=torch.float64)
    key_TD = torch.randn(4, kv_heads * head_size, dtype=torch.float64)
    expected_q = _rotary_reference(query_TD, positions_T, cos_sin_PR, head_size, is_neox)
    expected_k = _rotary_reference(key_TD, positions_T, cos_sin_PR, head_size, is_neox)
    ops.rotary_embedding(positions_T, query_TD, key_TD, head_size, cos_sin_PR, is_neox)
    assert torch.allclose(query_TD, expected_q, atol=1e-12) and torch.allclose(key_TD, expected_k, atol=1e-12)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rollout.colocated=true", "rollout.weight_sync=distributed"], "rollout.weight_sync"),
        (["rollout.tp_size=2"], "rollout.tp_size"),  # the builtin server is TP1
        (["rollout.tp_size=0", "rollout.backend=sglang"], "rollout.tp_size"),
        (["rollout.base_gpu_id=-1"], "rollout.base_gpu_id"),
        (["rollout.mem_fraction_static=1.5"], "rollout.mem_fraction_static"),
        (["rollout.watchdog_s=-1"], "rollout.watchdog_s"),
    ],
)
def test_rollout_config_errors_name_the_key(overrides, key):
    from pathlib import Path

    from sdpg_mcore.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "sdpg.yaml"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(recipe, overrides)
    cfg = load_config(recipe, ["rollout.colocated=true", "rollout.weight_sync=tensor"])
    assert cfg.rollout.colocated and cfg.rollout.weight_sync == "tensor"


def test_launched_sglang_gets_its_own_gpus_and_no_trainer_settings(tmp_path, monkeypatch):
    """The trainer's launch of SGLang on a simulated 8-GPU node with 4 trainer ranks: the servers'
    command lines carry the placement (``--base-gpu-id`` 4 and 6, the memory fraction) and their
    environment none of the trainer's launcher or thread settings; the built-in server keeps its threads."""
    from sdpg_mcore.audit.simulated_node import simulated_gpus
    from sdpg_mcore.config import RolloutConfig
    from sdpg_mcore.rollout.servers import RolloutServers
    from sdpg_mcore.train.rollout_io import launched_server_config

    for key, value in {
        "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500", "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "TORCHELASTIC_RUN_ID": "x", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SDPG_SGLANG_PYTHON", "py")
    rollout = RolloutConfig(backend="sglang", num_servers=2, tp_size=2, mem_fraction_static=0.6)
    with simulated_gpus(8):
        config = launched_server_config(rollout, str(tmp_path), tmp_path, local_world_size=4)
        servers = RolloutServers(config).servers
    commands = [" ".join(s.cmd) for s in servers]
    assert "--base-gpu-id 4" in commands[0] and "--base-gpu-id 6" in commands[1]
    assert all("--mem-fraction-static 0.6" in c for c in commands)
    for server in servers:
        leaked = {k for k in server.env if k in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                 "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
                                                 "CUDA_DEVICE_MAX_CONNECTIONS"} or k.startswith("TORCHELASTIC_")}  # fmt: skip
        assert leaked == set()
        assert server.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # --base-gpu-id counts in it
    builtin = launched_server_config(RolloutConfig(server_threads=2), str(tmp_path), tmp_path, 1)
    assert builtin.env == {"OMP_NUM_THREADS": "2"} and builtin.backend == "dev"
    colocated = RolloutConfig(backend="sglang", colocated=True, weight_sync="tensor")
    with simulated_gpus(8):
        shared = launched_server_config(colocated, str(tmp_path), tmp_path, local_world_size=8)
    assert shared.base_gpu_id == 0 and shared.mem_fraction_static == 0.5 and shared.enable_memory_saver
    assert shared.api_key_file == str(tmp_path / "secrets" / "rollout_api_key")
