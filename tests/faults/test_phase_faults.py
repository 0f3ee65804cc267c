"""A rollout server killed (``kill -9`` of its process group) in each phase that talks to it: generation,
evaluation, and the weight push by disk, broadcast and tensor handles. Each time the phase finishes with
every server back and serving the current weights, and each lost request is sent again, not the rollout.

The built-in server runs here; ``-m slow`` runs the same tests on real SGLang (25-100 s per restart on
2 busy cores). The trainer's rank-0 pieces are real (``RolloutSession``, ``ServerSupervisor``,
``WeightPusher`` without a process group: one rank); only the model is a Hugging Face file, not Megatron.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from launch_testlib import require_real_sglang

from sdpg_mcore.config import RewardConfig, RolloutConfig
from sdpg_mcore.data.tiny_tokenizer import save_tiny_tokenizer
from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.rollout.http import http_json
from sdpg_mcore.rollout.protocol import SamplingParams
from sdpg_mcore.rollout.weight_sync import weight_versions
from sdpg_mcore.train.rollout_io import RolloutSession, WeightPusher, served

NEW_TOKENS = 40
PROMPTS = [[5, 17, 42, 8], [3, 9, 11], [100, 101], [7, 7, 7]]
BACKENDS = ["builtin", pytest.param("sglang", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The start-up model and the 'trained' one the pushes carry (another seed: other greedy tokens)."""
    root = tmp_path_factory.mktemp("phase_models")
    start = save_tiny_hf_model(root / "start", arch="qwen3", seed=0)
    save_tiny_tokenizer(start, style="qwen")
    trained = save_tiny_hf_model(root / "trained", arch="qwen3", seed=5)
    return start, trained


def hf_tensors(model_dir) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return list(load_file(str(model_dir / "model.safetensors")).items())


def hf_greedy(model_dir, prompt: list[int], count: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def assert_serves(session: RolloutSession, model_dir, version: str) -> None:
    """Every server reports ``version`` and generates ``model_dir``'s greedy tokens."""
    urls, key = session.worker_urls, session.api_key
    assert weight_versions(urls, api_key=key) == {u: version for u in urls}
    expected = hf_greedy(model_dir, PROMPTS[0], 6)
    body = {
        "input_ids": PROMPTS[0],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    }
    for url in urls:
        status, out = http_json(f"{url}/generate", body, timeout_s=120, api_key=key)
        assert status == 200 and out["output_ids"] == expected, (url, out)


def start_session(backend: str, model_dir, run_dir, *, weight_sync: str, num_servers: int, router: bool):
    rollout = RolloutConfig(
        backend=backend, num_servers=num_servers, router=router, weight_sync=weight_sync, server_threads=1,
        n=2, startup_timeout_s=600, request_timeout_s=300,
    )  # fmt: skip
    if backend == "sglang":
        require_real_sglang()
    return RolloutSession.start(rollout, RewardConfig(), str(model_dir), NEW_TOKENS, run_dir)


def make_pusher(session: RolloutSession, mode: str, run_dir, hf_dir, tensors) -> WeightPusher:
    """Rank 0's pusher of a one-rank trainer; ``tensors()`` yields what each attempt pushes."""
    layout = SimpleNamespace(tp_rank=0, dp_rank=0, cp_rank=0, pp_rank=0)
    pusher = WeightPusher(mode, layout, str(hf_dir), run_dir, session.worker_urls, 0, api_key=session.api_key)
    return pusher.supervise(session).bind_named_tensors(tensors)


def kill(server) -> int:
    """``kill -9`` of a server's process group; its pid."""
    pid = server.proc.pid
    os.killpg(pid, signal.SIGKILL)
    return pid


@dataclass
class KillAfter:
    """The tensors of ``model_dir``, killing ``server`` after the ``after``-th of the first pass: the
    server dies in the middle of the push."""

    model_dir: object
    server: object
    after: int
    passes: int = 0

    def __call__(self):
        self.passes += 1
        for index, item in enumerate(hf_tensors(self.model_dir)):
            yield item
            if self.passes == 1 and index + 1 == self.after:
                kill(self.server)


class KillWhileDecoding(threading.Thread):
    """Kills ``server`` (``kill -9``) once it decodes requests; ``held`` is how many it held then."""

    def __init__(self, server, api_key: str):
        super().__init__(daemon=True)
        self.server, self.api_key, self.held = server, api_key, 0
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not self.held:
            try:
                status, loads = http_json(f"{self.server.url}/v1/loads", api_key=self.api_key)
            except OSError:
                status = 0
            self.held = loads["loads"][0]["num_running_reqs"] if status == 200 else 0
            time.sleep(0.02)
        if self.held:
            kill(self.server)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_during_generation_resends_only_the_lost_requests(backend, models, tmp_path):
    """Disk sync, one server: it dies while decoding; it comes back with the pushed weights (version
    1) and the requests it lost are sent again, not the rollout."""
    start, trained = models
    session = start_session(backend, start, tmp_path, weight_sync="disk", num_servers=1, router=False)
    try:
        make_pusher(session, "disk", tmp_path, start, lambda: iter(hf_tensors(trained)))(1)
        client = session.client
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        killer = KillWhileDecoding(session.servers.servers[0], session.api_key)
        groups = session._rollout(lambda: client.run(client.generate(PROMPTS, params, n=4, seed=3)))
        killer.join()
        samples = [s for g in groups for s in g]
        assert killer.held and len(samples) == 16
        assert all(s.finish_reason == "length" and len(s.output_ids) == NEW_TOKENS for s in samples)
        assert all(s.weight_version == "1" for s in samples)
        assert session.supervisor.num_restarts == 1 and client.metrics.num_requests == 16
        assert 1 <= client.metrics.num_retries <= 3 * 16  # lost requests again, a few times at most
        assert_serves(session, trained, "1")
    finally:
        session.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_during_evaluation_waits_for_pushed_weights(backend, models, tmp_path):
    """Distributed sync, one server: it dies mid-evaluation and comes back with start-up weights, so it
    waits for a push; the trainer pushes (``served``: every rank would) and evaluates again."""
    start, trained = models
    session = start_session(backend, start, tmp_path, weight_sync="distributed", num_servers=1, router=False)
    pusher = make_pusher(session, "distributed", tmp_path, start, lambda: iter(hf_tensors(trained)))
    try:
        pusher(1)
        prompts = [
            SimpleNamespace(student_ids=p, data_source="x", ground_truth="1", extra_info={}) for p in PROMPTS
        ]
        session.reward_fn = lambda *args: 1.0
        killer = KillWhileDecoding(session.servers.servers[0], session.api_key)
        metrics = served(pusher, True, lambda: session.evaluate("held_out", prompts, 4, 1.0, seed=0))
        killer.join()
        assert killer.held and metrics == {"eval/held_out/avg@4": 1.0, "eval/held_out/pass@4": 1.0}
        assert session.supervisor.num_restarts == 1 and pusher.sync.generation >= 1  # a new update group
        assert_serves(session, trained, "1")
    finally:
        pusher.close()
        session.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode",
    [
        "disk",
        "distributed",
        pytest.param("tensor", marks=pytest.mark.slow),
    ],  # tensor: distributed's path, ~70 s
)
def test_kill_during_weight_push(backend, mode, models, tmp_path):
    """Two servers behind the router: one dies in the middle of the push. Disk: it is restarted and
    loads the just-published weights, the push completes without being made again. Distributed and
    tensor: the push is made again to both, the update group re-formed with the new server."""
    start, trained = models
    session = start_session(backend, start, tmp_path, weight_sync=mode, num_servers=2, router=True)
    pusher = None
    try:
        victim = session.servers.servers[1]
        tensors = KillAfter(trained, victim, after=3)
        pusher = make_pusher(session, mode, tmp_path, start, tensors)
        old_pid = victim.proc.pid
        pusher(1)
        assert victim.proc.pid != old_pid and session.supervisor.num_restarts == 1
        assert tensors.passes == (1 if mode == "disk" else 2)
        if mode == "distributed":
            assert pusher.sync.generation >= 1  # the group was formed again, under a new name
        assert_serves(session, trained, "1")
        assert session.supervisor.waiting == set()
        status, body = http_json(f"{session.servers.url}/workers", api_key=session.api_key)
        assert sorted(w["url"] for w in body["workers"]) == sorted(session.worker_urls)  # both routed to
    finally:
        if pusher is not None:
            pusher.close()
        session.close()
