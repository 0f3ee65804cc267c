"""tools/bench_weight_sync.py end to end on a tiny model: every method runs and the table/JSON are complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "tools" / "bench_weight_sync.py"
TINY = ["--layers", "1", "--hidden", "64", "--vocab", "301", "--repeats", "1", "--bucket-mb", "1"]


def test_help():
    out = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True)
    assert "--bucket-mb" in out.stdout and "--json" in out.stdout


def test_json_run_on_tiny_model(tmp_path):
    cmd = [sys.executable, str(TOOL), *TINY, "--shared-dir", str(tmp_path), "--json"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {
        "distributed/bucketed-flat",
        "distributed/bucketed",
        "distributed/per-tensor",
        "disk",
    }
    assert (
        rows["distributed/per-tensor"]["requests"] == result["num_tensors"] == 13
    )  # 11 per layer + embed + norm
    assert rows["distributed/bucketed"]["requests"] == 1
    assert all(r["gb_per_s"] > 0 for r in rows.values())
    assert result["bucketed_speedup_vs_per_tensor"] > 0
    assert list(tmp_path.iterdir()) == []  # the tool cleans up after itself


def test_bad_arguments_exit_with_usage():
    out = subprocess.run([sys.executable, str(TOOL), "--hidden", "30"], capture_output=True, text=True)
    assert out.returncode == 2 and "multiple of 16" in out.stderr
