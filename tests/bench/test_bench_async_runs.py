"""Synchronous vs asynchronous runs over seeds (``tools/bench_async.py``'s summary)."""

from __future__ import annotations

import pytest

from sdpg_mcore.bench.async_runs import report


def test_summary_over_seeds_pairs_each_async_run_with_its_seeds_sync_run():
    def run(seed, step_s, acc, held_out):
        return {"async_steps": 0, "seed": seed, "steps": len(acc), "step_s": step_s, "step_s_median": step_s,
                "acc": acc, "version_lag_max": 0, "logprob_mismatch_mean": 0.0,
                "eval": dict(zip(["10", "20"], held_out))}  # fmt: skip

    sync = [
        run(1, 2.0, [0.1] * 10 + [0.5] * 10, [0.3, 0.5]),
        run(2, 4.0, [0.1] * 10 + [0.7] * 10, [0.3, 0.6]),
    ]
    async1 = [
        run(1, 1.0, [0.1] * 10 + [0.4] * 10, [0.2, 0.5]),
        run(2, 2.0, [0.1] * 10 + [0.7] * 10, [0.3, 0.4]),
    ]
    out = report({"sync": sync, "async1": async1}, "unpinned")
    res = out["results"]["async1"]
    assert out["speedup"] == pytest.approx(3.0 / 1.5)  # mean seconds per step over seeds
    assert res["acc_last10"] == pytest.approx(0.55) and out["results"]["sync"]["acc_last10"] == pytest.approx(
        0.6
    )
    assert res["acc_last10_diff"] == pytest.approx(-0.05)  # (-0.1 + 0.0) / 2
    assert res["acc_last10_diff_se"] == pytest.approx(0.05)  # stdev(-0.1, 0.0) / sqrt(2)
    assert res["acc"][-1] == pytest.approx(0.55) and res["seeds"] == [1, 2]
    # Held-out accuracy of the same weight versions, paired per seed at each evaluated step.
    assert res["eval"] == pytest.approx({"10": 0.25, "20": 0.45})
    assert res["eval_diff"] == pytest.approx({"10": -0.05, "20": -0.1})  # (-0.1 + 0) / 2, (0 - 0.2) / 2
    assert res["eval_diff_se"] == pytest.approx({"10": 0.05, "20": 0.1})
