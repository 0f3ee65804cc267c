"""Measure this CPU's rates, so the step-time model can be held against a CPU measurement.

``tools/bench_step.py`` times a real SDPG and GRPO step on CPU; the model predicts the same steps with
a ``cpu`` :class:`~sdpg_mcore.plan.hardware.Hardware` whose peaks are measured here, the way a GPU's
come from its datasheet: the fp32 FLOP/s of a large matmul, the bandwidth of a large copy, and the rate
of a copy into freshly allocated memory (the host-side cost of pageable offloads). Each is the best of
a few repeats, taken in a few seconds.

    python tools/plan.py --calibrate-cpu
"""

from __future__ import annotations

import time
from dataclasses import replace

from sdpg_mcore.plan.hardware import HARDWARE, Hardware

MATMUL_SIZE = 1024
COPY_BYTES = 256 << 20


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, threads
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def calibrate_cpu(repeats: int = 5) -> Hardware:
    """The ``cpu`` entry with this machine's measured matmul, copy and fresh-copy rates."""
    import torch

    n = MATMUL_SIZE
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    flops = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    copy = 2 * COPY_BYTES / _best_seconds(lambda: dst.copy_(src), repeats)  # read + write
    fresh = COPY_BYTES / _best_seconds(lambda: torch.empty_like(src).copy_(src), repeats)
    return replace(
        HARDWARE["cpu"],
        peak_flops=flops,
        memory_bytes_per_s=copy,
        nvlink_bytes_per_s=copy,
        network_bytes_per_s=copy,
        host_link_bytes_per_s=copy,
        pageable_copy_bytes_per_s=fresh,
        source=f"measured now (torch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"{n}^2 fp32 matmul, {COPY_BYTES >> 20} MiB copy, fresh-memory copy",
    )
