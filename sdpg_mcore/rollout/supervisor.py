"""Keep the launched rollout servers serving: a dead or stuck server is restarted, gets the current
weights back, and the requests it lost are sent again; a stuck one costs a minute, not an hour.

The client alone cannot recover: retries of a dead server's requests go to the same URL (no router)
or to a router that still lists it, and a server that stopped answering (SIGSTOP, a deadlock) holds
each request for ``request_timeout_s`` x (``max_retries`` + 1), an hour by default. So

- :meth:`ServerSupervisor.after_failed_request` is the client's ``on_failure``: after any failed
  ``/generate`` attempt it restarts the servers that died (``RolloutServers.restart_dead``: same
  port, out of the router meanwhile) and brings each back (:meth:`recover`); the client then re-sends
  the request, and only it (completed requests are kept);
- :meth:`ServerSupervisor.run` runs each rollout under a watchdog thread that probes every server's
  ``/health``: a live server that has not answered for ``watchdog_s`` (``rollout.watchdog_s``) is
  killed (SIGKILL to its process group), so its requests fail fast and take the path above; the
  rollout's deadline (``ClientConfig.deadline_s``) is the backstop.

Bringing a restarted server back means giving it the current weights before it serves (it starts
from the model directory, ``weight_version`` "default"). With disk sync the newest published
``weights-<version>`` directory is them: it loads it here, at once, and goes back behind the router.
With distributed or tensor sync the weights live in the trainer ranks' shards: the server waits,
out of the router, for the next push from every rank (``train/rollout_io.py``: ``WeightPusher``
re-forms its update group and pushes to all servers; :meth:`weights_pushed` then registers it).
While other servers still serve, generation goes on without it; when none is left,
:class:`ServersNeedWeights` stops the rollout so that the trainer can push (``restore``) and
generate again. Every server is restarted at most ``ServerConfig.max_restarts`` times.

Pauses. A weight push during asynchronous rollouts pauses generation in place
(``train/async_rollout.py``), and SGLang's ``/health`` generates a token: a paused server does not
answer it (it fails after 20 s), and the router, which probes it too, stops routing to it. Inside
:meth:`paused` neither means a stuck server: the watchdog counts no silence, and a request that
failed meanwhile waits for the pause to end before it is sent again. A recovery asks a server
whether it still listens with a TCP connect, not ``/health``: a paused or busy server accepts at
once, so a recovery holds its lock for moments and a push that ends (:meth:`weights_pushed`) does
not wait behind recoveries (seen with real SGLang: each recovery probed two paused servers'
``/health`` for 10 s under the lock, the failed requests' recoveries queued on it, and the push that
would have ended the pause waited behind them, for good). A restarted server that a push reaches
during a pause goes back behind the router after the pause, since the router admits a server only
once it answers ``/health``.

    supervisor = ServerSupervisor(servers, weights_dir=run_dir / "weights")   # None: pushed weights
    client = RolloutClient(config, on_failure=supervisor.on_failure)
    groups = supervisor.run(lambda: client.run(client.generate(...)))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from sdpg_mcore.rollout.client import RolloutError
from sdpg_mcore.rollout.http import failed, http_json
from sdpg_mcore.rollout.servers import RolloutServers
from sdpg_mcore.rollout.weight_sync import check_weight_versions

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ServersNeedWeights(RolloutError):
    """Every server that could serve was restarted and waits for weights only a push from every trainer
    rank can give (distributed or tensor sync): the caller pushes (``WeightPusher.restore``) and retries."""


class ServerSupervisor:
    """Restart, re-weight and re-admit the servers this process launched (``RolloutServers``)."""

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
        """Where disk sync publishes ``weights-<version>``; None: the weights arrive by a push."""
        self.watchdog_s = watchdog_s
        self.probe_timeout_s = probe_timeout_s
        self.version: str | None = None
        """The weights every server should hold (set by :meth:`weights_pushed`); None: the start-up ones."""
        self.waiting: set[str] = set()
        """Restarted servers waiting, out of the router, for the next push."""
        self.num_restarts = 0
        self.killed_stuck: list[str] = []
        self._lock = threading.RLock()  # one recovery at a time, from any thread (client, rollout thread)
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._readmit: set[str] = set()
        """Waiting servers the last push reached, to put back behind the router (after a pause)."""

    # ---------------------------------------------------------------- recovery
    def recover(self) -> list[str]:
        """Restart dead servers and bring each back; the restarted URLs. A server whose port refuses
        connections is dying (a killed process closes its sockets before it exits): it is finished
        off first. A live server that is slow to answer is left alone: under load, or paused, SGLang's
        /health (a one-token generation) can take long; the watchdog kills one silent for ``watchdog_s``."""
        with self._lock:
            for server in self.servers.servers:
                # Probed under the lock: a probe made before it could see a server another thread
                # was restarting meanwhile (not yet listening) and kill it again.
                if server.alive() and server.url not in self.servers.starting and self._refuses(server.url):
                    logger.warning(
                        "%s (%s) refuses connections: killing what is left of it", server.name, server.url
                    )
                    server.stop(timeout_s=5.0)
            self.killed_stuck.clear()
            restarted = self.servers.restart_dead()
            for url in restarted:
                self._bring_back(url)
            self.num_restarts += len(restarted)
            return restarted

    def _bring_back(self, url: str) -> None:
        """The current weights into the restarted server at ``url``, then back behind the router; with
        pushed weights it waits for the next push instead."""
        if self.version is not None and self.weights_dir is None:
            logger.warning("%s restarted; it waits out of the router for the next weight push", url)
            self.waiting.add(url)
            self._readmit.discard(url)  # a push it may have had died with the process before
            return
        if self.version is not None:
            self._load_published(url)
        self.servers.register_with_router(url)
        logger.warning("%s restarted with weights version %s", url, self.version or "(start-up)")

    def _load_published(self, url: str) -> None:
        """The newest published weights (disk sync) into ``url``: those of the last push, or of the one
        being committed now, which then reaches this server too."""
        published = sorted(self.weights_dir.glob("weights-*"), key=lambda p: p.stat().st_mtime)
        if not published:
            raise RolloutError(f"restarted server {url}: no weights-* directory in {self.weights_dir}")
        newest = published[-1]
        version = newest.name.removeprefix("weights-")
        payload = {
            "model_path": str(newest),
            "load_format": "auto",
            "weight_version": version,
            "flush_cache": True,
        }
        api_key = self.servers.api_key
        status, body = http_json(f"{url}/update_weights_from_disk", payload, timeout_s=600.0, api_key=api_key)
        if failed(status, body):
            raise RolloutError(
                f"restarted server {url} could not load {newest}: HTTP {status} {str(body)[:300]}"
            )
        check_weight_versions([url], version, api_key=api_key)

    def weights_published(self, version: str) -> None:
        """Disk sync, rank 0, before the commit: ``weights-<version>`` is the newest published directory,
        so a server restarted from now on loads it (and the commit completes with it)."""
        if self.weights_dir is not None:
            with self._lock:
                self.version = version

    def weights_pushed(self, version: str) -> None:
        """After a push reached every server (rank 0): servers that waited for it serve again — at once,
        or, during a pause (:meth:`paused`), once it ends: the router admits a server only once it
        answers ``/health``, which a paused SGLang server does not."""
        with self._lock:
            self.version = version
            self._readmit |= self.waiting  # these got this push
        if self._unpaused.is_set():
            self._readmit_waiting()

    def _readmit_waiting(self) -> None:
        with self._lock:
            for url in sorted(self._readmit & self.waiting):
                self.servers.register_with_router(url)
                logger.warning(
                    "%s has weights version %s again and is back behind the router", url, self.version
                )
                self.waiting.discard(url)
            self._readmit.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Generation is paused on purpose while the block runs (a weight push during asynchronous
        rollouts): silence is not a fault until it ends (module docstring), and servers that waited
        for a push made meanwhile go back behind the router after it."""
        self._unpaused.clear()
        try:
            yield
        finally:
            self._unpaused.set()
        self._readmit_waiting()

    @property
    def serving(self) -> list[str]:
        """The servers that are alive and hold the current weights."""
        return [s.url for s in self.servers.servers if s.alive() and s.url not in self.waiting]

    def after_failed_request(self) -> bool:
        """A ``/generate`` attempt failed: restart what died; True when something was restarted (the
        request is worth sending again at once). Raises :class:`ServersNeedWeights` when no server
        with the current weights is left. During a pause (:meth:`paused`) it first waits for the end."""
        self._unpaused.wait()
        restarted = self.recover()
        if not self.serving:
            raise ServersNeedWeights(
                f"rollout servers {sorted(self.waiting)} were restarted and wait for the weights of "
                f"version {self.version}; no other server is left to generate"
            )
        return bool(restarted)

    async def on_failure(self) -> bool:
        """:meth:`after_failed_request` for the async client (off its event loop)."""
        return await asyncio.to_thread(self.after_failed_request)

    # ---------------------------------------------------------------- watchdog
    def run(self, rollout: Callable[[], T]) -> T:
        """``rollout()`` under the watchdog; afterwards, restart a server the router served it without."""
        with self._watchdog():
            result = rollout()
        if self.killed_stuck or not all(server.alive() for server in self.servers.servers):
            self.recover()
        return result

    @contextlib.contextmanager
    def _watchdog(self) -> Iterator[None]:
        """Probe the servers every few seconds while the block runs; kill one unanswering for
        ``watchdog_s`` (0: no watchdog)."""
        if not self.watchdog_s:
            yield
            return
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
                if not self._unpaused.is_set():  # paused on purpose: silence counts from the end
                    last_answer[server.url] = now
                elif not server.alive() or server.url in self.servers.starting or self._answers(server.url):
                    last_answer[server.url] = now
                elif now - last_answer[server.url] > self.watchdog_s:
                    logger.warning(
                        "%s (%s) has not answered /health for %.0f s: killing it (it is restarted before "
                        "its requests are sent again)", server.name, server.url, now - last_answer[server.url],
                    )  # fmt: skip
                    try:  # reaped and restarted by recover()
                        os.killpg(server.proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    self.killed_stuck.append(server.url)
                    last_answer[server.url] = now

    def _refuses(self, url: str) -> bool:
        """Whether nothing listens at ``url``: a TCP connect, not ``/health``, which a paused or busy
        server accepts at once but may not answer for many seconds."""
        address = urlsplit(url)
        try:
            socket.create_connection((address.hostname, address.port), timeout=self.probe_timeout_s).close()
        except ConnectionRefusedError:
            return True
        except OSError:  # a timeout: something holds the port, too busy to accept now
            return False
        return False

    def _answers(self, url: str) -> bool:
        """Whether ``/health`` answers 200 within ``probe_timeout_s``."""
        try:
            status, _ = http_json(f"{url}/health", timeout_s=self.probe_timeout_s)
        except OSError:
            return False
        return status == 200
