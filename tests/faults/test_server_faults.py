"""A rollout server killed or stopped (SIGSTOP) mid-rollout: the supervisor restarts it with the current
weights, the requests it lost are sent again, and the rollout completes within the watchdog's minute
plus a restart, not 600 s x 6 tries."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest

from sdpg_mcore.data.tiny_tokenizer import save_tiny_tokenizer
from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.rollout.client import ClientConfig, RolloutClient
from sdpg_mcore.rollout.protocol import SamplingParams
from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig
from sdpg_mcore.rollout.supervisor import ServerSupervisor
from sdpg_mcore.rollout.weight_sync import weight_versions

DEADLINE_S = 600.0  # the default request timeout: the watchdog, not the deadline, must catch a stuck server
WATCHDOG_S = 15.0


@pytest.fixture
def served(tmp_path):
    model = save_tiny_hf_model(tmp_path / "model", arch="qwen3", seed=0)
    save_tiny_tokenizer(model, style="qwen")
    weights = tmp_path / "weights"
    shutil.copytree(model, weights / "weights-7")  # what the trainer published last (version 7)
    servers = RolloutServers(
        ServerConfig(
            model_path=str(model), num_servers=1, router=False, log_dir=str(tmp_path / "logs"),
            health_timeout_s=120, env={"OMP_NUM_THREADS": "1"}, extra_args=["--num-threads", "1"],
        )
    ).start()  # fmt: skip
    supervisor = ServerSupervisor(servers, weights, watchdog_s=WATCHDOG_S, probe_timeout_s=5.0)
    supervisor.weights_pushed("7")
    yield servers, supervisor
    servers.stop()


def _rollout_with_fault(servers, supervisor, fault: signal.Signals):
    victim = servers.servers[0]
    config = ClientConfig(
        url=servers.url,
        deadline_s=DEADLINE_S,
        request_timeout_s=DEADLINE_S,
        backoff_s=0.2,
        api_key=servers.api_key,
    )
    client = RolloutClient(config, on_failure=supervisor.on_failure)
    params = SamplingParams(max_new_tokens=120, ignore_eos=True)
    faulted = []

    async def generate_and_fault():
        task = asyncio.ensure_future(client.generate([[1, 2, 3]] * 8, params, n=2, seed=0))
        if not faulted:
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up:  # fault the server while it decodes this rollout
                await asyncio.sleep(0.05)
                _, info = await client.get("/get_server_info", url=victim.url)
                if info["internal_states"][0]["num_in_flight"] > 0:
                    break
            os.killpg(victim.proc.pid, fault)
            faulted.append(victim.proc.pid)
        return await task

    start = time.monotonic()
    groups = supervisor.run(lambda: client.run(generate_and_fault()))
    return groups, time.monotonic() - start, faulted[0]


@pytest.mark.slow  # two server restarts on 2 busy cores, ~1 min
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_supervisor_restarts_a_dead_or_stuck_server_with_current_weights(served, fault):
    servers, supervisor = served
    groups, elapsed, old_pid = _rollout_with_fault(servers, supervisor, fault)
    print(f"{fault.name}: rollout done in {elapsed:.1f} s")
    assert [len(g) for g in groups] == [2] * 8
    assert all(s.finish_reason == "length" and len(s.output_ids) == 120 for g in groups for s in g)
    assert supervisor.num_restarts == 1 and servers.servers[0].proc.pid != old_pid
    assert elapsed < WATCHDOG_S + 120, elapsed  # watchdog + retries + restart, not 600 s x 6 tries
    url = servers.servers[0].url
    assert weight_versions([url], api_key=servers.api_key) == {url: "7"}  # it got the weights back
    try:
        os.kill(old_pid, 0)
        raise AssertionError("the stuck server was not killed")
    except ProcessLookupError:
        pass


def test_watchdog_off_probes_nothing(tmp_path):
    """``rollout.watchdog_s=0``: a rollout runs without the watchdog thread (which the default has)."""
    import threading

    servers = RolloutServers(ServerConfig(model_path=str(tmp_path), router=False, log_dir=str(tmp_path)))

    def threads_during(watchdog_s: float) -> list[str]:
        with ServerSupervisor(servers, None, watchdog_s=watchdog_s)._watchdog():
            return [t.name for t in threading.enumerate()]

    assert "rollout-watchdog" in threads_during(60.0)
    assert "rollout-watchdog" not in threads_during(0.0)


def test_a_pause_on_purpose_is_no_fault_and_recovery_never_waits_on_a_silent_server(served):
    """A weight push during asynchronous rollouts pauses the servers, and SGLang's ``/health`` does not
    answer a paused one. Inside ``supervisor.paused()`` the watchdog kills no silent server and a
    failed request waits for the pause to end; a recovery asks a silent server only whether it still
    listens (not ``/health``), so it returns at once. A stopped (SIGSTOP) server stands in for a paused
    one: it accepts connections and answers nothing. Outside the pause the same silence is fatal."""
    import threading

    servers, supervisor = served
    supervisor.watchdog_s, supervisor.probe_timeout_s = 3.0, 30.0
    victim = servers.servers[0]
    os.killpg(victim.proc.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        assert supervisor.recover() == []  # it listens: not dying, left alone
        assert time.monotonic() - began < supervisor.probe_timeout_s / 3  # no /health probe waited out
        supervisor.probe_timeout_s = 1.0
        retried = []
        with supervisor.paused():
            waiter = threading.Thread(target=lambda: retried.append(supervisor.after_failed_request()))
            waiter.start()
            supervisor.run(lambda: time.sleep(4 * supervisor.watchdog_s))  # silent all along
            assert waiter.is_alive() and not retried  # the failed request waits for the pause to end
            assert victim.alive() and not supervisor.killed_stuck
        waiter.join(timeout=60)
        assert retried == [False]  # then recovery finds nothing to restart: the request is sent again
    finally:
        os.killpg(victim.proc.pid, signal.SIGCONT)
    stopped = victim.proc.pid
    os.killpg(stopped, signal.SIGSTOP)  # the control: the same silence, no pause
    supervisor.run(lambda: time.sleep(4 * supervisor.watchdog_s))
    assert supervisor.killed_stuck == [] and supervisor.num_restarts == 1  # killed, then restarted
    assert victim.proc.pid != stopped


def test_a_server_restarted_for_pushed_weights_rejoins_the_router_after_the_pause(tmp_path):
    """Distributed sync: a restarted server waits out of the router for the next push. When that push
    is made during a pause (asynchronous rollouts), the server goes back behind the router only once
    the pause ends: the router admits a server once it answers ``/health``, which a paused SGLang
    server does not (putting it back inside the pause held the push, and the pause, for good)."""
    model = save_tiny_hf_model(tmp_path / "model", arch="qwen3", seed=0)
    save_tiny_tokenizer(model, style="qwen")
    servers = RolloutServers(
        ServerConfig(
            model_path=str(model), num_servers=2, log_dir=str(tmp_path / "logs"), health_timeout_s=120,
            env={"OMP_NUM_THREADS": "1"}, extra_args=["--num-threads", "1"],
        )
    ).start()  # fmt: skip
    try:
        supervisor = ServerSupervisor(servers, None, watchdog_s=0)
        supervisor.weights_pushed("1")
        victim = servers.servers[1]
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        assert supervisor.recover() == [victim.url] and supervisor.waiting == {victim.url}
        assert victim.url not in servers._router_workers()  # out of the router until it has weights
        with supervisor.paused():
            supervisor.weights_pushed("2")
            assert victim.url not in servers._router_workers() and supervisor.waiting == {victim.url}
        assert servers._router_workers().get(victim.url) is True and supervisor.waiting == set()
        assert supervisor.serving == servers.worker_urls
    finally:
        servers.stop()
