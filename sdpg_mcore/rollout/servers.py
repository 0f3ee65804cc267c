"""Launch and supervise N rollout servers (real SGLang or the dev server) behind the real SGLang router.

Every process runs in its own process group with its output in a log file under ``log_dir``;
``stop()`` (also run at exit and on SIGTERM/SIGINT once :meth:`RolloutServers.install_signal_handlers`
was called) terminates each group, then kills what is left. Processes are started from one launcher
thread that lives as long as the servers: their parent-death signal (``parallel/lifetime.py``)
follows the thread that started them, so a server restarted from the asynchronous-rollout thread
must not die with that thread.

Every server and the router start with the run's API key (``auth.py``: a fresh 0600 file under
``api_key_file``, never on a command line); :attr:`RolloutServers.api_key` is what clients send.

A server that dies is restarted on the same port by :meth:`RolloutServers.restart_dead` (driven by
``rollout.supervisor``): taken out of the router first, so no request reaches it before it has the
current weights, and put back by :meth:`RolloutServers.register_with_router` once it has them. A
server that never becomes healthy raises :class:`ServerStartError` naming its log.

    with RolloutServers(ServerConfig(model_path=path, num_servers=2, log_dir=run_dir / "logs")) as servers:
        client = RolloutClient(ClientConfig(url=servers.url, worker_urls=servers.worker_urls,
                                            api_key=servers.api_key))
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sdpg_mcore.parallel.lifetime import preexec_die_with_parent
from sdpg_mcore.parallel.spawn import find_free_port
from sdpg_mcore.rollout import auth, sglang_launch
from sdpg_mcore.rollout.http import http_json, post_all
from sdpg_mcore.rollout.protocol import MEMORY_TAGS

logger = logging.getLogger(__name__)
BACKENDS = ("dev", "sglang")


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_BIND_ATTEMPTS = 3
"""Starts of one server or router on freshly picked ports when a port was taken before the bind."""


class ServerStartError(RuntimeError):
    """A server or the router did not become healthy in time; the message names its log file."""


@dataclass
class ServerConfig:
    """How many rollout servers to run, of which kind, and how to reach them."""

    model_path: str
    """HF model directory served at start."""
    backend: str = "dev"
    """``dev`` (built-in CPU server) or ``sglang`` (``python -m sglang.launch_server``)."""
    num_servers: int = 1
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=list)
    """One port per server; empty picks free ports."""
    tp_size: int = 1
    """SGLang ``--tp-size`` per server (each server then holds ``tp_size`` ranks of a weight-update group)."""
    dp_size: int = 1
    """SGLang data parallel size per server."""
    base_gpu_id: int = 0
    """Server ``i`` uses GPUs from ``base_gpu_id + i * tp_size * dp_size`` (SGLang ``--base-gpu-id``)."""
    mem_fraction_static: float | None = None
    """SGLang ``--mem-fraction-static`` (share of GPU memory for weights + KV cache)."""
    enable_memory_saver: bool = False
    """SGLang ``--enable-memory-saver``; needed by colocated mode to release memory during training."""
    deterministic: bool = True
    """The client sends ``sampling_seed``: launch SGLang with ``--enable-deterministic-inference``
    (GPU attention backends only; on CPU SGLang cannot, and ignores the seeds)."""
    weight_sync: str = "disk"
    """How weights will reach the servers; ``distributed`` refuses ``dp_size > 1`` at start-up."""
    extra_args: list[str] = field(default_factory=list)
    """Appended to every server's command line."""
    env: dict[str, str] = field(default_factory=dict)
    log_dir: str = "rollout_logs"
    health_timeout_s: float = 600.0
    """Deadline for each server (and the router) to answer ``/health``."""
    max_restarts: int = 3
    """Restarts allowed per server before :meth:`RolloutServers.check` gives up."""
    router: bool = True
    """Start ``sglang_router`` in front of the servers."""
    router_port: int = 0
    router_policy: str = "round_robin"
    router_extra_args: list[str] = field(default_factory=list)
    api_key_file: str = ""
    """Where the run's API key is written (fresh at every start, mode 0600 in a 0700 directory);
    empty: ``<log_dir>/secrets/rollout_api_key``."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose one of {list(BACKENDS)}")
        if self.num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {self.num_servers}")
        if self.ports and len(self.ports) != self.num_servers:
            raise ValueError(f"ports lists {len(self.ports)} ports for num_servers={self.num_servers}")


@dataclass
class ManagedProcess:
    """One child process in its own process group, logging to ``log_path``."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    url: str
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        """Start the command; what is left of an earlier start (an SGLang scheduler whose server was
        killed alone: SGLang's children do not die with it) is killed first."""
        if self.proc is not None:
            self._kill_group()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.cmd)}\n".encode())
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=preexec_die_with_parent(),  # SIGKILL when the trainer dies, even by kill -9
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it after ``timeout_s``."""
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        self._kill_group()  # children left in the group after the leader exited

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def port_was_taken(self) -> bool:
        """Whether its last start died binding a port another process had taken (EADDRINUSE)."""
        try:
            last_run = self.log_path.read_text(errors="replace").rsplit("\n==== ", 1)[-1]
        except OSError:
            return False
        return "address already in use" in last_run.lower()

    def log_tail(self, num_lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"


class RolloutServers:
    """The running servers (and router) of one training job."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.log_dir = Path(config.log_dir)
        self.api_key_file = Path(config.api_key_file or self.log_dir / "secrets" / auth.KEY_FILE_NAME)
        self.api_key: str | None = None
        """The key every request but ``/health*`` must carry; set by :meth:`start`."""
        ports = config.ports or [find_free_port() for _ in range(config.num_servers)]
        self._python = sglang_launch.sglang_python() if config.backend == "sglang" else sys.executable
        self.servers = [self._server_process(i, port) for i, port in enumerate(ports)]
        self.router: ManagedProcess | None = None
        self._restart_lock = threading.Lock()  # one restart at a time, from any thread
        self.starting: set[str] = set()
        """Servers being restarted: not healthy yet, and no watchdog's to kill for not answering."""
        self._stopped = threading.Event()  # set by stop(), which must never wait for a restart
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-launcher")

    # ---------------------------------------------------------------- commands
    def _server_process(self, index: int, port: int) -> ManagedProcess:
        cfg = self.config
        env = {**os.environ, **cfg.env}
        if cfg.backend == "dev":
            cmd = [sys.executable, "-m", "sdpg_mcore.rollout.dev_server", "--model-path", cfg.model_path]
            cmd += ["--host", cfg.host, "--port", str(port), "--api-key-file", str(self.api_key_file)]
            # importable even when the package runs from a checkout, not installed
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        else:
            import torch

            env = {**sglang_launch.server_environment(dict(os.environ)), **cfg.env}
            cmd, extra_env = sglang_launch.sglang_command(
                python=self._python,
                model_path=cfg.model_path,
                host=cfg.host,
                port=port,
                index=index,
                tp_size=cfg.tp_size,
                dp_size=cfg.dp_size,
                base_gpu_id=cfg.base_gpu_id,
                cuda=torch.cuda.is_available(),
                deterministic=cfg.deterministic,
                mem_fraction_static=cfg.mem_fraction_static,
                enable_memory_saver=cfg.enable_memory_saver,
                api_key_file=str(self.api_key_file),
            )
            env.update(extra_env)
        cmd += list(cfg.extra_args)
        log_path = self.log_dir / f"server_{index}.log"
        return ManagedProcess(f"server {index}", cmd, env, log_path, f"http://{cfg.host}:{port}")

    def _router_process(self) -> ManagedProcess:
        """sglang-router with the worker key (it sends it to the workers and asks it of its clients)."""
        cfg = self.config
        port = cfg.router_port or find_free_port()
        cmd = [
            sys.executable,
            *sglang_launch.keyed_module("sglang_router.launch_router", str(self.api_key_file)),
        ]
        cmd += ["--host", cfg.host, "--port", str(port)]
        cmd += ["--worker-urls", *self.worker_urls, "--policy", cfg.router_policy]
        cmd += ["--worker-startup-check-interval", "1", "--health-check-interval-secs", "2"]
        # Its Prometheus exporter binds 29000 by default: a second router on the host would panic.
        cmd += ["--prometheus-host", cfg.host, "--prometheus-port", str(find_free_port())]
        cmd += ["--log-level", "warn", *cfg.router_extra_args]
        env = {**os.environ, **cfg.env}
        return ManagedProcess("router", cmd, env, self.log_dir / "router.log", f"http://{cfg.host}:{port}")

    # ---------------------------------------------------------------- lifecycle
    @property
    def worker_urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """Where clients send ``/generate``: the router if there is one, else the first server."""
        return self.router.url if self.router is not None else self.servers[0].url

    def _spawn(self, proc: ManagedProcess) -> None:
        """Start ``proc`` from the launcher thread (its parent-death signal must not follow a
        short-lived thread)."""
        self._launcher.submit(proc.start).result()

    def start(self) -> RolloutServers:
        atexit.register(self.stop)
        self.api_key = auth.read_key_file(auth.new_key_file(self.api_key_file.parent, self.api_key_file.name))
        for server in self.servers:
            self._spawn(server)
        try:
            deadline = time.monotonic() + self.config.health_timeout_s
            for index, server in enumerate(list(self.servers)):
                repick = None if self.config.ports else functools.partial(self._repick_server, index)
                self._healthy(server, deadline, repick)
            self.facts = sglang_launch.check_servers(
                self.worker_urls, weight_sync=self.config.weight_sync, api_key=self.api_key
            )
            if self.config.router:
                self.router = self._router_process()
                self._spawn(self.router)
                repick = None if self.config.router_port else self._repick_router
                self._healthy(self.router, time.monotonic() + self.config.health_timeout_s, repick)
                self._wait_router_workers(time.monotonic() + self.config.health_timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "rollout servers up: %s (router %s)", self.worker_urls, self.router.url if self.router else None
        )
        return self

    def _healthy(self, proc: ManagedProcess, deadline: float, repick) -> None:
        """Wait until ``proc`` is healthy. A port picked here can be taken by another process before
        the server binds it (``find_free_port`` only finds a port free at that moment): then, when
        ``repick`` is given (it puts the same process, on new ports, in ``proc``'s place), it is
        started again, up to ``_BIND_ATTEMPTS`` times in all."""
        attempts = 1
        while True:
            try:
                self.wait_healthy(proc, deadline)
                return
            except ServerStartError:
                if repick is None or attempts >= _BIND_ATTEMPTS or not proc.port_was_taken():
                    raise
            attempts += 1
            logger.warning(
                "%s: %s was taken before it could bind; starting it on another port", proc.name, proc.url
            )
            proc = repick()
            self._spawn(proc)

    def _repick_server(self, index: int) -> ManagedProcess:
        self.servers[index] = self._server_process(index, find_free_port())
        return self.servers[index]

    def _repick_router(self) -> ManagedProcess:
        self.router = self._router_process()
        return self.router

    def wait_healthy(self, proc: ManagedProcess, deadline: float) -> None:
        """Poll ``/health`` until 200; raise :class:`ServerStartError` if the deadline passes or it exits."""
        while True:
            if not proc.alive():
                code = proc.proc.returncode if proc.proc else None
                raise ServerStartError(
                    f"{proc.name} ({proc.url}) exited with code {code} before becoming healthy; "
                    f"see its log {proc.log_path}:\n{proc.log_tail()}"
                )
            try:
                status, _ = http_json(f"{proc.url}/health", timeout_s=2.0, api_key=self.api_key)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{proc.name} ({proc.url}) not healthy after {self.config.health_timeout_s:.0f}s; "
                    f"see its log {proc.log_path}:\n{proc.log_tail()}"
                )
            time.sleep(0.25)

    # ---------------------------------------------------------------- router membership
    def _router_workers(self) -> dict[str, bool]:
        """Worker URL -> healthy, as the router lists them."""
        return {url: healthy for url, (_, healthy) in self._router_entries().items()}

    def _router_entries(self) -> dict[str, tuple[str, bool]]:
        """Worker URL -> (the router's id for it, healthy)."""
        assert self.router is not None
        status, body = http_json(f"{self.router.url}/workers", api_key=self.api_key)
        if status != 200 or not isinstance(body, dict):
            return {}
        return {
            w["url"]: (str(w.get("id", "")), bool(w.get("is_healthy", True))) for w in body.get("workers", [])
        }

    def _wait_router_workers(self, deadline: float, urls: list[str] | None = None) -> None:
        urls = self.worker_urls if urls is None else urls
        while True:
            workers = self._router_workers()
            if all(workers.get(url) for url in urls):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"router lists {workers} but not all of {urls} as healthy; see {self.router.log_path}"
                )
            time.sleep(0.25)

    def register_with_router(self, url: str) -> None:
        """Put a worker (back) behind the router (``POST /workers``, queued by the router: 202) and wait
        until the router lists it as healthy; nothing without a router."""
        if self.router is None:
            return
        if url not in self._router_workers():
            status, body = http_json(f"{self.router.url}/workers", {"url": url}, api_key=self.api_key)
            if status not in (200, 201, 202):
                raise ServerStartError(f"router {self.router.url} refused worker {url}: HTTP {status} {body}")
        self._wait_router_workers(time.monotonic() + self.config.health_timeout_s, [url])

    def deregister_from_router(self, url: str) -> None:
        """Take a worker out of the router (``DELETE /workers/{id}``), so that no request reaches it; the
        router would otherwise route to a server restarted on the same port as soon as it answers
        ``/health``, before it has the current weights. Nothing without a router or when not listed."""
        entry = self._router_entries().get(url) if self.router is not None else None
        if entry is None:
            return
        worker_id = urllib.parse.quote(entry[0], safe="")
        status, body = http_json(
            f"{self.router.url}/workers/{worker_id}", method="DELETE", api_key=self.api_key
        )
        if status not in (200, 202, 204):
            raise ServerStartError(
                f"router {self.router.url} did not drop worker {url}: HTTP {status} {body}"
            )
        deadline = time.monotonic() + 30.0
        while url in self._router_workers() and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart_dead(self) -> list[str]:
        """Restart the servers that died (same port) and return their URLs. Each is out of the router
        until :meth:`register_with_router`: it serves the start-up weights, not the current ones. A
        server that dies again while it starts is started again, ``max_restarts`` times in all."""
        restarted = []
        with self._restart_lock:
            if self._stopped.is_set():
                return []
            for server in self.servers:
                if not server.alive():
                    if self.router is not None and self.router.alive():
                        self.deregister_from_router(server.url)
                    self._restart(server)
                    restarted.append(server.url)
        return restarted

    def _restart(self, server: ManagedProcess) -> None:
        while True:
            if server.restarts >= self.config.max_restarts:
                raise ServerStartError(
                    f"{server.name} ({server.url}) died {server.restarts + 1} times; see {server.log_path}"
                )
            logger.warning(
                "%s (%s) died (exit code %s); restarting it",
                server.name, server.url, server.proc.returncode if server.proc else None,
            )  # fmt: skip
            server.restarts += 1
            self.starting.add(server.url)
            try:
                self._spawn(server)
                self.wait_healthy(server, time.monotonic() + self.config.health_timeout_s)
                return
            except ServerStartError:
                if server.alive() or self._stopped.is_set():  # not healthy in time, or being stopped
                    raise
            finally:
                self.starting.discard(server.url)

    def check(self) -> list[str]:
        """Restart dead servers and put them straight back behind the router (the start-up weights
        are the current ones, or the caller loads the current ones itself); the restarted URLs."""
        restarted = self.restart_dead()
        for url in restarted:
            self.register_with_router(url)
        return restarted

    def stop(self) -> None:
        """Terminate the router and every server (process groups); safe to call twice, and from a
        signal handler while a restart is under way (the restart then fails: its server is gone)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for proc in ([self.router] if self.router else []) + self.servers:
            proc.stop()
        self._launcher.shutdown(wait=False)

    def install_signal_handlers(self) -> None:
        """On SIGTERM/SIGINT stop the servers, then let the previous handler act (exit / KeyboardInterrupt)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.stop()
                if callable(previous):
                    previous(signum, frame)
                else:
                    raise SystemExit(128 + signum)

            signal.signal(sig, handler)

    def __enter__(self) -> RolloutServers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MemoryOccupation:
    """Colocated engines' memory (weights, KV cache, CUDA graphs) handed to training and back.

    ``release()`` after a rollout (``/release_memory_occupation``), ``resume()`` before the next
    weight push (``/resume_memory_occupation``); both take SGLang's memory ``tags`` (``weights``,
    ``kv_cache``, ``cuda_graph``; default all), so the weights can come back before the KV cache.
    Each is a no-op for tags already in that state. SGLang needs ``--enable-memory-saver`` on GPUs
    for the release to free anything; the call itself works on CPU too.
    """

    def __init__(
        self,
        server_urls: list[str],
        tags: list[str] | None = None,
        timeout_s: float = 120.0,
        *,
        api_key: str | None = None,
    ):
        self.server_urls = list(server_urls)
        self.tags = list(tags) if tags else list(MEMORY_TAGS)
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.released_tags: set[str] = set()

    @property
    def released(self) -> bool:
        return bool(self.released_tags)

    def _call(self, path: str, tags: list[str]) -> None:
        post_all(self.server_urls, path, {"tags": tags}, timeout_s=self.timeout_s, api_key=self.api_key)

    def release(self, tags: list[str] | None = None) -> None:
        todo = [t for t in (tags or self.tags) if t not in self.released_tags]
        if todo:
            self._call("/release_memory_occupation", todo)
            self.released_tags |= set(todo)

    def resume(self, tags: list[str] | None = None) -> None:
        todo = [t for t in (tags or self.tags) if t in self.released_tags]
        if todo:
            self._call("/resume_memory_occupation", todo)
            self.released_tags -= set(todo)

    @contextmanager
    def released_during(self):
        """Inside the block the servers hold no memory; afterwards they have it back."""
        self.release()
        try:
            yield
        finally:
            self.resume()
