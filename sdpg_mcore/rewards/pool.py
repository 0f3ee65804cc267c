"""A small process pool whose tasks each run under a wall-clock limit; a task past it kills its worker.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot stop one running task (a hung task
keeps its worker forever, and killing the process breaks the whole executor). Why not signals:
``signal.alarm`` works only in the main thread, and a C-level sympy loop may not return to Python
for it. Here each worker owns a socket; the parent waits on the sockets with a deadline, and a worker
that misses its deadline is killed and replaced, so a pathological expression costs one time limit
and a worker restart, never a training step.

Why workers are plain ``subprocess`` interpreters, not ``multiprocessing`` processes: the scorer is
called from anywhere — a script without an ``if __name__ == "__main__"`` guard (spawn and forkserver
re-import the caller's main module in every worker, re-running the script), a thread, a daemonic
worker of the user's own ``multiprocessing.Pool`` (which may not have children of its own), or a
forked child of a process that already had a pool. A fresh ``python -c`` never imports the caller's
main module, so none of these care. Workers exit when their parent dies (parent-death signal where
the pool was made in the main thread, and a watchdog that notices re-parenting otherwise).

Tasks are ``(fn, args)`` with ``fn`` a module-level function of an importable module (pickled by
reference). Inside a worker :func:`in_worker` is True, so code that would otherwise hop into a pool
for a time limit (the scorers) runs inline — the task's own limit already covers it.

    with TimeoutPool(num_workers=2) as pool:
        results = pool.map(fn, [(a,), (b,)], timeout_s=5.0)   # list[TaskResult], in order
    call_with_timeout(fn, a, timeout_s=5.0)                   # one call in the process-wide pool
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from sdpg_mcore.parallel.lifetime import die_with_parent

logger = logging.getLogger(__name__)

_IN_WORKER = False
STARTUP_TIMEOUT_S = 120.0
DEFAULT_TIMEOUT_S = 10.0
"""Default wall-clock limit of one reward call (extraction, normalisation and math-verify together)."""
_WATCHDOG_INTERVAL_S = 0.5
_DIED = "the reward worker process died (killed, or out of memory)"
_WORKER_CODE = "import sys; from sdpg_mcore.rewards.pool import worker_main; worker_main(sys.argv[1:])"


def in_worker() -> bool:
    """True inside a :class:`TimeoutPool` worker process."""
    return _IN_WORKER


@dataclass
class TaskResult:
    """What one task gave: ``value``, or ``error`` (a formatted traceback), or ``timed_out``."""

    value: Any = None
    error: str | None = None
    timed_out: bool = False
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    """Exit when the pool's process dies, even if a task is stuck (kill -9 of the parent runs no atexit).

    The parent-death signal follows the thread that started us, so a pool created off the main thread
    relies on the watchdog alone (``use_pdeathsig`` false)."""
    if use_pdeathsig:
        die_with_parent()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_WATCHDOG_INTERVAL_S)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def worker_main(argv: Sequence[str]) -> None:
    """Entry point of a worker interpreter: ``fd parent_pid pdeathsig preload,modules``."""
    global _IN_WORKER
    _IN_WORKER = True
    fd, parent_pid, pdeathsig, preload = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    _die_with_parent(int(parent_pid), pdeathsig == "1")
    conn = Connection(int(fd))
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for module in filter(None, preload.split(",")):  # import now, not on the first task
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, args = task
        try:
            conn.send(("ok", fn(*args)))
        except BaseException:  # report everything; the parent decides
            conn.send(("error", traceback.format_exc()))


class _Worker:
    """One ``python -c`` worker: the caller's ``sys.path``, a socket, no ``__main__`` re-import."""

    def __init__(self, preload: tuple[str, ...]):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        pdeathsig = threading.current_thread() is threading.main_thread()  # the signal follows the thread
        args = [str(child_sock.fileno()), str(os.getpid()), "1" if pdeathsig else "0", ",".join(preload)]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, *args],
            pass_fds=(child_sock.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.start_deadline = time.monotonic() + STARTUP_TIMEOUT_S
        self.task: int | None = None
        self.deadline = 0.0
        self.started = 0.0

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        self.conn.close()


class TimeoutPool:
    """``num_workers`` processes; every task runs under ``timeout_s`` and a late task's worker is replaced.

    ``preload`` modules are imported by each worker as it starts (a replacement after a timeout is
    warm by the time the next task needs it). A pool belongs to the process that made it: a forked
    child must make its own (``shared_pool`` does), and ``close`` in a child leaves the parent's alone.
    """

    def __init__(self, num_workers: int = 2, preload: tuple[str, ...] = ("math_verify",)):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        self.num_workers = num_workers
        self.preload = tuple(preload)
        self.owner_pid = os.getpid()
        self._workers: list[_Worker] = []
        self.num_timeouts = 0
        self.num_restarts = 0

    def _ensure_workers(self) -> None:
        if os.getpid() != self.owner_pid:
            raise RuntimeError("a TimeoutPool cannot be used from a forked child; make a new one there")
        self._workers = [w for w in self._workers if w.alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.preload))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self._workers.append(_Worker(self.preload))
        self.num_restarts += 1

    def _receive(self, worker: _Worker, results: list[TaskResult | None], now: float) -> None:
        try:
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            if not worker.ready:
                raise RuntimeError(_DIED) from None
            status, payload = "error", _DIED
            self._replace(worker)
        if status == "ready":
            worker.ready = True
            return
        task, worker.task = worker.task, None
        results[task] = TaskResult(
            value=payload if status == "ok" else None,
            error=None if status == "ok" else payload,
            elapsed_s=now - worker.started,
        )

    def map(self, fn: Callable[..., Any], args_list: Sequence[tuple], timeout_s: float) -> list[TaskResult]:
        """Run ``fn(*args)`` for every ``args`` in ``args_list``; results in input order."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        results: list[TaskResult | None] = [None] * len(args_list)
        pending = deque(range(len(args_list)))
        self._ensure_workers()
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    task = pending.popleft()
                    worker.task, worker.started = task, time.monotonic()
                    worker.deadline = worker.started + timeout_s
                    worker.conn.send((fn, tuple(args_list[task])))
            # The clock of a task starts when it is sent to a started worker, not while one imports.
            watched = [w for w in self._workers if not w.ready or w.task is not None]
            deadlines = [w.deadline if w.ready else w.start_deadline for w in watched]
            readable = wait([w.conn for w in watched], timeout=max(0.0, min(deadlines) - time.monotonic()))
            now = time.monotonic()
            for worker in watched:
                if worker.conn in readable:
                    self._receive(worker, results, now)
                elif not worker.ready and now >= worker.start_deadline:
                    raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT_S:.0f}s")
                elif worker.task is not None and now >= worker.deadline:
                    self.num_timeouts += 1
                    results[worker.task] = TaskResult(timed_out=True, elapsed_s=now - worker.started)
                    self._replace(worker)
        return results  # type: ignore[return-value]

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> TaskResult:
        return self.map(fn, [args], timeout_s)[0]

    def close(self) -> None:
        if os.getpid() != self.owner_pid:  # a forked copy: the workers are the parent's
            self._workers = []
            return
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=2)
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: TimeoutPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> TimeoutPool:
    """The process-wide one-worker pool behind :func:`call_with_timeout` (made again after a fork)."""
    global _shared, _shared_lock
    if _shared is not None and _shared.owner_pid != os.getpid():
        _shared, _shared_lock = None, threading.Lock()  # inherited from the parent: not ours
    if _shared is None:
        _shared = TimeoutPool(num_workers=1)
        atexit.register(_shared.close)
    return _shared


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float) -> TaskResult:
    """``fn(*args)`` under ``timeout_s``: in the shared worker, or inline inside a worker (its task's limit).

    Thread-safe: calls from several threads take turns on the one worker.
    """
    if in_worker():
        try:
            return TaskResult(value=fn(*args))
        except Exception:
            return TaskResult(error=traceback.format_exc())
    shared_pool()  # replaces a forked copy (and its lock) before the lock is taken
    with _shared_lock:
        return shared_pool().run(fn, *args, timeout_s=timeout_s)
