"""Keep the launched rollout servers serving: a dead or stuck server is restarted, gets the current
weights back, and the rollout it broke is generated again; a stuck one costs a minute, not an hour.

The client alone cannot recover: retries of a dead server's requests go to the same URL (no router)
or to a router that still lists it, and a server that stopped answering (SIGSTOP, a deadlock)
holds each request for ``request_timeout_s`` x (``max_retries`` + 1), an hour by default. So
:meth:`ServerSupervisor.run` runs each rollout with

- a watchdog thread that probes every server's ``/health`` while the rollout runs; a live server
  that has not answered for ``watchdog_s`` is killed (SIGKILL to its process group), so its
  requests fail fast and are retried (on the other workers, behind a router);
- the rollout's deadline (``ClientConfig.deadline_s``) as the backstop;

and after a failed rollout (or one that the watchdog had to intervene in) it restarts the dead
servers on their ports, re-registers them with the router (``RolloutServers.check``, at most
``ServerConfig.max_restarts`` times each), loads the newest published weights (``DiskWeightSync``'s
``weights-<version>`` directories) into them and checks the version, so no response comes from stale
weights; a failed rollout is then generated once more. Without a restart the error is raised: the
fault is elsewhere. Restarts happen in the caller's thread, between rollouts, never during a push.

    supervisor = ServerSupervisor(servers, weights_dir=run_dir / "weights")
    groups = supervisor.run(lambda: client.run(client.generate(...)))
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from sdpg_mcore.rollout.client import RolloutError
from sdpg_mcore.rollout.servers import RolloutServers, http_json
from sdpg_mcore.rollout.weight_sync import check_weight_versions

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ServerSupervisor:
    """Restart-and-retry around rollouts of servers this process launched (``RolloutServers``)."""

    def __init__(
        self,
        servers: RolloutServers,
        weights_dir: Path | None,
        *,
        watchdog_s: float = 60.0,
        probe_timeout_s: float = 10.0,
    ):
        self.servers = servers
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self.watchdog_s = watchdog_s
        self.probe_timeout_s = probe_timeout_s
        self.num_restarts = 0
        self.killed_stuck: list[str] = []

    def run(self, rollout: Callable[[], T]) -> T:
        """``rollout()`` under the watchdog; after a :class:`RolloutError` restart what is broken and
        run it once more; after a rollout that succeeded without a server (a router routed around
        it), restart that server."""
        try:
            with self._watchdog():
                result = rollout()
        except RolloutError as err:
            restarted = self.recover()
            if not restarted:
                raise
            logger.warning("rollout failed (%s); restarted %s, generating again", err, restarted)
            with self._watchdog():
                return rollout()
        if self.killed_stuck or not all(server.alive() for server in self.servers.servers):
            self.recover()  # the router served the rollout without it: bring it back for the next one
        return result

    def recover(self) -> list[str]:
        """Kill unresponsive servers, restart dead ones with the current weights; the restarted URLs."""
        for server in self.servers.servers:
            if server.alive() and not self._answers(server.url):
                logger.warning(
                    "%s (%s) is alive but does not answer /health: killing it", server.name, server.url
                )
                server.stop(timeout_s=5.0)
        self.killed_stuck.clear()
        restarted = self.servers.check()
        for url in restarted:
            self._load_weights(url)
        self.num_restarts += len(restarted)
        return restarted

    @contextlib.contextmanager
    def _watchdog(self) -> Iterator[None]:
        """Probe the servers every few seconds while the block runs; kill one unanswering for ``watchdog_s``."""
        stop = threading.Event()
        thread = threading.Thread(target=self._watch, args=(stop,), name="rollout-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=self.probe_timeout_s + 1.0)

    def _watch(self, stop: threading.Event) -> None:
        last_answer = {s.url: time.monotonic() for s in self.servers.servers}
        interval = max(0.5, min(5.0, self.watchdog_s / 6))
        while not stop.wait(interval):
            for server in self.servers.servers:
                now = time.monotonic()
                if not server.alive() or self._answers(server.url):
                    last_answer[server.url] = now
                elif now - last_answer[server.url] > self.watchdog_s:
                    logger.warning(
                        "%s (%s) has not answered /health for %.0f s: killing it (it is restarted after "
                        "this rollout)", server.name, server.url, now - last_answer[server.url],
                    )  # fmt: skip
                    try:  # reaped and restarted by recover(), in the caller's thread
                        os.killpg(server.proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    self.killed_stuck.append(server.url)
                    last_answer[server.url] = now

    def _answers(self, url: str) -> bool:
        try:
            status, _ = http_json(f"{url}/health", timeout_s=self.probe_timeout_s)
        except OSError:
            return False
        return status == 200

    def _load_weights(self, url: str) -> None:
        """The newest published weights into the restarted server at ``url`` (none yet: it has the initial ones)."""
        published = (
            sorted(self.weights_dir.glob("weights-*"), key=lambda p: p.stat().st_mtime)
            if self.weights_dir
            else []
        )
        if not published:
            return
        newest = published[-1]
        version = newest.name.removeprefix("weights-")
        payload = {
            "model_path": str(newest),
            "load_format": "auto",
            "weight_version": version,
            "flush_cache": True,
        }
        status, body = http_json(f"{url}/update_weights_from_disk", payload, timeout_s=600.0)
        if status != 200 or (isinstance(body, dict) and body.get("success") is False):
            raise RolloutError(
                f"restarted server {url} could not load {newest}: HTTP {status} {str(body)[:300]}"
            )
        check_weight_versions([url], version)
        logger.info("restarted server %s loaded weights version %s", url, version)
