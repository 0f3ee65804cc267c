"""tools/bench_async.py end to end on a random tiny model: both modes run, pinned; table and JSON agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_testlib import clean_env, make_assets

REPO = Path(__file__).resolve().parents[2]


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
