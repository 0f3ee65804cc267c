"""The HTTP contract (``rollout/protocol.py``), run unchanged against the built-in server AND real SGLang 0.5.23.

``contract_server`` (conftest) is one server per backend for this whole module. A test that only
one of them can pass does not belong here: the point is that the built-in server cannot drift from
what real SGLang does. Tests that change the weights put the original ones back.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import psutil
import pytest
import torch
from auth_testlib import GENERATE, SERVER_ROUTES, answers_without_the_key

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.rollout.client import ClientConfig, RolloutClient
from sdpg_mcore.rollout.http import http_json
from sdpg_mcore.rollout.protocol import SamplingParams
from sdpg_mcore.rollout.sglang_launch import check_servers
from sdpg_mcore.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    TensorWeightSync,
    server_tp_sizes,
    weight_versions,
)

PROMPTS = [[5, 17, 42, 8], [3, 9, 11], [100, 101]]
NEW_TOKENS = 6
#: fp32 on both sides, the same math in another order: ~1e-6 here; the trainer's bound is 1e-4.
LOGPROB_ATOL = 1e-4


def hf_greedy(model_dir) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their log-probs (log_softmax of fp32 logits) from ``transformers``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for prompt in PROMPTS:
        ids, lps = list(prompt), []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                logits_V = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
                token = int(logits_V.argmax())
                lps.append(float(torch.log_softmax(logits_V, -1)[token]))
                ids.append(token)
        tokens.append(ids[len(prompt) :])
        logprobs.append(lps)
    return tokens, logprobs


def server_greedy(url: str, key: str | None) -> tuple[list[list[int]], list[list[float]]]:
    body = {
        "input_ids": PROMPTS,
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    status, out = http_json(f"{url}/generate", body, timeout_s=120, api_key=key)
    assert status == 200, out
    return (
        [o["output_ids"] for o in out],
        [[entry[0] for entry in o["meta_info"]["output_token_logprobs"]] for o in out],
    )


def assert_serves(url: str, model_dir, key: str | None) -> None:
    tokens, logprobs = server_greedy(url, key)
    expected_tokens, expected_logprobs = hf_greedy(model_dir)
    assert tokens == expected_tokens
    for got, want in zip(logprobs, expected_logprobs):
        assert max(abs(a - b) for a, b in zip(got, want)) <= LOGPROB_ATOL


def raw_post(url: str, body: str, key: str) -> tuple[int, str]:
    """POST a body exactly as given (not via json.dumps): NaN, 1e400 and friends."""
    req = urllib.request.Request(url, data=body.encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("other") / "seed7", arch="qwen3", seed=7)


def hf_tensors(model_dir):
    from safetensors.torch import load_file

    return list(load_file(str(model_dir / "model.safetensors")).items())


@pytest.fixture
def url(contract_server):
    return contract_server.worker_urls[0]


@pytest.fixture
def key(contract_server):
    """The run's API key the server was started with (a fresh one per server group)."""
    return contract_server.api_key


# ---------------------------------------------------------------------------- the API key
def test_every_route_but_the_probes_wants_the_key(url, key, contract_server):
    """No key or a wrong one: 401 ``{"error": "Unauthorized"}`` from both servers, before the route
    runs (the weight version stays); ``/health*`` answer anyone. The key is on no command line."""
    version = weight_versions([url], api_key=key)[url]
    answers = answers_without_the_key(url, SERVER_ROUTES, key)
    wrong = {sent: answer for sent, answer in answers.items() if answer != (401, {"error": "Unauthorized"})}
    assert len(answers) == 3 * len(SERVER_ROUTES) and not wrong, wrong
    assert weight_versions([url], api_key=key)[url] == version
    for path in ("/health", "/health_generate"):
        assert http_json(f"{url}{path}", timeout_s=60)[0] == 200, path
    status, _ = http_json(f"{url}/generate", GENERATE, api_key=key)
    assert status == 200
    server = contract_server.servers[0]
    tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    assert len(tree) >= (3 if contract_server.backend == "sglang" else 1)  # SGLang: scheduler, detokenizer
    for process in tree:
        assert key not in " ".join(process.cmdline())
    assert key not in server.log_path.read_text()  # SGLang logs its options: the key is redacted


# ---------------------------------------------------------------------------- generation
def test_generate_shape_and_logprobs_match_transformers(url, key, tiny_model_dir):
    status, out = http_json(
        f"{url}/generate",
        {
            "input_ids": PROMPTS[0],
            "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True,
        },
        api_key=key,
    )
    assert status == 200, out
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 3 and isinstance(out["text"], str)
    assert meta["finish_reason"]["type"] == "length" and meta["prompt_tokens"] == len(PROMPTS[0])
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(len(e) == 3 and e[0] <= 0 for e in meta["output_token_logprobs"])
    assert_serves(url, tiny_model_dir, key)


def test_client_sampling_against_server(url, key):
    client = RolloutClient(ClientConfig(url=url, request_timeout_s=120, api_key=key))
    groups = client.run(
        client.generate(PROMPTS, SamplingParams(max_new_tokens=4, ignore_eos=True), n=2, seed=3)
    )
    assert [len(g) for g in groups] == [2, 2, 2]
    for group in groups:
        for sample in group:
            assert len(sample.output_ids) == 4 == len(sample.rollout_logprobs)
            assert sample.finish_reason == "length" and all(lp <= 0 for lp in sample.rollout_logprobs)


def test_model_info_has_the_weight_version_and_no_get_weight_version(url, key):
    assert http_json(f"{url}/get_weight_version", api_key=key)[0] == 404  # gone in SGLang 0.5.21
    status, info = http_json(f"{url}/model_info", api_key=key)
    assert status == 200 and isinstance(info["weight_version"], str)
    status, body = http_json(f"{url}/update_weight_version", {"new_version": "contract-7"}, api_key=key)
    assert status == 200 and body["success"] is True
    assert weight_versions([url], api_key=key) == {url: "contract-7"}
    _, out = http_json(
        f"{url}/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}, api_key=key
    )
    assert out["meta_info"]["weight_version"] == "contract-7"


def test_server_reports_a_supported_version(url, key):
    (facts,) = check_servers([url], weight_sync="distributed", api_key=key)
    assert facts.tp_size == 1 and facts.dp_size == 1


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "sampling",
    [
        {"bogus_key": 1},  # unknown keys are refused (0.5.22+), never silently ignored
        {"sampling_seed": 2**70},  # outside int64
        {"max_new_tokens": 1.5},
        {"top_p": 0},
        {"top_k": 0},
        {"temperature": -1},
    ],
    ids=["unknown-key", "seed-2**70", "max_new_tokens-1.5", "top_p-0", "top_k-0", "temperature-neg"],
)
def test_bad_sampling_params_get_400_and_server_stays_up(url, key, sampling):
    status, out = http_json(
        f"{url}/generate", {"input_ids": [1, 2], "sampling_params": sampling}, api_key=key
    )
    assert status == 400, out
    ok = http_json(
        f"{url}/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}, api_key=key
    )
    assert ok[0] == 200


def test_context_length_limits(url, key, tiny_model_dir):
    """SGLang's limits at the context edge (C = max_position_embeddings): input + max_new_tokens > C is
    refused; up to C is served with at most C - 2 - input new tokens (its scheduler's cap)."""
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    prompt = PROMPTS[0]
    params = {"max_new_tokens": context - len(prompt), "temperature": 0, "ignore_eos": True}
    status, out = http_json(
        f"{url}/generate", {"input_ids": prompt, "sampling_params": params}, timeout_s=300, api_key=key
    )
    assert status == 200, out
    assert len(out["output_ids"]) == context - 2 - len(prompt)
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    too_long = {**params, "max_new_tokens": context - len(prompt) + 1}
    status, out = http_json(
        f"{url}/generate", {"input_ids": prompt, "sampling_params": too_long}, api_key=key
    )
    assert status == 400 and "context length" in json.dumps(out), out
    status, out = http_json(
        f"{url}/generate", {"input_ids": [1] * context, "sampling_params": {"max_new_tokens": 0}}, api_key=key
    )
    assert status == 400 and "context length" in json.dumps(out), out


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e400"])
def test_non_finite_json_numbers_get_400(url, key, value):
    for field in ("temperature", "max_new_tokens"):
        body = f'{{"input_ids": [1, 2], "sampling_params": {{"{field}": {value}}}}}'
        status, text = raw_post(f"{url}/generate", body, key)
        assert status == 400, text
    assert http_json(f"{url}/health")[0] == 200


def test_duplicate_rid_is_refused_while_tracked(url, key):
    assert http_json(f"{url}/pause_generation", {"mode": "in_place"}, api_key=key)[0] == 200
    first: dict = {}
    body = {"input_ids": [1, 2], "rid": "dup-rid-1", "sampling_params": {"max_new_tokens": 2}}
    thread = threading.Thread(
        target=lambda: first.update(r=http_json(f"{url}/generate", body, timeout_s=120, api_key=key))
    )
    thread.start()
    try:
        time.sleep(1.0)  # the paused server now tracks dup-rid-1
        status, out = http_json(f"{url}/generate", body, api_key=key)
        assert status == 400 and "Duplicate request ID" in json.dumps(out), out
    finally:
        assert http_json(f"{url}/continue_generation", {}, api_key=key)[0] == 200
        thread.join(timeout=120)
    assert first["r"][0] == 200
    status, _ = http_json(f"{url}/generate", body, api_key=key)  # finished: the rid is free again
    assert status == 200
    status, out = http_json(
        f"{url}/generate",
        {"input_ids": [[1], [2]], "rid": ["same", "same"], "sampling_params": {"max_new_tokens": 1}},
        api_key=key,
    )
    assert status == 400 and "Duplicate request ID" in json.dumps(out)


def test_client_retries_with_a_fresh_rid(url, key):
    """A timed-out attempt is still tracked by the (paused) server: the retry must not reuse its rid."""
    config = ClientConfig(url=url, request_timeout_s=2.0, max_retries=4, backoff_s=0.25, api_key=key)
    client = RolloutClient(config)
    assert http_json(f"{url}/pause_generation", {"mode": "in_place"}, api_key=key)[0] == 200
    timer = threading.Timer(3.0, lambda: http_json(f"{url}/continue_generation", {}, api_key=key))
    timer.start()
    try:
        out = client.run(client.generate_raw({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}))
    finally:
        timer.join()
        http_json(f"{url}/continue_generation", {}, api_key=key)
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert client.metrics.num_retries >= 1 and client.metrics.num_failed == 0


# ---------------------------------------------------------------------------- weight updates
def test_weight_update_session_rules(url, key):
    update = {"names": [], "dtypes": [], "shapes": [], "group_name": "none"}
    status, out = http_json(f"{url}/update_weights_from_distributed", update, api_key=key)
    assert status == 400 and out["success"] is False and "begin_weight_update" in out["message"]
    assert http_json(f"{url}/end_weight_update", {}, api_key=key)[0] == 400  # no session open
    assert http_json(f"{url}/begin_weight_update", {}, api_key=key)[0] == 200
    try:
        assert http_json(f"{url}/begin_weight_update", {}, api_key=key)[0] == 400  # one session at a time
    finally:
        assert http_json(f"{url}/end_weight_update", {}, api_key=key)[0] == 200


def _restore(url, key, tiny_model_dir, tmp_path):
    DiskWeightSync([url], tmp_path / "restore", hf_config_dir=tiny_model_dir, api_key=key).push(
        hf_tensors(tiny_model_dir), "restored"
    )
    assert_serves(url, tiny_model_dir, key)


def test_disk_sync(url, key, tiny_model_dir, other_model, tmp_path):
    try:
        DiskWeightSync([url], tmp_path / "shared", hf_config_dir=other_model, api_key=key).push(
            hf_tensors(other_model), "disk-1"
        )
        assert weight_versions([url], api_key=key) == {url: "disk-1"}
        assert_serves(url, other_model, key)
    finally:
        _restore(url, key, tiny_model_dir, tmp_path)


@pytest.mark.parametrize(
    "flatten", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["flattened-bucket", "per-tensor"]
)
def test_distributed_sync(url, key, tiny_model_dir, other_model, tmp_path, flatten):
    sync = DistributedWeightSync(
        [url],
        server_tp_sizes=server_tp_sizes([url], api_key=key),
        bucket_bytes=64 << 10,
        flatten=flatten,
        api_key=key,
    )
    try:
        stats = sync.push(hf_tensors(other_model), f"dist-{flatten}")
        assert 1 < stats.num_requests < stats.num_tensors  # buckets, not one request per tensor
        assert weight_versions([url], api_key=key) == {url: f"dist-{flatten}"}
        assert_serves(url, other_model, key)
        sync.push(hf_tensors(tiny_model_dir), "dist-back")  # the group is reused
        assert_serves(url, tiny_model_dir, key)
    finally:
        sync.close()
        _restore(url, key, tiny_model_dir, tmp_path)


def test_tensor_sync_colocated_path(url, key, tiny_model_dir, other_model, tmp_path):
    sync = TensorWeightSync(
        [url], server_tp_sizes=server_tp_sizes([url], api_key=key), bucket_bytes=64 << 10, api_key=key
    )
    try:
        stats = sync.push(hf_tensors(other_model), "tensor-1")
        assert stats.num_requests > 1
        assert weight_versions([url], api_key=key) == {url: "tensor-1"}
        assert_serves(url, other_model, key)
    finally:
        sync.close()
        _restore(url, key, tiny_model_dir, tmp_path)


def test_release_and_resume_memory(url, key, tiny_model_dir):
    from sdpg_mcore.rollout.servers import MemoryOccupation

    memory = MemoryOccupation([url], api_key=key)
    with memory.released_during():
        assert memory.released
    assert_serves(url, tiny_model_dir, key)


# ---------------------------------------------------------------------------- pushes while paused in place
def hf_logprobs_switched(
    old_dir, new_dir, prompt: list[int], output_ids: list[int], switch: int
) -> list[float]:
    """Log-probs of ``output_ids`` as a server with a KV cache computes them when the weights change
    in place before the forward that produces output token ``switch``: the positions processed
    before the change keep their old-weight keys and values (``switch = len(output_ids)``: no change)."""
    from transformers import AutoModelForCausalLM

    old, new = (
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (old_dir, new_dir)
    )
    ids = prompt + output_ids
    cut = len(prompt) + switch - 1  # inputs before `cut` ran under the old weights
    with torch.no_grad():
        before = old(input_ids=torch.tensor([ids[:cut]]), use_cache=True)
        logits = [before.logits[0, len(prompt) - 1 :]]
        if switch < len(output_ids):
            after = new(input_ids=torch.tensor([ids[cut:-1]]), past_key_values=before.past_key_values)
            logits.append(after.logits[0])
    logprobs = torch.log_softmax(torch.cat(logits).double(), dim=-1)
    return logprobs.gather(1, torch.tensor(output_ids).unsqueeze(1)).squeeze(1).tolist()


def _generate_in_background(
    url: str, key: str, body: dict, timeout_s: float = 120.0
) -> tuple[threading.Thread, dict]:
    """POST ``body`` to ``/generate`` on a thread; return once ``/v1/loads`` shows it decoding.
    The answer lands in ``answer["r"]`` (status, body) when the thread ends."""
    answer: dict = {}
    thread = threading.Thread(
        target=lambda: answer.update(r=http_json(f"{url}/generate", body, timeout_s=300, api_key=key))
    )
    thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        status, out = http_json(f"{url}/v1/loads", api_key=key)
        assert status == 200, out
        if out["loads"][0]["num_running_reqs"] >= 1:
            return thread, answer
        time.sleep(0.005)
    raise AssertionError(f"the request never showed as running in /v1/loads: {answer}")


@pytest.mark.parametrize("kind", ["disk", "distributed"])
def test_push_while_paused_in_place_keeps_the_request_in_flight(
    url, key, tiny_model_dir, other_model, tmp_path, kind
):
    """Asynchronous rollouts' weight push: ``/pause_generation {"mode": "in_place"}``, push without a
    cache flush, ``/continue_generation``. The request in flight is neither aborted nor restarted:
    its first tokens come from the old weights, the rest from the new ones over the old KV cache."""
    prompt = PROMPTS[0]
    length = 256 - 2 - len(prompt)  # the tiny model's whole context: long enough to catch it decoding
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": length, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    thread = None
    if kind == "disk":
        sync = DiskWeightSync([url], tmp_path / "shared", hf_config_dir=other_model, api_key=key)
    else:
        sizes = server_tp_sizes([url], api_key=key)
        sync = DistributedWeightSync([url], server_tp_sizes=sizes, bucket_bytes=64 << 10, api_key=key)
    try:
        thread, answer = _generate_in_background(url, key, body)
        assert http_json(f"{url}/pause_generation", {"mode": "in_place"}, api_key=key)[0] == 200
        try:
            sync.push(hf_tensors(other_model), f"paused-{kind}", flush_cache=False)
            loads = http_json(f"{url}/v1/loads", api_key=key)[1]["loads"][0]
            assert loads["num_running_reqs"] == 1, loads  # the push did not wait for it to finish
        finally:
            assert http_json(f"{url}/continue_generation", {}, api_key=key)[0] == 200
        thread.join(timeout=300)
        status, out = answer["r"]
        assert status == 200, out
        meta = out["meta_info"]
        assert meta["finish_reason"]["type"] == "length", meta["finish_reason"]
        assert len(out["output_ids"]) == length
        assert meta["weight_version"] == f"paused-{kind}"
        served = [entry[0] for entry in meta["output_token_logprobs"]]
        old_only = hf_logprobs_switched(tiny_model_dir, other_model, prompt, out["output_ids"], length)
        switch = next(
            (i for i, (a, b) in enumerate(zip(served, old_only)) if abs(a - b) > LOGPROB_ATOL), length
        )
        assert 0 < switch < length, f"switch at {switch}: the push did not land mid-request"
        mixed = hf_logprobs_switched(tiny_model_dir, other_model, prompt, out["output_ids"], switch)
        assert max(abs(a - b) for a, b in zip(served, mixed)) <= LOGPROB_ATOL
    finally:
        if thread is not None:
            thread.join(timeout=300)
        sync.close()
        _restore(url, key, tiny_model_dir, tmp_path)


@pytest.mark.parametrize(("abort", "finish"), [(None, "abort"), (False, "length")])
def test_a_new_weight_version_aborts_running_requests_unless_told_not_to(url, key, abort, finish):
    """``/update_weight_version`` aborts what runs by default (SGLang); ``WeightSync.commit`` says not to."""
    body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    thread, answer = _generate_in_background(url, key, body)
    assert http_json(f"{url}/pause_generation", {"mode": "in_place"}, api_key=key)[0] == 200
    try:
        update = {"new_version": f"abort-{abort}"} | ({} if abort is None else {"abort_all_requests": abort})
        assert http_json(f"{url}/update_weight_version", update, api_key=key)[0] == 200
    finally:
        assert http_json(f"{url}/continue_generation", {}, api_key=key)[0] == 200
    thread.join(timeout=300)
    assert answer["r"][1]["meta_info"]["finish_reason"]["type"] == finish, answer["r"]
