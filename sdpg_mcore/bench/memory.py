"""Peak memory of one call, exact on CPU too: what ``tools/bench_step.py`` compares between algorithms.

On a GPU the caching allocator's peak counts; on CPU the profiler's allocation and free events do:

    peak_bytes, kind = peak_extra_bytes(lambda: run_step(ctx, step, batch))
"""

from __future__ import annotations

import torch


def peak_extra_bytes(fn) -> tuple[int, str]:
    """Peak live tensor bytes during one ``fn()``, above the level at its start, and how it was measured.

    GPU: ``torch.cuda.max_memory_allocated()`` minus the level before. CPU: the same quantity summed
    from the profiler's allocation and free events, so it is exact and blind to the C allocator's
    caching (the resident set size it replaces moved by +-50% between identical runs). The profiler
    only knows the size of blocks allocated while it runs, so it watches one call before the
    measured one too: what that call leaves behind and the measured call frees is counted.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda_max_allocated"
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("measured_call"):
            fn()
    events = prof.profiler.kineto_results.events()
    (measured,) = [e for e in events if e.name() == "measured_call"]
    begin, end = measured.start_ns(), measured.start_ns() + measured.duration_ns()
    live, start_level, peak = 0, None, 0
    memory = [e for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    for event in sorted(memory, key=lambda e: e.start_ns()):
        if event.start_ns() >= begin and start_level is None:
            start_level = peak = live
        if event.start_ns() > end:
            break
        live += event.nbytes()
        if start_level is not None:
            peak = max(peak, live)
    return peak - (start_level if start_level is not None else live), "cpu_tensor_bytes"
