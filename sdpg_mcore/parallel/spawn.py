"""Run a function on N local CPU ranks joined in a real gloo process group.

Tests and tools (``tools/check_parity.py`` run without torchrun) use this to get real
``torch.distributed`` groups on one machine. Each rank is a fresh ``spawn`` process, so the
function and its arguments must be picklable (a module-level function).

    results = spawn_ranks(my_fn, world_size=4, args=(x,))   # results[rank] = my_fn(rank, 4, x)
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, env: dict, out) -> None:
    os.environ.update(env)
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
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor storage into the bytes; the queue's own pickler would pass a
        # shared-memory handle that dies with this process before the parent reads it.
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, which re-raises it
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank.

    ``torch.distributed`` is already initialised (gloo, env://) when ``fn`` starts. A rank that
    raises makes this raise ``RuntimeError`` with that rank's traceback; ranks still running
    after ``timeout_s`` are killed, so a deadlocked collective fails the caller instead of hanging.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, args, env, out), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = out.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(
                    f"spawn_ranks: {world_size - len(results) - len(errors)} rank(s) of {fn.__name__} gave no "
                    f"result within {timeout_s:.0f}s (deadlock or crash); finished: {sorted(results)}"
                ) from None
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            if errors:
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{errors[rank]}")
    return [results[rank] for rank in range(world_size)]
