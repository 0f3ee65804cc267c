"""The weight push of asynchronous rollouts on the dev server: paused in place, a request in flight
stalls only for the update, keeps its progress, and finishes under the new weights."""

from __future__ import annotations

import asyncio

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.rollout.client import ClientConfig, RolloutClient


def test_update_while_paused_in_place_does_not_wait_for_requests(tiny_model_dir, server_factory, tmp_path):
    new_weights = save_tiny_hf_model(tmp_path / "v1", arch="qwen3", seed=1)
    servers = server_factory(tiny_model_dir, tmp_path / "logs", num_servers=1, router=False)
    worker = servers.worker_urls[0]
    client = RolloutClient(ClientConfig(url=worker, request_timeout_s=600, max_retries=0))
    body = {
        "input_ids": [1, 2],
        "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
        "return_logprob": True,
    }

    async def in_flight() -> int:
        return (await client.get("/get_server_info"))[1]["internal_states"][0]["num_in_flight"]

    async def scenario():
        task = asyncio.ensure_future(client.generate_raw(body))
        while not await in_flight():
            await asyncio.sleep(0.02)
        assert (await client.post("/pause_generation", {"mode": "in_place"}))[0] == 200
        update = {"model_path": str(new_weights), "weight_version": "1", "flush_cache": False}
        status, answer = await client.post("/update_weights_from_disk", update, timeout_s=300)
        still_running = await in_flight()  # the update did not wait for the request to end
        assert (await client.post("/continue_generation", {}))[0] == 200
        return status, answer, still_running, await task

    try:
        status, answer, still_running, out = client.run(scenario())
    finally:
        servers.stop()
    assert status == 200 and answer["success"], answer
    assert still_running == 1
    meta = out["meta_info"]
    # Not aborted, nothing lost: all 200 tokens, the last ones sampled with the new weights.
    assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == 200
    assert meta["weight_version"] == "1" and len(meta["output_token_logprobs"]) == 200
