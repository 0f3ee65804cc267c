"""Generation through two dev servers behind the real ``sglang_router``, over real HTTP."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from sdpg_mcore.rollout.client import ClientConfig, RolloutClient
from sdpg_mcore.rollout.http import http_json
from sdpg_mcore.rollout.protocol import SamplingParams
from sdpg_mcore.rollout.servers import MemoryOccupation
from sdpg_mcore.rollout.weight_sync import flush_caches


def logprob_drift(rollout: list[list[float]], trainer: list[list[float]]) -> dict[str, float]:
    """Per-token |rollout log-prob - reference log-prob| over all responses (mean and max); the lists are
    aligned per response, token by token. (The trainer logs its own per-step ``logprob_mismatch``.)"""
    if len(rollout) != len(trainer) or any(len(a) != len(b) for a, b in zip(rollout, trainer)):
        raise ValueError("rollout and trainer log-probs must have the same number of responses and tokens")
    diffs = [abs(a - b) for ra, tb in zip(rollout, trainer) for a, b in zip(ra, tb)]
    if not diffs:
        return {"logprob_diff_mean": 0.0, "logprob_diff_max": 0.0}
    return {"logprob_diff_mean": sum(diffs) / len(diffs), "logprob_diff_max": max(diffs)}


def test_logprob_drift():
    assert logprob_drift([[-1.0, -2.0]], [[-1.5, -2.0]]) == {
        "logprob_diff_mean": 0.25,
        "logprob_diff_max": 0.5,
    }
    with pytest.raises(ValueError, match="same number"):
        logprob_drift([[-1.0]], [[-1.0, -2.0]])


PROMPTS = [[5, 17, 42, 8], [3, 9], [100, 101, 102, 103, 104, 105], [7]]


def make_client(servers, **kw) -> RolloutClient:
    return RolloutClient(
        ClientConfig(url=servers.url, worker_urls=servers.worker_urls, api_key=servers.api_key, **kw)
    )


def reference_logprobs(model_dir, prompt, output, temperature: float) -> torch.Tensor:
    """Log-probs of ``output`` after ``prompt`` from a plain, unbatched transformers forward in fp64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits_LV = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    logprobs_LV = torch.log_softmax(logits_LV / temperature, dim=-1)
    return logprobs_LV.gather(1, torch.tensor(output)[:, None])[:, 0]


def test_batched_generation_with_logprobs(servers):
    client = make_client(servers)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    groups = client.run(client.generate(PROMPTS, params, n=3, seed=1))
    assert [len(g) for g in groups] == [3] * len(PROMPTS)
    for i, group in enumerate(groups):
        for j, sample in enumerate(group):
            assert (sample.prompt_index, sample.sample_index) == (i, j)
            assert sample.prompt_ids == PROMPTS[i]
            assert len(sample.output_ids) == 6 and len(sample.rollout_logprobs) == 6
            assert sample.finish_reason == "length" and sample.weight_version == "default"
            assert all(lp <= 0 for lp in sample.rollout_logprobs)
    assert client.metrics.num_requests == 12 and client.metrics.num_output_tokens == 72
    assert client.metrics.output_tokens_per_s > 0
    # The router spread the requests over both workers.
    counts = [
        http_json(f"{u}/get_server_info", api_key=servers.api_key)[1]["internal_states"][0][
            "num_generate_requests"
        ]
        for u in servers.worker_urls
    ]
    assert all(c > 0 for c in counts), counts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_transformers(servers, tiny_model_dir, temperature):
    client = make_client(servers)
    params = SamplingParams(max_new_tokens=8, temperature=temperature, ignore_eos=True)
    groups = client.run(client.generate(PROMPTS, params, n=2, seed=3))
    samples = [s for group in groups for s in group]
    trainer = [
        reference_logprobs(tiny_model_dir, s.prompt_ids, s.output_ids, temperature).tolist() for s in samples
    ]
    drift = logprob_drift([s.rollout_logprobs for s in samples], trainer)
    assert drift["logprob_diff_mean"] <= 1e-4, drift
    assert drift["logprob_diff_max"] <= 1e-3, drift
    # The check has teeth: log-probs of the untempered distribution differ when T != 1.
    if temperature != 1.0:
        untempered = [
            reference_logprobs(tiny_model_dir, s.prompt_ids, s.output_ids, 1.0).tolist() for s in samples
        ]
        assert logprob_drift([s.rollout_logprobs for s in samples], untempered)["logprob_diff_mean"] > 1e-2


def test_same_seed_same_tokens_whatever_the_batch(servers):
    client = make_client(servers)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    async def runs():
        alone = await client.generate(PROMPTS[:1], params, n=2, seed=11)
        batched = await client.generate(PROMPTS, params, n=2, seed=11)
        other = await client.generate(PROMPTS[:1], params, n=2, seed=12)
        return alone, batched, other

    alone, batched, other = client.run(runs())
    assert [s.output_ids for s in alone[0]] == [s.output_ids for s in batched[0]]
    assert [s.output_ids for s in alone[0]] != [s.output_ids for s in other[0]]
    assert alone[0][0].output_ids != alone[0][1].output_ids  # samples of a group differ


def test_greedy_matches_transformers_generate(servers, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    client = make_client(servers)
    groups = client.run(
        client.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, group in zip(PROMPTS, groups):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert group[0].output_ids == ids[len(prompt) :]


def test_stop_token_and_stop_string(servers):
    worker = servers.worker_urls[0]
    body = {
        "input_ids": PROMPTS[0],
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }
    status, free = http_json(f"{worker}/generate", body, api_key=servers.api_key)
    assert status == 200 and isinstance(free["text"], str)
    ids = free["output_ids"]
    stop_id = ids[3]
    first = ids.index(stop_id)
    body["sampling_params"]["stop_token_ids"] = [stop_id]
    _, out = http_json(f"{worker}/generate", body, api_key=servers.api_key)
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    text = free["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    body["sampling_params"] = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    _, out = http_json(f"{worker}/generate", body, api_key=servers.api_key)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.index(stop)] and stop not in out["text"]
    body["sampling_params"]["no_stop_trim"] = True
    _, out = http_json(f"{worker}/generate", body, api_key=servers.api_key)
    assert out["text"].endswith(stop)


def test_text_input_and_prompt_logprobs(servers):
    status, out = http_json(
        f"{servers.url}/generate",
        {
            "text": "1+1=",
            "sampling_params": {"max_new_tokens": 2},
            "return_logprob": True,
            "logprob_start_len": 0,
        },
        api_key=servers.api_key,
    )
    assert status == 200, out
    entries = out["meta_info"]["input_token_logprobs"]
    assert entries[0][0] is None and all(e[0] < 0 for e in entries[1:])
    assert len(entries) == out["meta_info"]["prompt_tokens"]


@pytest.mark.parametrize(
    "body",
    [
        {"input_ids": []},
        {"input_ids": [1, 2], "sampling_params": {"temperature": -1}},
        {"input_ids": [1, 2], "sampling_params": {"top_p": 0}},
        {"input_ids": [1, 100000]},
        {"input_ids": "abc"},
        {"sampling_params": {}},
        {"input_ids": [[1], [2]], "rid": ["a"]},
        {"input_ids": [[1], [2]], "rid": ["a", "a"]},
        {"input_ids": [1, 2], "sampling_params": {"n": 1025}},
        {"input_ids": [1, 2], "sampling_params": {"n": 0}},
        {"input_ids": [1, 2], "sampling_params": {"sampling_seed": -(2**63) - 1}},
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2**63}},
        {"input_ids": [1, 2], "sampling_params": {"min_p": 0.5}},
    ],
)
def test_malformed_requests_get_400_and_server_stays_up(servers, body):
    worker = servers.worker_urls[1]
    status, out = http_json(f"{worker}/generate", body, api_key=servers.api_key)
    assert status == 400 and "message" in out["error"], out
    assert (
        http_json(
            f"{worker}/generate",
            {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}},
            api_key=servers.api_key,
        )[0]
        == 200
    )


def test_flush_cache_400_while_busy_is_retried(servers):
    worker = servers.worker_urls[0]
    client = RolloutClient(
        ClientConfig(url=worker, request_timeout_s=60, max_retries=0, api_key=servers.api_key)
    )

    async def scenario():
        long = asyncio.ensure_future(
            client.generate_raw(
                {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}
            )
        )
        while not (await client.get("/get_server_info"))[1]["internal_states"][0]["num_in_flight"]:
            await asyncio.sleep(0.05)
        status, _ = await client.post("/flush_cache")
        resends = await asyncio.to_thread(flush_caches, [worker], timeout_s=60, api_key=servers.api_key)
        return status, resends, await long

    status, resends, out = client.run(scenario())
    assert status == 400
    assert resends >= 1
    assert out["meta_info"]["completion_tokens"] == 150


def test_abort_on_cancel_and_pause(servers):
    worker = servers.worker_urls[1]
    client = RolloutClient(ClientConfig(url=worker, deadline_s=0.2, api_key=servers.api_key))
    params = SamplingParams(max_new_tokens=250, ignore_eos=True)  # ~0.5 s of decoding at the very least
    with pytest.raises(Exception, match="deadline"):
        client.run(client.generate([[1, 2, 3]], params))
    # The aborted request leaves the server within a step or two (250 steps otherwise).
    deadline = time.monotonic() + 5
    while http_json(f"{worker}/get_server_info", api_key=servers.api_key)[1]["internal_states"][0][
        "num_in_flight"
    ]:
        assert time.monotonic() < deadline, "aborted request still running"
        time.sleep(0.05)
    # /pause_generation (default mode "abort") answers in-flight requests with finish_reason abort.
    client2 = RolloutClient(
        ClientConfig(url=worker, request_timeout_s=60, max_retries=0, api_key=servers.api_key)
    )

    async def pause_mid_request():
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}}
        task = asyncio.ensure_future(client2.generate_raw(body))
        while True:  # pause only once the request is running (a request sent while paused waits)
            await asyncio.sleep(0.05)
            _, info = await client2.get("/get_server_info")
            if info["internal_states"][0]["num_in_flight"]:
                break
        status, _ = await client2.post("/pause_generation", {})
        try:
            return status, await task
        finally:
            await client2.post("/continue_generation")

    status, out = client2.run(pause_mid_request())
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 250
    assert http_json(f"{worker}/pause_generation", {"mode": "in_place"}, api_key=servers.api_key)[0] == 200
    assert http_json(f"{worker}/continue_generation", {}, api_key=servers.api_key)[0] == 200
    status, out = http_json(
        f"{worker}/generate",
        {"input_ids": [1], "sampling_params": {"max_new_tokens": 2}},
        api_key=servers.api_key,
    )
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "length"


def test_release_and_resume_memory(servers):
    memory = MemoryOccupation(servers.worker_urls, ["kv_cache", "weights"], api_key=servers.api_key)
    with memory.released_during():
        memory.release()  # idempotent: no second call reaches the servers
        status, out = http_json(
            f"{servers.worker_urls[0]}/generate", {"input_ids": [1]}, api_key=servers.api_key
        )
        assert status == 400 and "released" in out["error"]["message"]
    assert not memory.released
    assert (
        http_json(
            f"{servers.worker_urls[0]}/generate",
            {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}},
            api_key=servers.api_key,
        )[0]
        == 200
    )


def test_huge_text_is_refused_before_tokenising_and_health_stays_fast(servers):
    worker = servers.worker_urls[0]
    start = time.monotonic()
    status, out = http_json(
        f"{worker}/generate",
        {"text": "1+1=" * 2_000_000, "sampling_params": {"max_new_tokens": 1}},
        timeout_s=60,
        api_key=servers.api_key,
    )
    assert status == 400 and "cannot fit the context" in out["error"]["message"]
    assert time.monotonic() - start < 20
    status, out = http_json(
        f"{worker}/generate", {"text": "x" * (40 << 20)}, timeout_s=60, api_key=servers.api_key
    )  # over the body limit
    assert status == 413
    assert http_json(f"{worker}/health", api_key=servers.api_key)[0] == 200
