"""What every GPU-check stage shares: progress and phase lines, the device, partial results, the stack
dump before a stage's limit, and the tools it runs."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
"""The checkout the check runs from (``tools/gpu_check.sh`` puts it on ``PYTHONPATH``)."""
TOOLS = REPO / "tools"
STAGE_ENV = "GPU_CHECK_STAGE"
"""The running stage's name (set by the driver): its partial results go to ``$OUT/<stage>.partial.json``."""
DUMP_AFTER_ENV = "GPU_CHECK_DUMP_AFTER_S"
"""Seconds after which a stage writes every thread's Python stack to the log (set by the driver a few
seconds before the stage's limit): a stalled stage then names the line it waits in."""

TOTAL_BUDGET_S = 470.0
"""Whole check by default (``--budget-s``; the shell wrapper passes what is left of its 480 s after
installing the wheel, and kills at that plus 5 s): eight minutes of a 15-minute device budget."""
STAGE_LIMITS = {  # name -> own time limit (s), in the order they run: what has never run on a GPU,
    # and so is likeliest to find a defect, first; the benchmark last, with what time is left
    "env": 30,  # versions, TE status and why, device binding: seconds
    "nccl": 35,  # the trainer's process groups on every GPU: never run on one
    "sdpg_step": 110,  # the step on the GPU: never completed there (the one run timed out)
    "llama70b_layer": 125,  # the 70B layer shape and the TE spec: never run
    "head_fp64": 60,  # both heads against fp64 at a fixed tolerance (Triton compiles here)
    "parity": 45,  # ran once (failed, fixed since): now at 1e-4, the bound of the parity tests
    "bench_kl": 100,  # a benchmark: finds slowness, not wrong results; gets the 65+ s left
}
CPU_SLOWDOWN = 4
"""``--cpu`` stage limits are this many times the GPU ones (a small, shared CPU machine)."""


def stage_limit(name: str, cpu: bool) -> float:
    return STAGE_LIMITS[name] * (CPU_SLOWDOWN if cpu else 1)


def device(cpu: bool) -> str:
    return "cpu" if cpu else "cuda"


def sync(cpu: bool) -> None:
    """Wait for the GPU's queued work (a timing boundary); nothing on CPU."""
    if not cpu:
        import torch

        torch.cuda.synchronize()


_STAGE_START = time.perf_counter()


def progress(message: str) -> None:
    """One timestamped line to stderr, flushed: the stage's log says where a timeout stopped it."""
    now = time.strftime("%H:%M:%S", time.gmtime())
    sys.stderr.write(f"[{now}Z +{time.perf_counter() - _STAGE_START:6.1f}s] {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """``phase NAME: start`` and ``phase NAME: done in Ns`` progress lines around the block (a timeout's
    report names the phase that started and never ended)."""
    began = time.perf_counter()
    progress(f"phase {name}: start")
    yield
    progress(f"phase {name}: done in {time.perf_counter() - began:.1f}s")


def open_phase(lines: list[str]) -> str | None:
    """The innermost phase that started and did not end, from a stage's progress lines."""
    open_phases: list[str] = []
    for line in lines:
        match = re.search(r"phase (.+): (start|done in)", line)
        if match is None:
            continue
        name, what = match.groups()
        if what == "start":
            open_phases.append(name)
        elif name in open_phases:
            open_phases.remove(name)
    return open_phases[-1] if open_phases else None


def save_partial(result: dict) -> None:
    """What a stage has so far, to ``$OUT/<stage>.partial.json`` (the driver adds it to a failure)."""
    out, stage = os.environ.get("OUT"), os.environ.get(STAGE_ENV)
    if out and stage:
        (Path(out) / f"{stage}.partial.json").write_text(json.dumps(result, indent=2, default=str))


def arm_stack_dump() -> None:
    """Dump every thread's stack to stderr (the log) after ``$GPU_CHECK_DUMP_AFTER_S`` seconds."""
    after = os.environ.get(DUMP_AFTER_ENV)
    if after:
        faulthandler.dump_traceback_later(float(after), exit=False, file=sys.stderr)


def compile_seconds() -> float:
    """Seconds ``torch.compile`` spent in this process so far (Megatron's fused kernels compile with it
    on first use under the Transformer-Engine spec: ``megatron/core/jit.py``)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(times) for times in compilation_time_metrics.values()))


def dist_backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend())
