"""The peak-memory measure of ``tools/bench_step.py``."""

import torch

from sdpg_mcore.bench.memory import peak_extra_bytes


def test_peak_extra_bytes_counts_what_a_call_holds_at_once():
    """The CPU measure is exact: a call holding 3 MiB at once, then 1 MiB, peaks at 3 MiB above its start."""
    kept = []

    def call():
        kept.clear()  # frees what the previous call kept (1 MiB): counted, the profiler saw it allocated
        a, b, c = (torch.ones(1 << 18) for _ in range(3))  # 3 x 1 MiB of float32
        del a, b
        kept.append(c)

    peak, kind = peak_extra_bytes(call)
    assert kind == "cpu_tensor_bytes"
    assert peak == 2 << 20  # start holds 1 MiB (kept); at most 3 MiB live during the call: +2 MiB
