"""A small process pool whose tasks each run under a wall-clock limit; a task past it kills its worker.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot stop one running task (a hung task
keeps its worker forever, and killing the process breaks the whole executor). Why not signals:
``signal.alarm`` works only in the main thread, and a C-level sympy loop may not return to Python
for it. Here each worker owns a pipe; the parent waits on the pipes with a deadline, and a worker that
misses its deadline is killed and replaced, so a pathological expression costs one time limit and a
worker restart, never a training step.

Tasks are ``(fn, args)`` with ``fn`` a module-level (picklable) function. Inside a worker,
:func:`in_worker` is True, so code that would otherwise hop into a pool for a time limit (the math
scorer) runs inline — the task's own limit already covers it.

    with TimeoutPool(num_workers=2) as pool:
        results = pool.map(fn, [(a,), (b,)], timeout_s=5.0)   # list[TaskResult], in order

As with any ``forkserver``/``spawn`` multiprocessing, a script that uses the pool must keep its
top-level code under ``if __name__ == "__main__":`` (workers import the main module).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

_IN_WORKER = False
STARTUP_TIMEOUT_S = 120.0
_DIED = (
    "the reward worker process died: killed, out of memory, or it could not start because the main "
    "script runs code at import time (put it under `if __name__ == '__main__':`)"
)


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


def _worker_main(conn: Connection, preload: tuple[str, ...]) -> None:
    global _IN_WORKER
    _IN_WORKER = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for module in preload:  # import while the parent is still busy, not on the first task
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
    def __init__(self, ctx, preload: tuple[str, ...]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, preload), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.start_deadline = time.monotonic() + STARTUP_TIMEOUT_S
        self.task: int | None = None
        self.deadline = 0.0
        self.started = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class TimeoutPool:
    """``num_workers`` processes; every task runs under ``timeout_s`` and a late task's worker is replaced.

    ``start_method`` defaults to ``forkserver``: forking a trainer process that holds CUDA contexts or
    communicator threads is unsafe, and ``spawn`` pays a full interpreter start for every replacement.
    ``preload`` modules are imported by each worker as it starts (a replacement after a timeout is
    warm by the time the next task needs it).
    """

    def __init__(
        self,
        num_workers: int = 2,
        start_method: str = "forkserver",
        preload: tuple[str, ...] = ("math_verify",),
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        self.num_workers = num_workers
        self.preload = tuple(preload)
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self.num_timeouts = 0
        self.num_restarts = 0

    def _ensure_workers(self) -> None:
        self._workers = [w for w in self._workers if w.process.is_alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.preload))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self._workers.append(_Worker(self._ctx, self.preload))
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
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=2)
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
