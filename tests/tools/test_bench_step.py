"""tools/bench_step.py end to end on a tiny model: both algorithms run interleaved; table and JSON agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "tools" / "bench_step.py"
TINY = ["--hidden", "64", "--layers", "1", "--vocab", "512", "--prompts", "2", "--n", "2"]
TINY += ["--mini-batch-prompts", "2", "--prompt-len", "8", "--context-len", "4", "--response-len", "8"]


def test_table_and_json_on_tiny_model(tmp_path):
    json_path = tmp_path / "step.json"
    out = subprocess.run(
        [sys.executable, str(TOOL), *TINY, "--repeats", "2", "--json", str(json_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(json_path.read_text())
    grpo, sdpg = report["results"]["grpo"], report["results"]["sdpg"]
    assert report["time_ratio"] == pytest.approx(sdpg["step_s"] / grpo["step_s"])
    assert report["memory_ratio"] == pytest.approx(sdpg["peak_extra_mb"] / grpo["peak_extra_mb"])
    assert grpo["memory_kind"] == sdpg["memory_kind"] == "cpu_tensor_bytes"
    assert grpo["peak_extra_mb"] > 0 and sdpg["peak_extra_mb"] > 0
    # Only SDPG runs the teacher pass; both run old log-probs and the update.
    assert sdpg["phases_s"]["teacher"] > 0 and grpo["phases_s"].get("teacher", 0.0) == 0.0
    assert grpo["phases_s"]["update"] > 0 and sdpg["phases_s"]["old_logprob"] > 0
    # hidden 64, 2 heads x 32 (q 64), 1 KV head (kv 32), MLP 192: per-layer matmul weights 57344.
    head = 512 * 64
    assert report["lm_head_flops_fraction"] == pytest.approx(
        head / (head + 64 * 128 + 64 * 64 + 3 * 64 * 192)
    )
    assert f"{report['time_ratio']:10.2f}  target <= 1.4" in out.stdout
    assert "LM head:" in out.stdout
