"""How long ``spawn_ranks`` takes to start a gloo group: fresh ``spawn`` processes vs the preloaded fork server.

    python tools/bench_spawn.py                        # 2 and 4 ranks, 5 starts each, table
    python tools/bench_spawn.py --json spawn.json      # JSON too

Each start method runs in a process of its own (the fork server lives as long as the process that
started it), which calls ``spawn_ranks`` ``--repeats`` times on a function that imports what a
trainer rank imports (``PRELOAD``), joins the group and all-reduces one number. ``first_s`` is the first call (for ``forkserver``: the server starting and
importing ``sdpg_mcore.parallel.spawn.PRELOAD``), ``later_median_s`` the median of the others — what
every further group costs in a test session or a tool that starts several.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

METHODS = ("spawn", "forkserver")


def join_and_allreduce(rank: int, world_size: int) -> float:
    import importlib

    import torch
    import torch.distributed as dist

    from sdpg_mcore.parallel.spawn import PRELOAD

    for module in PRELOAD:  # what a trainer rank imports (free where the fork server preloaded it)
        importlib.import_module(module)

    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return value.item()


def time_starts(method: str, world_size: int, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` ``spawn_ranks`` calls in this process."""
    from sdpg_mcore.parallel.spawn import spawn_ranks

    expected = world_size * (world_size - 1) / 2
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        results = spawn_ranks(join_and_allreduce, world_size, method=method)
        seconds.append(time.perf_counter() - began)
        if results != [expected] * world_size:
            raise RuntimeError(f"{method}: all-reduce gave {results}, not {expected} on every rank")
    return seconds


def measure(method: str, world_size: int, repeats: int) -> dict:
    """:func:`time_starts` in a fresh interpreter (its own fork server, nothing imported before)."""
    command = [sys.executable, __file__, "--measure", method, str(world_size), str(repeats)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} x {world_size}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "method": method,
        "world_size": world_size,
        "first_s": round(seconds[0], 2),
        "later_median_s": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
        "all_s": [round(s, 3) for s in seconds],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated rank counts")
    parser.add_argument("--repeats", type=int, default=5, help="spawn_ranks calls per method and size")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "RANKS", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the fresh interpreter of measure()
        method, size, repeats = args.measure
        print(json.dumps(time_starts(method, int(size), int(repeats))))
        return 0
    rows = [
        measure(method, int(size), args.repeats) for size in args.world_sizes.split(",") for method in METHODS
    ]
    print(f"{'method':<11} {'ranks':>5} {'first s':>8} {'later s (median)':>17}")
    for row in rows:
        print(
            f"{row['method']:<11} {row['world_size']:>5} {row['first_s']:>8.2f} {row['later_median_s']:>17.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeats": args.repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
