"""Keep the launched rollout servers serving: a dead or stuck server is restarted, gets the current
weights back, and the rollout it broke is generated again; a stuck one costs a deadline, not an hour.

The client alone cannot recover: retries of a dead server's requests go to the same URL (no router)
or to a router that still lists it, and a server that stopped answering (SIGSTOP, a deadlock)
holds each request for ``request_timeout_s`` x (``max_retries`` + 1). So every rollout runs under
a deadline (``ClientConfig.deadline_s``), and when it fails :meth:`ServerSupervisor.run`:

1. probes each server's ``/health`` (``probe_timeout_s``); a live process that does not answer is
   killed (its process group);
2. restarts the dead ones on their ports and re-registers them with the router
   (``RolloutServers.check``, at most ``ServerConfig.max_restarts`` times per server);
3. loads the newest published weights (``DiskWeightSync``'s ``weights-<version>`` directories)
   into each restarted server and checks its version, so no response comes from stale weights;
4. runs the rollout once more. Without a restart the error is raised: the fault is elsewhere.

It acts from the caller's thread, between rollouts, never concurrently with a weight push.

    supervisor = ServerSupervisor(servers, weights_dir=run_dir / "weights")
    groups = supervisor.run(lambda: client.run(client.generate(...)))
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sdpg_mcore.rollout.client import RolloutError
from sdpg_mcore.rollout.servers import RolloutServers, http_json

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ServerSupervisor:
    """Restart-and-retry around rollouts of servers this process launched (``RolloutServers``)."""

    def __init__(self, servers: RolloutServers, weights_dir: Path | None, *, probe_timeout_s: float = 30.0):
        self.servers = servers
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self.probe_timeout_s = probe_timeout_s
        self.num_restarts = 0

    def run(self, rollout: Callable[[], T]) -> T:
        """``rollout()``; after a :class:`RolloutError`, restart what is broken and run it once more."""
        try:
            return rollout()
        except RolloutError as err:
            restarted = self.recover()
            if not restarted:
                raise
            logger.warning("rollout failed (%s); restarted %s, generating again", err, restarted)
        return rollout()

    def recover(self) -> list[str]:
        """Kill unresponsive servers, restart dead ones with the current weights; the restarted URLs."""
        for server in self.servers.servers:
            if server.alive() and not self._answers(server.url):
                logger.warning(
                    "%s (%s) is alive but does not answer /health: killing it", server.name, server.url
                )
                server.stop(timeout_s=5.0)
        restarted = self.servers.check()
        for url in restarted:
            self._load_weights(url)
        self.num_restarts += len(restarted)
        return restarted

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
        logger.info("restarted server %s loaded weights version %s", url, version)
