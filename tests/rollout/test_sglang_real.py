"""Real SGLang beyond the one-server contract: TP2 servers behind the real router, and the trainer.

Slow (each real server takes 24-35 s to start on 2 cores, TP2 two processes): ``pytest -m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import start_servers
from launch_testlib import launch_overrides, make_assets, require_real_sglang, train_rank
from test_contract import assert_serves, hf_tensors

from sdpg_mcore.rollout.http import http_json
from sdpg_mcore.rollout.sglang_launch import check_servers
from sdpg_mcore.rollout.weight_sync import DistributedWeightSync, weight_versions

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_tp2_servers_behind_router_take_a_broadcast(tiny_model_dir, tmp_path):
    """Two TP2 servers = 4 ranks of the group (rank = rank_offset + tp_rank), world size 5."""
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    require_real_sglang()
    other = save_tiny_hf_model(tmp_path / "other", arch="qwen3", seed=11)
    servers = start_servers(
        tiny_model_dir, tmp_path / "logs", num_servers=2, backend="sglang", tp_size=2, router=True
    )
    try:
        urls, key = servers.worker_urls, servers.api_key
        assert [f.tp_size for f in check_servers(urls, weight_sync="distributed", api_key=key)] == [2, 2]
        sync = DistributedWeightSync(urls, server_tp_sizes=[2, 2], bucket_bytes=64 << 10, api_key=key)
        try:
            assert sync.world_size == 5 and sync.rank_offsets() == [1, 3]
            sync.push(hf_tensors(other), "tp2-1")
        finally:
            sync.close()
        assert weight_versions(urls, api_key=key) == {u: "tp2-1" for u in urls}
        for url in urls:
            assert_serves(url, other, key)
        status, out = http_json(
            f"{servers.url}/generate",
            {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}},
            api_key=key,
        )
        assert status == 200 and out["meta_info"]["weight_version"] == "tp2-1"
    finally:
        servers.stop()


@pytest.mark.parametrize(
    ("weight_sync", "colocated", "async_steps", "num_servers"),
    [  # .ci/run (-m ci) runs the broadcast cases; disk and tensor sync to real SGLang are in the
        # default suite's contract tests (tests/rollout/test_contract.py), their trainer runs are slow
        pytest.param("distributed", False, 0, 1, id="distributed", marks=pytest.mark.ci),
        pytest.param("disk", False, 0, 1, id="disk"),
        pytest.param("tensor", True, 0, 1, id="tensor-colocated"),
        pytest.param(
            "distributed", False, 1, 2, id="async-distributed-2-servers-router", marks=pytest.mark.ci
        ),
    ],
)
def test_trainer_on_real_sglang(tmp_path, weight_sync, colocated, async_steps, num_servers):
    """Three SDPG steps with real SGLang: engine and trainer log-probs agree in fp32, versions follow steps.

    ``colocated``: the engine releases its memory after each rollout and resumes it before the push.
    ``async_steps=1`` (two servers behind the router): each step after the first samples weights one
    version behind the trainer, and no request is lost to the pushes made while it ran.
    """
    from sdpg_mcore.config import load_config
    from sdpg_mcore.parallel.spawn import spawn_ranks

    require_real_sglang()
    assets = make_assets(tmp_path / "assets", sft_steps=3, num_train=64)
    overrides = launch_overrides(
        assets,
        tmp_path / "run",
        "data.batch_prompts=4",
        "data.mini_batch_prompts=2",
        "data.max_response_length=24",
        "rollout.n=4",
        "rollout.backend=sglang",
        f"rollout.weight_sync={weight_sync}",
        f"rollout.colocated={str(colocated).lower()}",
        f"rollout.async_steps={async_steps}",
        f"rollout.num_servers={num_servers}",
        f"rollout.router={str(num_servers > 1).lower()}",
        "rollout.startup_timeout_s=600",
        "trainer.total_steps=3",
    )
    load_config(REPO / "examples" / "tiny" / "sdpg.yaml", overrides)  # bad overrides fail here, not in a rank
    spawn_ranks(train_rank, 1, args=(overrides,), timeout_s=900)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/num_aborted"] == 0 and r["rollout/dropped_aborted"] == 0 for r in records)
    if not async_steps:
        assert [r["rollout/weight_version"] for r in records] == [0.0, 1.0, 2.0]
        for record in records:
            assert record["logprob_mismatch"] <= 1e-4, record["logprob_mismatch"]
        return
    assert [r["async/start_lag"] for r in records] == [0.0, 1.0, 1.0]
    # A request still running at the next push reports the version it finished with (lag 0), so the
    # lag of a request is at most async_steps, not exactly it (start_lag above is exact).
    assert all(0.0 <= r["rollout/version_lag_max"] <= 1.0 for r in records[1:])
    assert records[0]["logprob_mismatch"] <= 1e-4  # the initial weights on both sides
    assert all(0 < r["rollout_is_weight"] <= 2.0 for r in records)  # rollout_is_cap's async default
