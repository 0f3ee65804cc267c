"""train/rollout_io.py: reaching servers (directly or through a router), generating and scoring a step."""

import subprocess
import sys

import pytest
from launch_testlib import RECIPE, clean_env, launch_overrides, logged_steps, make_assets, wait_for

from sdpg_mcore.parallel.spawn import find_free_port
from sdpg_mcore.rollout.auth import new_key_file, read_key_file
from sdpg_mcore.rollout.http import http_json
from sdpg_mcore.rollout.sglang_launch import keyed_module
from sdpg_mcore.train.rollout_io import RolloutUnreachableError, check_reachable


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("rollout_io"))


def test_unreachable_rollout_server_names_url_and_fix():
    url = f"http://127.0.0.1:{find_free_port()}"
    with pytest.raises(
        RolloutUnreachableError, match=f"rollout server {url} is unreachable.*rollout.backend=builtin"
    ):
        check_reachable([url], timeout_s=2)


def _router_healthy(url: str, worker: str, key: str) -> bool:
    try:
        status, body = http_json(f"{url}/workers", timeout_s=2.0, api_key=key)
    except OSError:
        return False
    return status == 200 and any(w["url"] == worker and w.get("is_healthy") for w in body["workers"])


def test_external_router_weight_sync_reaches_the_worker(assets, tmp_path):
    """With rollout.urls=[router], generation goes through the router and the weights reach its worker;
    worker and router want the key, which the trainer reads from rollout.api_key_file."""
    worker_port, router_port, metrics_port = find_free_port(), find_free_port(), find_free_port()
    worker = f"http://127.0.0.1:{worker_port}"
    router = f"http://127.0.0.1:{router_port}"
    key_file = new_key_file(tmp_path / "secrets")
    key = read_key_file(key_file)
    procs = []
    with open(tmp_path / "worker.log", "wb") as wlog, open(tmp_path / "router.log", "wb") as rlog:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sdpg_mcore.rollout.dev_server", "--model-path", str(assets / "model")]
                + ["--port", str(worker_port), "--num-threads", "1", "--api-key-file", str(key_file)],
                stdout=wlog,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    *keyed_module("sglang_router.launch_router", str(key_file)),
                    "--host",
                    "127.0.0.1",
                ]
                + [
                    "--port",
                    str(router_port),
                    "--worker-urls",
                    worker,
                    "--prometheus-port",
                    str(metrics_port),
                ],
                stdout=rlog,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )
        )
        try:
            wait_for(lambda: _router_healthy(router, worker, key), 120, "the router to list a healthy worker")
            # The bug: the router does not serve weight updates, so pushing to rollout.urls 404s.
            assert http_json(f"{router}/update_weights_from_disk", {"model_path": "x"}, api_key=key)[0] == 404
            from sdpg_mcore.train.rollout_io import discover_workers

            assert discover_workers([router], api_key=key) == [worker]
            assert discover_workers([worker], api_key=key) == [worker]
            run_dir = tmp_path / "run"
            overrides = launch_overrides(
                assets,
                run_dir,
                "rollout.backend=external",
                f"rollout.urls=[{router}]",
                f"rollout.api_key_file={key_file}",
                "trainer.total_steps=2",
            )
            cmd = [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(RECIPE), *overrides]
            done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            assert logged_steps(run_dir) == [1, 2]
            status, body = http_json(f"{worker}/model_info", api_key=key)
            assert status == 200 and body["weight_version"] == "2", body
            assert key not in (tmp_path / "router.log").read_text()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def session_and_prompts(assets, tmp_path_factory):
    """A real RolloutSession (one built-in dev server over HTTP) and the tiny data set's prompts."""
    from transformers import AutoTokenizer

    from sdpg_mcore.config import RewardConfig, RolloutConfig
    from sdpg_mcore.data import PromptConfig, load_prompt_dataset
    from sdpg_mcore.train.rollout_io import RolloutSession

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    dataset = load_prompt_dataset(
        assets / "data" / "train.jsonl", tokenizer, PromptConfig(max_prompt_length=96)
    )
    rollout = RolloutConfig(n=4, server_threads=1)
    session = RolloutSession.start(
        rollout, RewardConfig(), str(assets / "model"), 8, tmp_path_factory.mktemp("s")
    )
    yield session, dataset
    session.close()


def _batches(dataset, size):
    start = 0
    while True:
        yield dataset.batch(list(range(start, start + size)))
        start += size


def _counting(session, reward):
    """Replace the session's reward function by ``reward(text)`` and count its calls."""
    calls = []

    def reward_fn(data_source, text, ground_truth, extra_info):
        calls.append(text)
        return reward(text)

    session.reward_fn = reward_fn
    return calls


def test_each_response_is_scored_once(session_and_prompts):
    session, dataset = session_and_prompts
    session.rollout.dynamic_sampling = False
    calls = _counting(session, lambda text: float(len(text) % 3))
    responses, metrics = session.generate(_batches(dataset, 3), step=1, seed=0)
    assert len(calls) == len(responses) == 3 * 4  # one verifier call per response (there used to be two)
    assert [r.group for r in responses] == [g for g in range(3) for _ in range(4)]
    assert metrics["time/score"] >= 0 and metrics["rollout/num_requests"] == 12
    assert "dynamic/num_gen_batches" not in metrics


def test_dynamic_sampling_keeps_groups_with_reward_variance(session_and_prompts):
    session, dataset = session_and_prompts
    session.rollout.dynamic_sampling = True
    session.rollout.max_num_gen_batches = 4
    try:
        calls = _counting(session, lambda text: float(len(text) % 2))
        responses, metrics = session.generate(_batches(dataset, 3), step=2, seed=0)
    finally:
        session.rollout.dynamic_sampling = False
    batches = metrics["dynamic/num_gen_batches"]
    assert 1 <= batches <= 4 and metrics["dynamic/generated_groups"] == 3 * batches
    assert len(calls) == 4 * 3 * batches  # every generated response scored once, kept or not
    kept = int(metrics["dynamic/kept_groups"])
    groups = sorted({r.group for r in responses})
    if kept:
        assert groups == list(range(kept)) and kept <= 3
        for g in groups:
            assert len({r.reward for r in responses if r.group == g}) > 1
    else:  # nothing kept in the budget: the first batch is trained on
        assert groups == [0, 1, 2]
