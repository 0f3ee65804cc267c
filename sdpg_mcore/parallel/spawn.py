"""Run a function on N local ranks joined in a real process group: gloo on CPU, NCCL on GPUs.

Tests, ``sdpg-train --nproc N`` and tools (``tools/check_parity.py`` run without torchrun) use this
to get real ``torch.distributed`` groups on one machine. The function and its arguments must be
picklable (a module-level function). The ranks are bound as the trainer binds them
(``state.device_binding``): with CUDA, rank r sets ``cuda:r`` before its NCCL group exists, so
``--tp 2 --pp 2`` puts four ranks on four GPUs, not all on ``cuda:0``.

How a rank starts (:func:`start_method`). With GPUs visible, as a fresh ``spawn`` process: a child
forked after the CUDA driver was touched cannot use it. Without, it forks from ``multiprocessing``'s
fork server, a clean single-threaded process that imported torch, Megatron-Core and the trainer once
(:data:`PRELOAD`), where each fresh process would import them again: measured with ``python
tools/bench_spawn.py`` on 2 cores, two ranks start in 7.3 s by ``spawn`` and 0.09 s from the fork
server after its first start (four: 16.3 s and 0.19 s). Either way a rank sees this process's
environment and working directory as they are when it starts (the fork server kept the ones it was
started with: :func:`_rank_main` installs the current ones), and dies with it, even by ``kill -9``
(``lifetime.die_with``: a fork server's child outlives its launcher otherwise).

    results = spawn_ranks(my_fn, world_size=4, args=(x,))   # results[rank] = my_fn(rank, 4, x)
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Imported once by the fork server (CPU ranks): what a trainer rank needs, the costly part of its start.
PRELOAD = ["torch", "megatron.core", "sdpg_mcore.parallel.state", "sdpg_mcore.train.trainer"]


def start_method(gpu_count: int) -> str:
    """``spawn`` where ranks use GPUs, ``forkserver`` (preloaded: :data:`PRELOAD`) where they do not."""
    return "spawn" if gpu_count > 0 else "forkserver"


def _context(method: str):
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts, once per process
    return ctx


def adopt_environment(env: dict[str, str]) -> None:
    """Install the launcher's environment now, not the one the fork server started with, and the
    thread count it asks for (OpenMP read ``OMP_NUM_THREADS`` when torch loaded, in the fork server)."""
    os.environ.clear()
    os.environ.update(env)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))


def start_cli_run(argv: list[str], env: dict[str, str], log_path: Path, cpu_path: Path):
    """Start ``sdpg-train ARGV`` (``sdpg_mcore.cli.main``) in a process of its own session, output to
    ``log_path``; returns the ``multiprocessing`` process (its ``pid`` is its process group's id).
    At its end the run writes the CPU seconds it and its children (servers, scorers) used to
    ``cpu_path``: its launcher's ``RUSAGE_CHILDREN`` cannot count them, the fork server reaps them.

    For many short CPU runs side by side (``tools/bench_algos.py``): forked from the fork server
    (:data:`PRELOAD`), a run skips the ~10 CPU-seconds of imports a fresh ``python -m sdpg_mcore.cli``
    spends. Its own session: stopping it with ``os.killpg`` stops its rollout servers too.
    """
    args = (argv, env, str(log_path), str(cpu_path))
    proc = _context("forkserver").Process(target=_cli_main, args=args, daemon=False)
    proc.start()
    return proc


def _cli_main(argv: list[str], env: dict[str, str], log_path: str, cpu_path: str) -> None:
    import json
    import resource
    import sys

    os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    adopt_environment(env)
    from sdpg_mcore.cli import main

    try:
        code = main(argv)
    finally:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu_s = sum(u.ru_utime + u.ru_stime for u in usage)
        Path(cpu_path).write_text(json.dumps({"cpu_s": round(cpu_s, 1)}) + "\n")
    sys.exit(code)


def _rank_main(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, env: dict, out, launcher: int
) -> None:
    from datetime import timedelta

    from sdpg_mcore.parallel.lifetime import die_with
    from sdpg_mcore.parallel.state import device_binding, init_process_group, visible_gpu_count

    die_with(launcher)
    adopt_environment(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch.distributed as dist

    try:
        binding = device_binding(rank, visible_gpu_count())  # every spawned rank is local: LOCAL_RANK = rank
        init_process_group(
            binding, rank=rank, world_size=world_size, timeout=timedelta(minutes=30), init_method="env://"
        )
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor storage into the bytes; the queue's own pickler would pass a
        # shared-memory handle that dies with this process before the parent reads it.
        out.put((rank, True, pickle.dumps(result)))
    except BaseException as err:  # report every failure to the parent, which re-raises it
        out.put((rank, False, (f"{type(err).__name__}: {err}", traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _next_result(out, procs, name: str, timeout_s: float, results: dict, errors: dict) -> tuple:
    """The next ``(rank, ok, payload)`` a rank reports. Raises when ``timeout_s`` passes, or at once
    when a rank has exited without reporting (it died before ``_rank_main`` could: e.g. the child
    could not import ``fn``'s module, or was killed), instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return out.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            pass
        silent = [
            r for r, p in enumerate(procs) if p.exitcode is not None and r not in results and r not in errors
        ]
        if silent and out.empty():
            codes = {r: procs[r].exitcode for r in silent}
            raise RuntimeError(
                f"spawn_ranks: rank(s) {silent} of {name} exited without a result (exit codes {codes}); "
                "their stderr above says why (e.g. the child could not import the function's module)"
            )
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"spawn_ranks: {len(procs) - len(results) - len(errors)} rank(s) of {name} gave no "
                f"result within {timeout_s:.0f}s (deadlock or crash); finished: {sorted(results)}"
            )


def _gpu_count() -> int:
    from sdpg_mcore.parallel.state import visible_gpu_count

    return visible_gpu_count()


def check_gpus_for_ranks(world_size: int, gpu_count: int) -> None:
    """``ValueError`` when ``world_size`` local NCCL ranks would share ``gpu_count`` GPUs (none: gloo, fine)."""
    if 0 < gpu_count < world_size:
        raise ValueError(
            f"spawn_ranks: {world_size} ranks on a machine that shows {gpu_count} GPU(s); NCCL needs one "
            f"GPU per rank (two ranks of one group on a GPU fail to initialise): run at most {gpu_count} "
            "ranks here, or on more GPUs (CUDA_VISIBLE_DEVICES)"
        )


def _more_errors(out, errors: dict, grace_s: float = 2.0) -> None:
    """After a first error: those other ranks report within ``grace_s`` (ranks often fail together,
    and each failure deserves its line); the ranks still running are then killed."""
    deadline = time.monotonic() + grace_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            rank, ok, payload = out.get(timeout=left)
        except queue.Empty:
            return
        if not ok:
            errors[rank] = payload


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    method: str | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; return the results by rank.

    ``torch.distributed`` is already initialised (env://; gloo on CPU, NCCL with ``cuda:rank`` set
    on GPUs) when ``fn`` starts. A rank that raises makes this raise :class:`RanksFailed` (a
    ``RuntimeError``) with the error of every rank that failed with it; ranks still running after
    ``timeout_s`` are killed, so a deadlocked collective fails the caller instead of hanging. On a
    GPU machine with fewer GPUs than ranks it raises ``ValueError`` before starting any (NCCL cannot
    run two ranks of a group on one GPU). ``method`` overrides :func:`start_method` (``"spawn"`` or
    ``"forkserver"``).
    """
    if method not in (None, "spawn", "forkserver"):
        raise ValueError(f"spawn_ranks: method={method!r}; use 'spawn', 'forkserver' or None (by GPUs)")
    gpu_count = _gpu_count()
    check_gpus_for_ranks(world_size, gpu_count)
    ctx = _context(method or start_method(gpu_count))
    out = ctx.Queue()
    port = find_free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(
            target=_rank_main, args=(rank, world_size, port, fn, args, env, out, os.getpid()), daemon=False
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            rank, ok, payload = _next_result(out, procs, fn.__name__, timeout_s, results, errors)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                _more_errors(out, errors)
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RanksFailed(fn.__name__, errors)
    return [results[rank] for rank in range(world_size)]


class RanksFailed(RuntimeError):
    """Ranks of :func:`spawn_ranks` raised; ``errors`` maps each to ``(Type: message, traceback)``.
    The message shows the lowest failing rank's traceback."""

    def __init__(self, name: str, errors: dict[int, tuple[str, str]]):
        rank = min(errors)
        super().__init__(f"rank {rank} of {name} failed:\n{errors[rank][1]}")
        self.errors = dict(errors)
