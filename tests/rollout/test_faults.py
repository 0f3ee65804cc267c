"""Faults with real processes: a server killed mid-rollout, servers that never become healthy, shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sdpg_mcore.rollout.client import ClientConfig, RolloutClient, RolloutError
from sdpg_mcore.rollout.http import http_json
from sdpg_mcore.rollout.protocol import SamplingParams
from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig, ServerStartError
from sdpg_mcore.rollout.sglang_launch import sglang_python


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_killed_mid_rollout_is_retried_then_restarted(tiny_model_dir, tmp_path, server_factory):
    servers = server_factory(tiny_model_dir, tmp_path / "logs")
    try:
        deadline_s = 90.0
        client = RolloutClient(
            ClientConfig(
                url=servers.url,
                worker_urls=servers.worker_urls,
                deadline_s=deadline_s,
                backoff_s=0.2,
                api_key=servers.api_key,
            )
        )
        victim = servers.servers[0]
        params = SamplingParams(max_new_tokens=120, ignore_eos=True)
        killed_with_in_flight = []

        async def rollout_and_kill():
            import asyncio

            task = asyncio.ensure_future(client.generate([[1, 2, 3]] * 8, params, n=2, seed=0))
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up:  # kill the victim while it decodes requests of this rollout
                await asyncio.sleep(0.05)
                _, info = await client.get("/get_server_info", url=victim.url)
                assert isinstance(info, dict), info
                if info["internal_states"][0]["num_in_flight"] > 0:
                    killed_with_in_flight.append(info["internal_states"][0]["num_in_flight"])
                    break
            os.killpg(victim.proc.pid, signal.SIGKILL)
            return await task

        start = time.monotonic()
        try:
            groups = client.run(rollout_and_kill())
        except RolloutError as err:  # allowed: a clear error within the deadline
            assert time.monotonic() - start < deadline_s + 10, err
        else:
            assert time.monotonic() - start < deadline_s + 10
            assert all(len(s.output_ids) == 120 and s.finish_reason == "length" for g in groups for s in g)
        assert killed_with_in_flight
        assert not victim.alive()
        assert servers.check() == [victim.url]
        assert victim.alive() and victim.restarts == 1
        assert http_json(f"{victim.url}/health")[0] == 200
        workers = http_json(f"{servers.url}/workers", api_key=servers.api_key)[1]["workers"]
        assert victim.url in [w["url"] for w in workers]
        client2 = RolloutClient(
            ClientConfig(url=servers.url, worker_urls=servers.worker_urls, api_key=servers.api_key)
        )
        groups = client2.run(client2.generate([[4, 5]], SamplingParams(max_new_tokens=3), n=4))
        assert all(len(s.output_ids) == 3 for s in groups[0])
    finally:
        servers.stop()
    assert not any(s.alive() for s in servers.servers) and not servers.router.alive()


def test_server_that_exits_names_its_log(tmp_path):
    (tmp_path / "empty").mkdir()
    config = ServerConfig(
        model_path=str(tmp_path / "empty"), log_dir=str(tmp_path / "logs"), health_timeout_s=60
    )
    with pytest.raises(ServerStartError, match=r"server 0 .*exited with code 1.*server_0\.log") as info:
        RolloutServers(config).start()
    assert "no config.json" in str(info.value)  # the log tail says why


def test_server_not_healthy_by_the_deadline_names_its_log(tiny_model_dir, tmp_path):
    config = ServerConfig(
        model_path=str(tiny_model_dir), log_dir=str(tmp_path / "logs"), health_timeout_s=0.5
    )
    servers = RolloutServers(config)
    start = time.monotonic()
    with pytest.raises(ServerStartError, match=r"not healthy after 0s; see its log .*server_0\.log"):
        servers.start()
    assert time.monotonic() - start < 20
    assert not servers.servers[0].alive()  # stopped on the way out


@pytest.mark.slow  # ~30 s: a launcher process that starts a server, then is signalled
def test_sigterm_stops_every_server(tiny_model_dir, tmp_path):
    pid_file = tmp_path / "pids.json"
    script = textwrap.dedent(
        f"""
        import json, time
        from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig
        servers = RolloutServers(ServerConfig(model_path={str(tiny_model_dir)!r}, log_dir={str(tmp_path / "logs")!r},
                                              router=False, env={{"OMP_NUM_THREADS": "1"}}))
        servers.install_signal_handlers()
        servers.start()
        open({str(pid_file)!r}, "w").write(json.dumps([s.proc.pid for s in servers.servers]))
        while True:
            time.sleep(0.2)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None and time.monotonic() < deadline, "launcher died or timed out"
            time.sleep(0.2)
        pids = json.loads(pid_file.read_text())
        assert all(_pid_alive(p) for p in pids)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert not any(_pid_alive(p) for p in pids)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_server_config_rejects_bad_values():
    with pytest.raises(ValueError, match="backend"):
        ServerConfig(model_path="x", backend="vllm")
    with pytest.raises(ValueError, match="ports"):
        ServerConfig(model_path="x", num_servers=2, ports=[1])


def test_a_port_taken_before_the_server_binds_is_picked_again(
    tiny_model_dir, server_factory, tmp_path, monkeypatch
):
    """``find_free_port`` only finds a port free at that moment; another process can take it before
    the server binds (seen when a benchmark ran beside the suite). The server is started again on a
    new port instead of failing the run."""
    import socket

    from sdpg_mcore.rollout import servers as servers_module

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    picks, real = iter([taken]), servers_module.find_free_port
    monkeypatch.setattr(servers_module, "find_free_port", lambda: next(picks, None) or real())
    try:
        group = server_factory(tiny_model_dir, tmp_path / "logs", num_servers=1, router=False)
    finally:
        blocker.close()
    try:
        url = group.worker_urls[0]
        assert not url.endswith(f":{taken}") and http_json(f"{url}/health")[0] == 200
        assert "address already in use" in (tmp_path / "logs" / "server_0.log").read_text().lower()
    finally:
        group.stop()


@pytest.mark.timeout(1200)  # real SGLang: its start-up deadline below
@pytest.mark.parametrize("backend", ["dev", pytest.param("sglang", marks=pytest.mark.slow)])
def test_kill9_of_the_launcher_takes_every_server_process_with_it(tiny_model_dir, tmp_path, backend):
    """``kill -9`` of the process that launched the servers and the router: 5 s later none of their
    processes is alive, SGLang's scheduler and detokenizer included (SGLang does not make them die
    with its own main process; ``sglang_entry`` does)."""
    import psutil

    if backend == "sglang":
        sglang_python()  # raises naming the setup command when real SGLang is missing
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig
        servers = RolloutServers(ServerConfig(model_path={str(tiny_model_dir)!r}, log_dir={str(tmp_path / "logs")!r},
                                              backend={backend!r}, router=True, health_timeout_s=900,
                                              env={{"OMP_NUM_THREADS": "1"}}))
        servers.start()
        open({str(ready)!r}, "w").write("up")
        time.sleep(3600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 900
        while not ready.exists():
            assert parent.poll() is None and time.monotonic() < deadline, "launcher died or timed out"
            time.sleep(0.2)
        started = psutil.Process(parent.pid).children(recursive=True)
        assert len(started) >= (4 if backend == "sglang" else 2)  # server (+ scheduler, detokenizer), router
        parent.kill()
        parent.wait()
        time.sleep(5.0)
        survivors = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for process in survivors:
            process.kill()
        assert not survivors, [" ".join(p.cmdline())[:100] for p in survivors]
    finally:
        if parent.poll() is None:
            parent.kill()
