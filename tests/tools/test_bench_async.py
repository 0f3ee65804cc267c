"""tools/bench_async.py end to end on a random tiny model: both modes run, pinned; table and JSON agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))
from launch_testlib import clean_env, make_assets  # noqa: E402


@pytest.mark.slow
def test_sync_and_async_side_by_side(tmp_path):
    assets = make_assets(tmp_path / "assets")
    json_path = tmp_path / "async.json"
    tiny = ["data.batch_prompts=2", "data.mini_batch_prompts=2", "data.max_response_length=8", "rollout.n=2"]
    cmd = [sys.executable, str(REPO / "tools" / "bench_async.py"), "--steps", "3", "--json", str(json_path)]
    cmd += [
        "--model-dir",
        str(assets / "model"),
        "--data-dir",
        str(assets / "data"),
        "--out",
        str(tmp_path / "runs"),
    ]
    out = subprocess.run(
        [*cmd, "--set", *tiny], capture_output=True, text=True, timeout=1200, env=clean_env()
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads(json_path.read_text())
    sync, async1 = report["results"]["sync"], report["results"]["async1"]
    assert report["speedup"] == pytest.approx(sync["step_s"] / async1["step_s"])
    assert sync["steps"] == async1["steps"] == 3 and len(sync["acc"]) == len(async1["acc"]) == 3
    assert sync["version_lag_max"] == 0 and async1["version_lag_max"] <= 1
    # Held-out evaluation after the last step (the default interval of 10 is past it) in both modes.
    assert list(sync["eval"]) == list(async1["eval"]) == ["3"] and "held-out after step" in out.stdout
    assert report["pinning"].startswith("server cpus 1") or report["pinning"] == "unpinned"
    assert "async1" in out.stdout and "speedup" in out.stdout


def test_summary_over_seeds_pairs_each_async_run_with_its_seeds_sync_run():
    sys.path.insert(0, str(REPO / "tools"))
    import bench_async

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
    out = bench_async.report({"sync": sync, "async1": async1}, "unpinned")
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
